"""Training: one explicit loop on Accelerate, shared by fine-tuning and the distillation methods.

    distilgen finetune configs/quickstart_teacher.yaml train.lr=3e-4

The loop reads top to bottom: setup, then per optimizer step (count the step's target tokens,
accumulate micro-batch gradients, guard against non-finite values, step), evaluate on dev,
checkpoint. Rerunning the same command after a crash resumes from `output_dir/checkpoint`:
model, optimizer, scheduler, RNG states and the position in the data all come back, so the run
ends as an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from torch.distributed.fsdp import register_fsdp_forward_method
from transformers import get_scheduler

from distilgen.config import (
    ConfigError,
    DataConfig,
    DecodingConfig,
    FinetuneConfig,
    TrainConfig,
    from_dict,
    save_config,
    to_dict,
    writable_dir,
)
from distilgen.data import Example, load_splits
from distilgen.evaluate import generate, gold_perplexity
from distilgen.metrics import compute_metrics
from distilgen.models import Batch, Encoded, TextModel, avoid_cudnn_attention, load_model
from distilgen.objectives import cross_entropy, masked_sum, noise_tokens, permute_spans
from distilgen.progress import progress_bar
from distilgen.sharding import check_launch, group_shared_embedding, is_sharded, release, whole_state_dict

log = logging.getLogger(__name__)

LossFn = Callable[[TextModel, Batch], torch.Tensor]
"""Summed loss of one micro-batch over its valid target tokens (normalised by the loop)."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. repeated non-finite losses); the message names the step."""


@dataclass
class TrainState:
    """Where a run is; saved with every checkpoint so a resumed run continues exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_score: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    bad_steps_in_a_row: int = 0
    finished: bool = False


def process_state() -> PartialState:
    """This process's place among those `accelerate launch` started (one process otherwise). Processes launched
    on a machine without a GPU form one gloo group (`cpu`), as `make_accelerator`'s do."""
    return PartialState(cpu=not torch.cuda.is_available())


def make_accelerator(cfg: TrainConfig, output_dir: Path) -> Accelerator:
    avoid_cudnn_attention()  # batches vary in length
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    accelerator = Accelerator(
        mixed_precision=precision,
        log_with=cfg.trackers or None,
        project_dir=str(output_dir),
        cpu=not torch.cuda.is_available(),  # lets processes launched on a CPU machine form one (gloo) group
        # Our steps count optimizer steps over all processes: the schedule moves once per step, not once per
        # process (accelerate's default, meant for per-process dataloader lengths, ended it halfway with 2).
        step_scheduler_with_optimizer=False,
    )
    check_launch(accelerator)
    return accelerator


def epoch_batches(items: Sequence[Encoded], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled batches of indices for one epoch, grouped by length to waste little padding.

    Deterministic in (seed, epoch), so a resumed run sees the same batches in the same order.
    """
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(items), generator=gen).tolist()
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: len(items[i].source) + len(items[i].target))
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    shuffled = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in shuffled]


def cross_entropy_loss(label_smoothing: float = 0.0) -> LossFn:
    """Fine-tuning: cross-entropy on the gold targets of the batch."""

    def loss(tm: TextModel, batch: Batch) -> torch.Tensor:
        per_token = cross_entropy(tm.target_logits(batch), batch["target_ids"], label_smoothing)  # (B, T)
        return masked_sum(per_token, batch["target_mask"])

    return loss


def noise_source(tm: TextModel, batch: Batch, rate: float, kind: str) -> Batch:
    """The batch with its source tokens hit by noise (`objectives.noise_tokens`): dropped, or masked with the
    tokenizer's mask (else unknown) token; or cut into spans put in random order (`objectives.permute_spans`).
    Special tokens and padding are never hit."""
    tok = tm.tokenizer
    keep = [i for i in (tok.bos_token_id, tok.eos_token_id, tok.sep_token_id, tok.pad_token_id) if i is not None]
    if kind == "permute":
        return {**batch, "source_ids": permute_spans(batch["source_ids"], batch["source_mask"], rate, keep_ids=keep)}
    mask_id = (tok.mask_token_id or tok.unk_token_id) if kind == "mask" else None
    side = "left" if tm.layout.pad_source_left else "right"
    ids, mask = noise_tokens(batch["source_ids"], batch["source_mask"], rate, mask_id, keep_ids=keep, padding_side=side)
    return {**batch, "source_ids": ids, "source_mask": mask}


def denoising_loss(rate: float, kind: str) -> LossFn:
    """Denoising pre-training: cross-entropy of the clean text given a freshly noised copy."""
    clean = cross_entropy_loss()

    def loss(tm: TextModel, batch: Batch) -> torch.Tensor:
        return clean(tm, noise_source(tm, batch, rate, kind))

    return loss


def text_windows(
    tm: TextModel, examples: Sequence[Example], window: int, whole_source_length: int | None = None
) -> list[Encoded]:
    """Each example's source cut into consecutive windows of `window` tokens, as (window -> window) items.

    With `whole_source_length`, the items are (whole source -> window), the source truncated to that many
    model tokens and only its kept part cut into windows.
    """
    ids = tm.tokenizer([e.source for e in examples], add_special_tokens=False)["input_ids"]
    whole_source = whole_source_length is not None
    if whole_source:
        ids = [tokens[: whole_source_length - len(tm.source_ids([]))] for tokens in ids]
    items = []
    for example, tokens in zip(examples, ids, strict=True):
        for start in range(0, len(tokens), window):
            piece = tokens[start : start + window]
            source = tm.source_ids(tokens if whole_source else piece)
            items.append(Encoded(f"{example.id}@{start}", source, tm.target_ids(piece)))
    return items


LOWER_IS_BETTER = ("loss", "perplexity")


def dev_score(tm: TextModel, dev: Sequence[Example], metric: str, decoding: DecodingConfig, data: DataConfig) -> float:
    """The early-stopping score, higher is better (dev loss and perplexity are negated)."""
    if metric in LOWER_IS_BETTER:
        ppl = gold_perplexity(tm, dev, data, decoding.batch_size)
        return -(math.log(ppl) if metric == "loss" else ppl)
    predictions = generate(tm, dev, decoding, data.max_source_length, desc="dev")
    return compute_metrics([metric], predictions, [list(e.references) for e in dev])[metric]


def dev_evaluator(
    dev: Sequence[Example], cfg: TrainConfig, decoding: DecodingConfig, data: DataConfig
) -> Callable[[TextModel], float] | None:
    """The `evaluate` argument of `train`: the score on the first `cfg.dev_limit` dev examples (None: no dev)."""
    dev = list(dev)[: cfg.dev_limit]
    if not dev:
        return None
    return lambda model: dev_score(model, dev, cfg.metric, decoding, data)


def stage_summary(state: TrainState, output_dir: Path, metric: str) -> dict:
    """Where a finished training run put its model, its steps and its best dev score (in the metric's sense)."""
    best = state.best_score
    if best is not None and metric in LOWER_IS_BETTER:
        best = -best
    return {
        "model": str(output_dir / "model"),
        "steps": state.step,
        "best_step": state.best_step,
        f"best_dev_{metric}": best,
    }


def _save_checkpoint(accelerator: Accelerator, state: TrainState, output_dir: Path) -> None:
    """Write `checkpoint/` atomically: a complete new one replaces the old, or the old stays."""
    final, tmp = output_dir / "checkpoint", output_dir / "checkpoint.tmp"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    with _writing(tmp):
        accelerator.save_state(str(tmp), safe_serialization=True)
        if accelerator.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps(asdict(state)))
    accelerator.wait_for_everyone()  # every process has written its part (its RNG state, its shards)
    if accelerator.is_main_process:
        _replace_dir(tmp, final)
    accelerator.wait_for_everyone()


def _replace_dir(new: Path, final: Path) -> None:
    """Put the complete directory `new` in place of `final`; a crash in between leaves `final.old`, which
    `_finish_swaps` puts back."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


LOW_DISK_BYTES = 64 * 2**20
"""Free space under which a failed write is reported as a full disk: torch's writer says only 'iostream error'."""


@contextmanager
def _writing(tmp: Path) -> Iterator[None]:
    """Around a write into the new directory `tmp`: if it fails (a full disk, a read-only place), remove `tmp` and
    raise an OSError naming it, so that the CLI says what happened in one line and the last good copy stays."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        full = isinstance(err, OSError) and err.errno == errno.ENOSPC
        full = full or shutil.disk_usage(tmp.parent).free < LOW_DISK_BYTES  # measured before tmp is freed
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp)) from err
        if isinstance(err, OSError) and err.errno is not None:
            raise OSError(err.errno, err.strerror, str(tmp)) from err
        raise


def cut_log(path: Path, step: int) -> None:
    """Keep the lines of the JSONL log `path` up to optimizer step `step` (where a resumed run continues)."""
    if not path.exists():
        return
    lines = path.read_text(errors="replace").splitlines(keepends=True)
    kept = [line for line in lines if _logged_step(line) <= step]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


def _logged_step(line: str) -> float:
    """The step of one log line; infinite for a line cut short by a crash or a full disk (dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _finish_swaps(output_dir: Path) -> None:
    """Complete `_replace_dir` swaps a crash interrupted: `X.old` alone is put back as `X` (the crash came between
    the two renames); beside a complete `X`, it is the stale copy and goes."""
    for name in ("checkpoint", "model"):
        final, old = output_dir / name, output_dir / f"{name}.old"
        if old.exists() and not final.exists():
            os.replace(old, final)
        shutil.rmtree(old, ignore_errors=True)


Items = Sequence[Encoded] | Callable[[int], Sequence[Encoded]]
"""Training items, or a function of the epoch giving them (PT methods: a different PT each epoch; the
number of items must not change between epochs)."""

Upcoming = Callable[[Sequence[int]], dict[int, list[Batch]]]
"""Later optimizer steps -> their micro-batches on device; steps past the epoch or the run are left out."""

Prepare = Callable[[TextModel, int, list[Batch], Upcoming], list[Batch]]
"""(current model, 0-based optimizer step, the step's micro-batches on device, a view of later steps) -> the
micro-batches to train on, before their target tokens are counted (Joint-Teaching swaps in fresh student PTs
here, sampling those of later steps with them when `student_pts.refresh_every` > 1)."""


def train(
    tm: TextModel,
    items: Items,
    loss_fn: LossFn,
    cfg: TrainConfig,
    output_dir: Path,
    accelerator: Accelerator,
    seed: int,
    evaluate: Callable[[TextModel], float] | None = None,
    on_step: Callable[[TrainState], None] | None = None,
    prepare: Prepare | None = None,
) -> TrainState:
    """Run (or resume) training; the best model by `evaluate` is saved to `output_dir/model`.

    Args:
        items: encoded training examples, each with a target, or a function of the epoch giving them.
        loss_fn: summed loss of one micro-batch; the loop divides by the step's target tokens.
        evaluate: dev score of the current model, higher is better; None saves the last model.
        on_step: called after every optimizer step (tests use it to simulate a crash).
        prepare: transforms each step's micro-batches before they are counted and trained on (see `Prepare`).
    """
    # --- setup ---------------------------------------------------------------------------------
    output_dir.mkdir(parents=True, exist_ok=True)
    items_at = items if callable(items) else lambda epoch: items
    batches_per_epoch = len(epoch_batches(items_at(0), cfg.batch_size, seed, 0)) // accelerator.num_processes
    if batches_per_epoch < cfg.grad_accum:
        raise TrainingError(
            f"the training data makes {batches_per_epoch} batches per process, fewer than train.grad_accum="
            f"{cfg.grad_accum}: lower train.batch_size or train.grad_accum"
        )
    steps_per_epoch = batches_per_epoch // cfg.grad_accum
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    eval_every = cfg.eval_every or steps_per_epoch

    # A stage prepares its own model: the accelerator lets go of an earlier stage's, which its checkpoints would
    # hold too, with their optimizer's state in memory (and FSDP's gradient clipping would find two models).
    accelerator.free_memory()
    model = tm.model
    group_shared_embedding(accelerator, model)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n.lower()]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n.lower())]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    scheduler = get_scheduler(
        "constant_with_warmup" if cfg.schedule == "constant" else cfg.schedule,
        optimizer,
        num_warmup_steps=int(cfg.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    # a sharded model's `generate` runs inside its root's forward hooks (it calls an encoder directly)
    register_fsdp_forward_method(model, "generate")
    tm = dataclasses.replace(tm, model=model)  # the same tokenizer, layout and prompt
    unwrapped = dataclasses.replace(tm, model=accelerator.unwrap_model(model))

    state = TrainState()
    if accelerator.is_main_process:
        _finish_swaps(output_dir)
    accelerator.wait_for_everyone()
    checkpoint = output_dir / "checkpoint" if (output_dir / "checkpoint" / "trainer_state.json").exists() else None
    if checkpoint is not None:
        if (checkpoint / "optimizer_1.bin").exists():  # an earlier stage's model and optimizer came first
            raise TrainingError(
                f"{checkpoint} was written by an earlier distilgen, which kept the previous stage's model in it: "
                "remove it to train this stage again from its start"
            )
        accelerator.load_state(str(checkpoint))
        state = TrainState(**json.loads((checkpoint / "trainer_state.json").read_text()))
        accelerator.print(f"resumed from {checkpoint} at step {state.step}/{total_steps}")
    if cfg.trackers:
        accelerator.init_trackers("distilgen", config={"total_steps": total_steps, **asdict(cfg)})
    metrics_log = output_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        cut_log(metrics_log, state.step)  # lines written after the checkpoint are written again

    def record(entry: dict) -> None:
        if accelerator.is_main_process:
            with metrics_log.open("a") as f:
                f.write(json.dumps(entry) + "\n")
        if cfg.trackers:
            accelerator.log({k: v for k, v in entry.items() if k != "step"}, step=entry["step"])

    def save_best(score_value: float | None) -> None:
        accelerator.wait_for_everyone()
        weights = whole_state_dict(accelerator, model) if is_sharded(model) else None  # all send their shards
        if accelerator.is_main_process:
            tmp = output_dir / "model.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            with _writing(tmp):
                unwrapped.save(tmp, weights)
                (tmp / "distilgen_state.json").write_text(
                    json.dumps({"step": state.step, "dev_score": score_value, "metric": cfg.metric})
                )
            _replace_dir(tmp, output_dir / "model")
        accelerator.wait_for_everyone()  # the next stage loads it on every process

    def evaluate_now() -> bool:
        """Evaluate on dev, keep the best model; True when early stopping says stop."""
        if evaluate is None:
            return False
        model.eval()
        value = evaluate(unwrapped)
        model.train()
        improved = state.best_score is None or value > state.best_score
        if improved:
            state.best_score, state.best_step, state.evals_without_improvement = value, state.step, 0
            save_best(value)
        else:
            state.evals_without_improvement += 1
        record(
            {
                "step": state.step,
                "epoch": state.epoch,
                f"dev_{cfg.metric}": -value if cfg.metric in LOWER_IS_BETTER else value,
                "best_step": state.best_step,
            }
        )
        return cfg.patience > 0 and state.evals_without_improvement >= cfg.patience

    # --- main loop -----------------------------------------------------------------------------
    model.train()
    bar = progress_bar(
        total=total_steps, initial=state.step, desc="train", disable=not accelerator.is_local_main_process
    )
    started, loss_window, stop = time.perf_counter(), [], state.finished

    def step_batches(start: int) -> list[Batch]:
        """The micro-batches of the step whose first batch is `start` in this epoch's share of this process."""
        micro = [tm.collate([epoch_items[i] for i in mine[start + j]]) for j in range(cfg.grad_accum)]
        return [{k: v.to(accelerator.device) for k, v in b.items()} for b in micro]

    def upcoming(steps: Sequence[int]) -> dict[int, list[Batch]]:
        starts = {s: state.batch_in_epoch + (s - state.step) * cfg.grad_accum for s in steps}
        return {s: step_batches(b) for s, b in starts.items() if s < total_steps and b + cfg.grad_accum <= len(mine)}

    while state.step < total_steps and not stop:
        epoch_items = items_at(state.epoch)
        batches = epoch_batches(epoch_items, cfg.batch_size, seed, state.epoch)
        mine = batches[accelerator.process_index :: accelerator.num_processes][:batches_per_epoch]
        while state.batch_in_epoch + cfg.grad_accum <= len(mine) and state.step < total_steps and not stop:
            micro_batches = step_batches(state.batch_in_epoch)
            if prepare is not None:
                micro_batches = prepare(unwrapped, state.step, micro_batches, upcoming)
            local_tokens = sum(b["target_mask"].sum() for b in micro_batches)
            step_tokens = accelerator.reduce(local_tokens.float(), reduction="sum").clamp_min(1)
            step_loss = torch.zeros((), device=accelerator.device)
            for i, batch in enumerate(micro_batches):
                sync = i == len(micro_batches) - 1
                with nullcontext() if sync else accelerator.no_sync(model):
                    with accelerator.autocast():
                        # DDP averages gradients over processes, so scale back up to a sum over all tokens.
                        loss = loss_fn(tm, batch) / step_tokens * accelerator.num_processes
                    accelerator.backward(loss)
                step_loss += loss.detach()
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            finite = torch.isfinite(step_loss) and torch.isfinite(torch.as_tensor(grad_norm))
            if finite:
                optimizer.step()
                state.bad_steps_in_a_row = 0
            else:
                state.bad_steps_in_a_row += 1
                log.warning("step %d: non-finite loss or gradient, step skipped", state.step + 1)
                if state.bad_steps_in_a_row >= cfg.max_bad_steps:
                    raise TrainingError(
                        f"non-finite loss or gradient at step {state.step + 1}, {state.bad_steps_in_a_row} steps in "
                        "a row: lower train.lr, check the data, or use train.precision=no"
                    )
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.batch_in_epoch += cfg.grad_accum
            bar.update(1)

            if finite:
                loss_window.append(accelerator.reduce(step_loss, reduction="mean").item())
            if state.step % cfg.log_every == 0 and loss_window:
                mean_loss = sum(loss_window) / len(loss_window)
                loss_window.clear()
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                record(
                    {
                        "step": state.step,
                        "epoch": state.epoch,
                        "loss": mean_loss,
                        "lr": scheduler.get_last_lr()[0],
                        "elapsed_s": round(time.perf_counter() - started, 2),
                    }
                )
            # --- validate and checkpoint ---------------------------------------------------------
            at_end = state.step >= total_steps
            if state.step % eval_every == 0 or at_end:
                stop = evaluate_now()
                state.finished = stop or at_end
                _save_checkpoint(accelerator, state, output_dir)
            elif cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                _save_checkpoint(accelerator, state, output_dir)
            if on_step is not None:
                on_step(state)
        if state.batch_in_epoch + cfg.grad_accum > len(mine):
            state.epoch += 1
            state.batch_in_epoch = 0
    bar.close()
    if evaluate is None or state.best_step is None and not (output_dir / "model").exists():
        save_best(None)
    if cfg.trackers:
        accelerator.end_training()
    release(model)
    return state


def training_text(splits: dict[str, list[Example]]):
    """Text a new tokenizer is trained on: sources and targets of the training splits."""
    for name in ("train", "unlabeled"):
        for e in splits.get(name, []):
            yield e.source
            yield from e.references


def finetune(cfg: FinetuneConfig) -> dict:
    """`distilgen finetune`: train a model on the labeled split, early-stopping on dev.

    Returns a summary (best step and dev score, truncation counts, where the model is).
    """
    output_dir = writable_dir(cfg.output_dir)
    check_same_run(cfg, output_dir)
    set_seed(cfg.seed)
    accelerator = make_accelerator(cfg.train, output_dir)

    splits = load_splits(cfg.data, ("train", "unlabeled", "dev"))
    if not splits.get("train"):
        raise TrainingError("finetune needs labeled data: set data.train or data.task")
    tokenizer_dir = output_dir / "tokenizer"
    model_cfg = cfg.model
    if model_cfg.path is None and model_cfg.tokenizer is None and tokenizer_dir.exists():
        model_cfg = dataclasses.replace(model_cfg, tokenizer=str(tokenizer_dir))  # a resumed run keeps its vocabulary
    tm = load_model(model_cfg, texts=lambda: training_text(splits), data=cfg.data)
    if accelerator.is_main_process:  # the checks passed: the directory now holds this run
        save_config(cfg, output_dir / "config.yaml")
        if not tokenizer_dir.exists():
            tm.tokenizer.save_pretrained(tokenizer_dir)

    if cfg.objective == "denoise":
        return _pretrain(cfg, tm, splits, accelerator, output_dir)
    items, truncation = tm.encode(splits["train"], cfg.data.max_source_length, cfg.data.max_target_length)
    for kind in ("sources", "targets"):
        if getattr(truncation, f"{kind}_truncated"):
            log.warning(
                "%d of %d training %s were truncated to data.max_%s_length",
                getattr(truncation, f"{kind}_truncated"),
                getattr(truncation, kind),
                kind,
                kind[:-1],
            )
    evaluate = dev_evaluator(splits.get("dev", []), cfg.train, cfg.decoding, cfg.data)
    state = train(
        tm, items, cross_entropy_loss(cfg.train.label_smoothing), cfg.train, output_dir, accelerator, cfg.seed, evaluate
    )
    summary = {**stage_summary(state, output_dir, cfg.train.metric), "truncation": truncation.as_dict()}
    if accelerator.is_main_process:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _pretrain(
    cfg: FinetuneConfig, tm: TextModel, splits: dict[str, list[Example]], accelerator: Accelerator, output_dir: Path
) -> dict:
    """`finetune` with objective=denoise: windows of the train and unlabeled sources, early-stopped on the
    denoising loss of the dev sources."""
    window = cfg.denoise.window
    whole = cfg.data.max_source_length if cfg.denoise.source == "text" else None
    items = text_windows(tm, splits["train"] + splits.get("unlabeled", []), window, whole)
    dev = text_windows(tm, splits.get("dev", [])[: cfg.train.dev_limit], window, whole)
    loss = denoising_loss(cfg.denoise.rate, cfg.denoise.kind)
    evaluate = None
    if dev:

        def evaluate(model: TextModel) -> float:
            generator = torch.random.get_rng_state()
            torch.manual_seed(0)  # the same noise at every evaluation
            total = tokens = 0.0
            with torch.no_grad():
                for start in range(0, len(dev), cfg.train.batch_size):
                    chunk = dev[start : start + cfg.train.batch_size]
                    batch = {k: v.to(model.device) for k, v in model.collate(chunk).items()}
                    total += loss(model, batch).item()
                    tokens += batch["target_mask"].sum().item()
            torch.random.set_rng_state(generator)
            mean = total / max(tokens, 1)
            return -(mean if cfg.train.metric == "loss" else math.exp(mean))

    state = train(tm, items, loss, cfg.train, output_dir, accelerator, cfg.seed, evaluate)
    summary = {**stage_summary(state, output_dir, cfg.train.metric), "objective": "denoise", "windows": len(items)}
    if accelerator.is_main_process:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


RESUME_MAY_CHANGE = (
    "output_dir",
    "train.log_every",
    "train.trackers",
    "train.checkpoint_every",
    "decoding.batch_size",
    "pts.batch_size",
    "pts.static_cache",
    "student_pts.static_cache",
)
"""Settings a resumed run may change: where it is, logging, and speed knobs that do not change what is trained."""


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {dotted key: value}."""
    if not isinstance(data, dict) or not data:
        return {prefix: data}
    return {k: v for key, value in data.items() for k, v in _flat(value, f"{prefix}.{key}" if prefix else key).items()}


def check_same_run(cfg: Any, output_dir: Path) -> None:
    """Refuse to go on with a run directory that holds training done with other settings, naming the first
    setting that differs: a resumed run continues with what it was trained with, and `config.yaml` must say what
    was trained. A directory where nothing was trained yet (a failed pre-flight check) takes the new settings."""
    saved = output_dir / "config.yaml"
    if not saved.exists() or not any(output_dir.glob("**/trainer_state.json")):
        return
    before = yaml.safe_load(saved.read_text())
    # Through the config class, so that a key added since the run was saved counts as its default; a config this
    # distilgen refuses (saved by an older one) is compared as written.
    with suppress(ConfigError):
        before = to_dict(from_dict(type(cfg), before))
    before = _flat(yaml.safe_load(yaml.safe_dump(before)))
    now = _flat(yaml.safe_load(yaml.safe_dump(to_dict(cfg))))
    changed = [k for k in sorted(before.keys() | now.keys()) if before.get(k) != now.get(k)]
    changed = [k for k in changed if not k.startswith(RESUME_MAY_CHANGE)]
    if changed:
        key = changed[0]
        raise ConfigError(
            key,
            f"{now.get(key)!r} differs from the run already trained in {output_dir} ({before.get(key)!r}): a run "
            "resumes with the settings it was trained with; use a new output_dir (to train on from this run's "
            "model, give its model directory as the model path)",
        )
