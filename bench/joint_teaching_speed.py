"""Training speed of Joint-Teaching against Logits KD on teacher PTs, side by side, per training sample.

    python bench/joint_teaching_speed.py --teacher runs/bench/teacher/model          # CPU
    python bench/joint_teaching_speed.py --teacher runs/bench/teacher/model --steps 150 --batch-size 64 \
        --warmup-steps 30

Both methods run distilgen's training loop (`train.train`) from the same student initialisation on the
same inputs, PTs, batch size and lengths, with the live teacher (stored top-k off). The teacher PTs are
generated first (not timed). Joint-Teaching samples fresh student PTs (eval mode, KV cache, no grad, nucleus
0.95) on a share 1 - alpha of the steps and teacher-forces the teacher along them; the report gives samples/s
of each and the cost ratio (logits_kd_pt samples/s over joint_teaching samples/s; target: <= 2 on a GPU):
at the defaults (fresh student PTs every student step; on a GPU sampled with a compiled decoder step),
without the compiled step (`student_pts.static_cache: off`), with `student_pts.refresh_every` (the PTs of
that many student steps sampled in one call) and with batch mixing. --warmup-steps first runs each case
untimed (compiles, kernel setup); --cases picks some; --repeats N times the cases N times in turn and reports
the median time of each (and each round's ratios), so that drift of the machine between cases shows.
Without --teacher, a teacher and a student of the BENCHMARKS.md sizes are built at random (they generate
to max_new_tokens, the slowest case for student PTs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from distilgen.config import (
    BuiltinTaskConfig,
    DataConfig,
    DistillConfig,
    KDConfig,
    ModelConfig,
    PTConfig,
    StudentPTConfig,
    TeacherConfig,
    TrainConfig,
)
from distilgen.data import load_splits
from distilgen.distill import METHODS, Context, prepare_pts
from distilgen.models import load_model
from distilgen.pseudo_targets import get_spec
from distilgen.teachers import load_teacher
from distilgen.train import make_accelerator, train

STUDENT = ModelConfig(arch="bart", hidden_size=96, encoder_layers=2, decoder_layers=1, ffn_size=384, max_positions=384)
TEACHER = ModelConfig(arch="bart", hidden_size=192, encoder_layers=3, decoder_layers=3, ffn_size=768, max_positions=384)
CASES = {
    "logits_kd_pt": "logits_kd_pt",
    "jt": "joint_teaching (alpha 0.5, steps; the defaults)",
    "jt_eager": "joint_teaching (alpha 0.5, steps, student_pts.static_cache off)",
    "jt_refresh": "joint_teaching (alpha 0.5, steps, refresh_every {refresh_every})",
    "jt_batch": "joint_teaching (alpha 0.5, batch)",
}
"""Bench cases (--cases) and their report names."""


def run(method: str, base: DistillConfig, overrides: dict, steps: int) -> float:
    """Seconds for `steps` optimizer steps of `method` (setup and PT generation excluded)."""
    cfg = dataclasses.replace(base, method=method, train=dataclasses.replace(base.train, max_steps=steps), **overrides)
    accelerator = make_accelerator(cfg.train, Path(cfg.output_dir))
    splits = load_splits(cfg.data, ("train", "unlabeled"))
    teacher = load_teacher(cfg.teacher, cfg.precision, accelerator.device)
    torch.manual_seed(0)
    student = load_model(dataclasses.replace(cfg.student, tokenizer=cfg.teacher.path))
    ctx = Context(cfg, teacher, student, splits)
    prepare_pts(ctx, accelerator)
    plan = METHODS[method].build(ctx)
    out = Path(tempfile.mkdtemp(prefix=f"jt-bench-{method}-"))
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    train(student, plan.items, plan.loss, cfg.train, out, accelerator, cfg.seed, prepare=plan.prepare)
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", help="a trained teacher directory; default: random models of the bench sizes")
    parser.add_argument("--student-width", type=int, default=96)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--inputs", type=int, default=512, help="unlabeled inputs with teacher PTs")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--refresh-every", type=int, default=4, help="student-PT steps sampled at once (staleness)")
    parser.add_argument(
        "--warmup-steps", type=int, default=0, help="untimed steps of each case first (pays compiles and kernel setup)"
    )
    parser.add_argument("--cases", help=f"comma-separated subset of: {', '.join(CASES)} (default: all)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of all cases, in turn; medians reported")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="jt-bench-"))
    task = BuiltinTaskConfig(train_size=args.inputs // 4, unlabeled_size=args.inputs, dev_size=0, test_size=0)
    data = DataConfig(task=task, max_source_length=320, max_target_length=64)
    teacher_path = args.teacher
    if teacher_path is None:
        splits = load_splits(data, ("train", "unlabeled"))
        texts = [e.source for s in splits.values() for e in s] + [r for e in splits["train"] for r in e.references]
        torch.manual_seed(0)
        load_model(TEACHER, texts=lambda: texts).save(work / "teacher")
        teacher_path = str(work / "teacher")
    student = dataclasses.replace(STUDENT, hidden_size=args.student_width, ffn_size=4 * args.student_width)
    spec = dataclasses.replace(get_spec("sample"), max_new_tokens=args.max_new_tokens)
    base = DistillConfig(
        output_dir=str(work / "run"),
        data=data,
        teacher=TeacherConfig(path=teacher_path),
        student=student,
        kd=KDConfig(use_stored_topk=False),
        pts=PTConfig(store=str(work / "pts"), spec=spec),
        student_pts=StudentPTConfig(max_new_tokens=args.max_new_tokens),
        train=TrainConfig(max_steps=args.steps, batch_size=args.batch_size, eval_every=0, log_every=10**9),
    )

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{args.steps} steps of batch {args.batch_size} on {device}; student width {args.student_width}")
    samples = args.steps * args.batch_size
    timings = {}
    student_pts = {
        "jt": base.student_pts,
        "jt_eager": dataclasses.replace(base.student_pts, static_cache="off"),
        "jt_refresh": dataclasses.replace(base.student_pts, refresh_every=args.refresh_every),
        "jt_batch": dataclasses.replace(base.student_pts, mixing="batch"),
    }
    requested = set(args.cases.split(",")) if args.cases else set(CASES)
    unknown = sorted(requested - set(CASES))
    if unknown or "logits_kd_pt" not in requested:
        parser.error(f"--cases: unknown {unknown}" if unknown else "--cases must include logits_kd_pt (the reference)")
    for round_ in range(args.repeats):
        for key in [k for k in CASES if k in requested]:  # the reference first
            name = CASES[key].format(refresh_every=args.refresh_every)
            method = "logits_kd_pt" if key == "logits_kd_pt" else "joint_teaching"
            overrides = {"student_pts": student_pts[key]} if key in student_pts else {}
            if args.warmup_steps and round_ == 0:
                run(method, base, overrides, args.warmup_steps)
            timings.setdefault(name, []).append(run(method, base, overrides, args.steps))
            print(f"round {round_ + 1}, {name}: {samples / timings[name][-1]:.1f} samples/s", flush=True)
    reference = timings[CASES["logits_kd_pt"]]
    rows = [
        {
            "method": name,
            "samples_per_s": round(samples / statistics.median(s), 2),
            "cost_vs_logits_kd_pt": round(statistics.median(s) / statistics.median(reference), 2),
            "cost_per_round": [round(t / r, 2) for t, r in zip(s, reference, strict=True)],
        }
        for name, s in timings.items()
    ]
    for row in rows[1:]:
        print(f"{row['method']}: {row['cost_vs_logits_kd_pt']}x the time of logits_kd_pt per training sample")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
