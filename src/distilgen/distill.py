"""Distillation methods: each is an objective plus a data schedule, registered by name.

    distilgen distill configs/distill/joint_teaching.yaml
    distilgen distill configs/distill/joint_teaching.yaml method=logits_kd_pt

A method turns a `Context` (teacher, student, data, PT store, config) into a `Plan`: the training items of
each epoch, an optional `prepare` hook that rewrites a step's micro-batches before they are trained on
(student PTs), and the loss. `distill` runs the plan on the shared training loop (`train.train`:
Accelerate, resume after a kill, early stopping on dev), then the study's final stage of plain fine-tuning
on the labeled data.

| method         | targets                                              | loss                       |
|----------------|------------------------------------------------------|----------------------------|
| finetune       | gold                                                 | cross-entropy              |
| logits_kd      | gold                                                 | Logits KD                  |
| noisy_kd       | gold; teacher with dropout, noised student input     | Logits KD                  |
| attention_kd   | gold                                                 | Logits KD + attention rel. |
| seq_kd         | teacher PTs (+ gold)                                 | cross-entropy              |
| logits_kd_pt   | teacher PTs (+ gold)                                 | Logits KD                  |
| student_pt     | fresh student PTs                                    | Logits KD                  |
| joint_teaching | teacher PTs (+ gold), and fresh student PTs          | Logits KD                  |
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from distilgen.checkpoints import model_dir
from distilgen.config import ConfigError, DecodingSpec, DistillConfig, ModelConfig, check, save_config, writable_dir
from distilgen.data import Example, load_splits
from distilgen.generation.decode import source_multiple
from distilgen.generation.hf import HFGenerator, finished_outputs
from distilgen.models import Batch, Encoded, TextModel, inner_model, load_model, model_inputs, pad_rows, round_up
from distilgen.objectives import (
    attention_relation_kd,
    capture_qkv,
    dropout_at,
    logits_kd,
    masked_sum,
    sparse_logits_kd,
)
from distilgen.pseudo_targets import PTRecord, PTStore, pt_schedule, sample_seed
from distilgen.registry import registrar
from distilgen.students import require_same_vocab, vocab_compatible
from distilgen.teachers import load_teacher
from distilgen.teachers.api import tokenizer_dir
from distilgen.token_alignment import Vocabulary, carry_topk, vocabulary_bytes
from distilgen.train import (
    Items,
    LossFn,
    Prepare,
    TrainingError,
    Upcoming,
    check_same_run,
    cross_entropy_loss,
    dev_evaluator,
    make_accelerator,
    noise_source,
    stage_summary,
    train,
    training_text,
)

log = logging.getLogger(__name__)


@dataclass
class Context:
    """What a method may use. The teacher is in inference mode and never updated."""

    cfg: DistillConfig
    teacher: TextModel
    student: TextModel
    splits: dict[str, list[Example]]
    store: PTStore | None = None
    """The PT store, with the PTs this run needs already generated (PT methods only)."""
    teacher_fp: str | None = None
    process_index: int = 0
    """This process under `accelerate launch`: processes sample their student PTs from different seeds."""
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda counts: counts  # noqa: E731
    """Sum of a tensor over the processes (`accelerator.reduce`): step-wide counts for losses normalised per step."""
    teacher_usage: dict[str, Any] | None = None
    """What a paid teacher's requests of this run cost (`generation.api.Usage.summary`)."""


@dataclass
class Plan:
    items: Items
    loss: LossFn
    prepare: Prepare | None = None


def _live_teacher(cfg: DistillConfig) -> frozenset[str]:
    return frozenset({"logits"})


@dataclass(frozen=True)
class Method:
    build: Callable[[Context], Plan]
    teacher_pts: bool = False
    """Needs teacher PTs in the store before training."""
    word_level: bool = True
    """Compares teacher and student distributions, so needs one vocabulary."""
    needs: Callable[[DistillConfig], frozenset[str]] = _live_teacher
    """What it asks of the teacher under a config (`teachers.CAPABILITIES`), checked when the config loads."""


METHODS: dict[str, Method] = {}
_register = registrar(METHODS, "method")


def register_method(
    name: str,
    teacher_pts: bool = False,
    word_level: bool = True,
    needs: Callable[[DistillConfig], frozenset[str]] = _live_teacher,
):
    """`@register_method(name)` on a function Context -> Plan adds a method users pick with `method: name`."""

    def decorate(build: Callable[[Context], Plan]) -> Callable[[Context], Plan]:
        _register(name)(Method(build, teacher_pts, word_level, needs))
        return build

    return decorate


def _pt_kd_needs(cfg: DistillConfig) -> frozenset[str]:
    """Logits KD on teacher PTs: their stored top-k alone, when every target is a PT (no gold) and top-k is
    stored and used; a live teacher otherwise."""
    sparse_only = cfg.kd.use_stored_topk and cfg.pts.topk > 0 and not cfg.pts.include_gold
    return frozenset({"text", "topk"} if sparse_only else {"text", "logits"})


def check_method(cfg: DistillConfig) -> None:
    """The checks of a distill config that depend on its method, a `ConfigError` naming the key: the method exists,
    the teacher can give what it needs (naming the methods that would work), and a temperature other than 1 is not
    asked of stored top-k. Run when a command starts, before anything loads (`distill`, `study`, the CLI)."""
    from distilgen.teachers import TEACHER_KINDS

    check(cfg.method in METHODS, "method", f"unknown method '{cfg.method}'; choose one of: {', '.join(METHODS)}")
    method, capabilities = METHODS[cfg.method], TEACHER_KINDS[cfg.teacher.kind].capabilities
    works = [name for name, m in METHODS.items() if m.needs(cfg) <= capabilities]
    cfg.teacher.require(method.needs(cfg), f"method '{cfg.method}'", works)
    stored_topk = method.teacher_pts and method.word_level and cfg.kd.use_stored_topk and cfg.pts.topk > 0
    check(
        not (stored_topk and cfg.kd.temperature != 1),
        "kd.temperature",
        f"{cfg.kd.temperature} with stored teacher top-k (pts.topk), which holds the teacher at temperature 1 "
        "only (its tail mass at another temperature is unknown): set kd.use_stored_topk=false to run the "
        "teacher live",
    )  # PTs already stored with top-k are checked before training (`prepare_pts`)


# ---------------------------------------------------------------------------------------------
# Schedules: which targets each step sees
# ---------------------------------------------------------------------------------------------


def is_student_step(step: int, alpha: float) -> bool:
    """Joint-Teaching's step mixing: whether optimizer step `step` (0-based) trains on fresh student PTs.

    Exactly floor(n * (1 - alpha)) of the first n steps do, spread evenly (alpha 0.5: steps 1, 3, 5, ...;
    alpha 0.75: every 4th). Exact rational arithmetic, so no step drifts for alphas like 0.7.
    """
    share = 1 - Fraction(str(alpha))
    return math.floor((step + 1) * share) > math.floor(step * share)


def _pt_examples(ctx: Context) -> list[Example]:
    """The inputs that get teacher PTs: labeled, plus unlabeled unless pts.unlabeled is false."""
    return ctx.splits["train"] + (ctx.splits.get("unlabeled", []) if ctx.cfg.pts.unlabeled else [])


def _spec(ctx: Context) -> DecodingSpec:
    from distilgen.pt_generation import resolve_spec

    return resolve_spec(ctx.cfg.pts.spec)


def _pts_per_input(ctx: Context) -> int:
    return ctx.cfg.pts.k or _spec(ctx).num_per_input


class _Encoder:
    """Encodes sources and targets for the student once, and teacher PTs from their stored tokens."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.student = ctx.student
        self.data = ctx.cfg.data
        teacher_tokenizer = ctx.teacher.tokenizer
        self.same_vocab = teacher_tokenizer is not None and vocab_compatible(teacher_tokenizer, ctx.student.tokenizer)
        self.topk = METHODS[ctx.cfg.method].word_level and ctx.cfg.kd.use_stored_topk
        self._sources: dict[str, list[int]] = {}
        self._gold: dict[str, list[int]] = {}

    def gold(self, examples: Sequence[Example]) -> list[Encoded]:
        self._cache(examples)
        return [Encoded(e.id, self._sources[e.id], self._gold[e.id]) for e in examples]

    def placeholder(self, examples: Sequence[Example]) -> list[Encoded]:
        """Sources with a one-token target (EOS), for methods whose targets come from `prepare`."""
        self._cache(examples)
        eos = [self.student.tokenizer.eos_token_id]
        return [Encoded(e.id, self._sources[e.id], eos) for e in examples]

    @functools.cached_property
    def vocab(self) -> Vocabulary:
        return Vocabulary(vocabulary_bytes(self.student.tokenizer))

    def pt(self, example_id: str, record: PTRecord) -> Encoded:
        """A teacher PT as a student target: the teacher's own tokens (same vocabulary), else its text re-encoded;
        an endpoint's top-k (token bytes) carried onto the student's tokens (`token_alignment.carry_topk`)."""
        limit = self.data.max_target_length
        if record.token_bytes is not None or not self.same_vocab:
            (encoded,), _ = self.student.encode([Example(example_id, "", record.text, ())], 8, limit)
            if record.topk_bytes is None or not self.topk:
                return Encoded(example_id, self._sources[example_id], encoded.target)
            topk = [list(zip(c, p, strict=True)) for c, p in zip(record.topk_bytes, record.topk_logprobs, strict=True)]
            ids, logprobs = carry_topk(record.token_bytes, topk, encoded.target, self.vocab, exact=self.same_vocab)
            return Encoded(example_id, self._sources[example_id], encoded.target, *_padded_topk(ids, logprobs))
        if self.same_vocab:  # too long: keep the first limit - 1 positions and the last (EOS), as `encode` does
            keep = list(range(len(record.token_ids)))
            keep = keep if len(keep) <= limit else [*keep[: limit - 1], keep[-1]]
            target = [record.token_ids[i] for i in keep]
            if record.topk_ids is None:
                return Encoded(example_id, self._sources[example_id], target)
            rows = torch.tensor(keep)
            topk_ids = torch.tensor(record.topk_ids, dtype=torch.long)[rows]
            topk_logprobs = torch.tensor(record.topk_logprobs, dtype=torch.float32)[rows]
            return Encoded(example_id, self._sources[example_id], target, topk_ids, topk_logprobs)

    def _cache(self, examples: Sequence[Example]) -> None:
        todo = [e for e in examples if e.id not in self._sources]
        encoded, _ = self.student.encode(todo, self.data.max_source_length, self.data.max_target_length)
        for e, enc in zip(todo, encoded, strict=True):
            self._sources[e.id] = enc.source
            self._gold[e.id] = enc.target


def _padded_topk(ids: list[list[int]], logprobs: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, k) tensors of per-position candidate lists of different lengths, padded with the position's first id at
    log-probability -inf (no mass, so no term in sparse KD)."""
    k = max(map(len, ids))
    id_rows = [row + [row[0]] * (k - len(row)) for row in ids]
    logprob_rows = [row + [-math.inf] * (k - len(row)) for row in logprobs]
    return torch.tensor(id_rows, dtype=torch.long), torch.tensor(logprob_rows, dtype=torch.float32)


def gold_items(ctx: Context) -> list[Encoded]:
    return _Encoder(ctx).gold(ctx.splits["train"])


def teacher_pt_items(ctx: Context) -> Callable[[int], list[Encoded]]:
    """Items of epoch e: PT number e % K of every PT input, plus the gold targets (pts.include_gold)."""
    encoder, examples = _Encoder(ctx), _pt_examples(ctx)
    encoder.placeholder(examples)  # encode every source once
    pts = ctx.store.get(ctx.teacher_fp, _spec(ctx), [e.source for e in examples])
    k = _pts_per_input(ctx)
    gold = {e.id: g for e, g in zip(ctx.splits["train"], encoder.gold(ctx.splits["train"]), strict=True)}

    def items(epoch: int) -> list[Encoded]:
        out = []
        for target in pt_schedule(examples, pts, k, epoch, ctx.cfg.pts.include_gold):
            out.append(gold[target.example_id] if target.kind == "gold" else encoder.pt(target.example_id, target.pt))
        return out

    return items


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def _subset(batch: Batch, rows: torch.Tensor) -> Batch:
    return {k: v[rows] for k, v in batch.items()}


def _teacher_logits(ctx: Context, batch: Batch) -> torch.Tensor:
    on_device = {k: v.to(ctx.teacher.device) for k, v in model_inputs(batch).items()}
    with torch.no_grad():
        return ctx.teacher.target_logits(on_device)


def kd_per_token(ctx: Context, student_logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(B, T) word-level KD of the student against the teacher along the batch's targets.

    Rows carrying stored teacher top-k (`topk_rows`) use sparse KD when kd.use_stored_topk; the other rows run
    the live teacher, in one pass.
    """
    kd = ctx.cfg.kd
    mask = batch["target_mask"]
    stored = (
        batch["topk_rows"].bool()
        if kd.use_stored_topk and "topk_rows" in batch
        else torch.zeros_like(mask[:, 0]).bool()
    )
    per_token = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    if stored.any():
        sparse = sparse_logits_kd(
            student_logits[stored], batch["topk_ids"][stored], batch["topk_logprobs"][stored], mask[stored],
            temperature=kd.temperature, divergence=kd.divergence, beta=kd.beta, alpha=kd.alpha,
        )  # fmt: skip
        per_token = per_token.index_put((stored.nonzero()[:, 0],), sparse.float())
    live = ~stored
    if live.any():
        teacher_logits = _teacher_logits(ctx, _subset(batch, live) if not live.all() else batch)
        dense = logits_kd(
            student_logits[live], teacher_logits.to(student_logits.device), mask[live], kd.divergence, kd.temperature,
            beta=kd.beta, alpha=kd.alpha,
        )  # fmt: skip
        per_token = per_token.index_put((live.nonzero()[:, 0],), dense.float())
    return per_token


def _weighted_sum(per_token: torch.Tensor, batch: Batch) -> torch.Tensor:
    if "row_weight" in batch:
        per_token = per_token * batch["row_weight"][:, None]
    return masked_sum(per_token, batch["target_mask"])


def kd_loss(ctx: Context) -> LossFn:
    def loss(tm: TextModel, batch: Batch) -> torch.Tensor:
        return _weighted_sum(kd_per_token(ctx, tm.target_logits(batch), batch), batch)

    return loss


def noisy_kd_loss(ctx: Context) -> LossFn:
    """Logits KD with a noised student input and a teacher running with dropout (Noisy KD)."""
    noise = ctx.cfg.noise

    def loss(tm: TextModel, batch: Batch) -> torch.Tensor:
        noised = noise_source(tm, batch, noise.token_rate, noise.token_kind)
        student_logits = tm.target_logits(noised)
        with dropout_at(ctx.teacher.model, noise.teacher_dropout):
            per_token = kd_per_token(ctx, student_logits, batch)
        return _weighted_sum(per_token, batch)

    return loss


def attention_kd_plan(ctx: Context) -> Plan:
    """Logits KD plus MiniLMv2 attention relations of the last self-attention layer.

    Both terms are sums over the optimizer step divided by the step's count (of target tokens; of the positions
    the relations are taken at), so the loss does not depend on how the step is split into micro-batches or
    processes: `prepare` counts the step's positions, and the loss scales its relation sum by target tokens /
    relation positions, since the loop divides every loss by the step's target tokens."""
    att = ctx.cfg.attention
    which = att.which if ctx.student.is_encoder_decoder else "decoder"
    scale: dict[str, torch.Tensor] = {}  # "relation": set by `prepare` for the step being trained

    def positions(tm: TextModel, batch: Batch) -> torch.Tensor:  # (B, S') where the relations are taken
        if which == "encoder":
            return batch["source_mask"]
        if tm.is_encoder_decoder:
            return batch["target_mask"]
        # The prompt, then each target token but the row's last: `target_logits` feeds the target shifted by one,
        # so a row's last token is an input only when a longer row pads the batch; leaving it out for every row
        # keeps the positions, hence the loss, the same however rows are grouped into micro-batches.
        return torch.cat([batch["source_mask"], batch["target_mask"][:, 1:]], dim=1)

    def prepare(tm: TextModel, step: int, batches: list[Batch], upcoming: Upcoming) -> list[Batch]:
        counts = torch.stack(
            [sum(b["target_mask"].sum() for b in batches), sum(positions(tm, b).sum() for b in batches)]
        )
        targets, relations = ctx.reduce(counts.float()).clamp_min(1)
        scale["relation"] = targets / relations
        return batches

    def loss(tm: TextModel, batch: Batch) -> torch.Tensor:
        with capture_qkv(inner_model(tm.model), which) as s, capture_qkv(ctx.teacher.model, which) as t:
            student_logits = tm.target_logits(batch)
            per_token = kd_per_token(ctx, student_logits, model_inputs(batch))  # live: its attention is captured
        at = positions(tm, batch)
        relations = attention_relation_kd(
            s["q"], s["k"], s["v"], t["q"].to(s["q"].dtype), t["k"].to(s["q"].dtype), t["v"].to(s["q"].dtype),
            at, att.relation_heads, causal=which == "decoder",
        )  # fmt: skip
        return _weighted_sum(per_token, batch) + att.weight * masked_sum(relations, at) * scale["relation"]

    return Plan(gold_items(ctx), loss, prepare)


# ---------------------------------------------------------------------------------------------
# Student PTs
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_student_pts(ctx: Context, tm: TextModel, window: dict[int, list[Batch]]) -> dict[int, list[Batch]]:
    """Each step's micro-batches with fresh PTs of the current student `tm` as targets, sampled for all the
    window's sources in one batch of the student's generator (eval mode, KV cache, no grad; with `static_cache` the
    compiled decoder step follows the weights as they train, since the optimizer updates them in place).

    Row r of step s (counting across the step's micro-batches) is sampled with seed
    `sample_seed(seed, "student-step-s", r)` (process p > 0: "student-step-s-process-p", so that processes do
    not share noise): how steps are grouped into windows does not change a row's draw, and a resumed run draws
    the PTs the uninterrupted one would have, given the same weights.
    """
    cfg = ctx.cfg.student_pts
    generator = HFGenerator(tm, static_cache=cfg.static_cache, own_rules=False)
    process = f"-process-{ctx.process_index}" if ctx.process_index else ""
    seeds = [
        sample_seed(ctx.cfg.seed, f"student-step-{step}{process}", r)
        for step, batches in window.items()
        for r in range(sum(b["source_ids"].shape[0] for b in batches))
    ]
    device = tm.device
    parts = [b for batches in window.values() for b in batches]
    keys, pad, left = ("source_ids", "source_mask"), tm.tokenizer.pad_token_id, tm.layout.pad_source_left
    sources = _stack_rows(parts, keys, pad, left, multiple=source_multiple(generator.static))
    was_training = tm.model.training
    tm.model.eval()
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        generated = generator.run(sources, cfg.settings(), seeds)
    tm.model.train(was_training)
    limit = ctx.cfg.data.max_target_length
    _, written = finished_outputs(tm, tm.output_tokens(generated))  # the task's output: its first line...
    targets = iter([tm.target_ids(tokens)[:limit] for tokens in written])
    out: dict[int, list[Batch]] = {}
    pad = tm.tokenizer.pad_token_id
    for step, batches in window.items():
        out[step] = []
        for b in batches:
            ids, mask = pad_rows([next(targets) for _ in range(b["source_ids"].shape[0])], pad, left=False)
            fresh = {"target_ids": ids.to(device), "target_mask": mask.to(device)}
            out[step].append({"source_ids": b["source_ids"], "source_mask": b["source_mask"], **fresh})
    return out


def _stack_rows(
    batches: Sequence[Batch], keys: Sequence[str], pad_id: int, pad_source_left: bool, multiple: int = 1
) -> Batch:
    """The batches' rows stacked, for each of `keys`, padded to the widest rounded up to a multiple of
    `multiple` (and `row_weight` when they have it)."""
    out = {}
    for key in keys:
        width = round_up(max(b[key].shape[1] for b in batches), multiple)
        fill = pad_id if key.endswith("ids") else 0
        left = pad_source_left and key.startswith("source")
        out[key] = torch.cat(
            [
                torch.nn.functional.pad(x, (width - x.shape[1], 0) if left else (0, width - x.shape[1]), value=fill)
                for x in (b[key] for b in batches)
            ]
        )
    if all("row_weight" in b for b in batches):
        out["row_weight"] = torch.cat([b["row_weight"] for b in batches])
    return out


def _later_steps(step: int, count: int, is_student: Callable[[int], bool]) -> list[int]:
    """The next `count` student-PT steps after `step`."""
    later = []
    while len(later) < count:
        step += 1
        if is_student(step):
            later.append(step)
    return later


def student_pt_prepare(ctx: Context, alpha: float) -> Prepare:
    """Joint-Teaching's `prepare`: per the mixing mode, swap in or add fresh student PTs.

    With `student_pts.refresh_every` = N > 1, the first student-PT step of a window samples the PTs of the next
    N - 1 student-PT steps of the epoch too, and keeps them until their step comes.
    """
    cfg = ctx.cfg.student_pts
    by_step = cfg.mixing == "steps" or alpha == 0

    def is_student(step: int) -> bool:
        return is_student_step(step, alpha) if by_step else alpha < 1

    ahead: dict[int, list[Batch]] = {}

    def prepare(tm: TextModel, step: int, batches: list[Batch], upcoming: Upcoming) -> list[Batch]:
        if not is_student(step):
            return batches
        if step not in ahead:
            ahead.clear()
            window = {step: batches, **upcoming(_later_steps(step, cfg.refresh_every - 1, is_student))}
            ahead.update(sample_student_pts(ctx, tm, window))
        fresh = ahead.pop(step)
        if by_step:
            return fresh
        # Each half's loss is its mean over the step's tokens of that half, mixed alpha : 1 - alpha whatever the
        # lengths: rows are weighted alpha * N / N_teacher and (1 - alpha) * N / N_student, as the loop divides
        # by the step's N = N_teacher + N_student tokens.
        counts = torch.stack([sum(b["target_mask"].sum() for b in half) for half in (batches, fresh)]).float()
        teacher_tokens, student_tokens = ctx.reduce(counts).clamp_min(1)
        tokens = teacher_tokens + student_tokens
        weights = (alpha * tokens / teacher_tokens, (1 - alpha) * tokens / student_tokens)
        mixed = []
        keys = ("source_ids", "source_mask", "target_ids", "target_mask")
        pad, left = tm.tokenizer.pad_token_id, tm.layout.pad_source_left
        for teacher_half, student_half in zip(batches, fresh, strict=True):
            rows = teacher_half["source_ids"].shape[0]
            teacher_half = model_inputs(teacher_half)  # stacked with student PTs, which have no stored top-k
            teacher_half["row_weight"] = weights[0].expand(rows)
            student_half = {**student_half, "row_weight": weights[1].expand(rows)}
            mixed.append(_stack_rows([teacher_half, student_half], keys, pad, left))
        return mixed

    return prepare


# ---------------------------------------------------------------------------------------------
# The methods
# ---------------------------------------------------------------------------------------------


@register_method("finetune", word_level=False, needs=lambda cfg: frozenset())
def _finetune(ctx: Context) -> Plan:
    return Plan(gold_items(ctx), cross_entropy_loss(ctx.cfg.train.label_smoothing))


@register_method("logits_kd")
def _logits_kd(ctx: Context) -> Plan:
    return Plan(gold_items(ctx), kd_loss(ctx))


@register_method("noisy_kd")
def _noisy_kd(ctx: Context) -> Plan:
    return Plan(gold_items(ctx), noisy_kd_loss(ctx))


@register_method("attention_kd")
def _attention_kd(ctx: Context) -> Plan:
    return attention_kd_plan(ctx)


@register_method("seq_kd", teacher_pts=True, word_level=False, needs=lambda cfg: frozenset({"text"}))
def _seq_kd(ctx: Context) -> Plan:
    return Plan(teacher_pt_items(ctx), cross_entropy_loss(ctx.cfg.train.label_smoothing))


@register_method("logits_kd_pt", teacher_pts=True, needs=_pt_kd_needs)
def _logits_kd_pt(ctx: Context) -> Plan:
    return Plan(teacher_pt_items(ctx), kd_loss(ctx))


@register_method("student_pt")
def _student_pt(ctx: Context) -> Plan:
    items = _Encoder(ctx).placeholder(_pt_examples(ctx))
    return Plan(items, kd_loss(ctx), student_pt_prepare(ctx, alpha=0.0))


@register_method("joint_teaching", teacher_pts=True, needs=lambda cfg: frozenset({"text", "logits"}))
def _joint_teaching(ctx: Context) -> Plan:
    return Plan(teacher_pt_items(ctx), kd_loss(ctx), student_pt_prepare(ctx, ctx.cfg.student_pts.alpha))


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def _load_student(cfg: DistillConfig, splits: dict[str, list[Example]]) -> TextModel:
    """The student; one built from `arch` gets the teacher's tokenizer unless it names one or asks for its own
    (`tokenizer: task`, sequence-level methods): word-level KD needs one vocabulary."""
    model_cfg = cfg.student
    if model_cfg.path is None and model_cfg.tokenizer is None:
        if cfg.teacher.local:
            tokenizer = cfg.teacher.tokenizer or model_dir(cfg.teacher)
        else:
            check(cfg.teacher.tokenizer is not None, "student.tokenizer", "the api teacher names no tokenizer: set "
                  "the student's (a directory or hub id, or `task`), or the teacher's (teacher.tokenizer)")  # fmt: skip
            tokenizer = tokenizer_dir(cfg.teacher)
        model_cfg = dataclasses.replace(model_cfg, tokenizer=tokenizer)
    return load_model(model_cfg, texts=lambda: training_text(splits), key="student", data=cfg.data)


def prepare_pts(ctx: Context, state: Accelerator) -> None:
    """Generate the teacher PTs the method needs that the store lacks (sharded across processes)."""
    from distilgen.pt_generation import generate_pts, pt_batch_size

    cfg = ctx.cfg
    ctx.store = PTStore(cfg.pts.store or Path(cfg.output_dir) / "pts")
    ctx.teacher_fp = ctx.teacher.fingerprint(cfg.data.max_source_length, cfg.data.template)
    spec = _spec(ctx)
    batch_size = pt_batch_size(ctx.teacher, cfg.pts.batch_size)
    generator = ctx.teacher.generator(cfg.data.max_source_length, batch_size, cfg.pts.static_cache)
    usage = generator.usage if ctx.teacher.paid else None
    if usage is not None:
        generator.share_budget(state.num_processes)
    report = generate_pts(
        generator, ctx.store, ctx.teacher_fp, spec, [e.source for e in _pt_examples(ctx)],
        batch_size=batch_size, topk=cfg.pts.topk, process_index=state.process_index,
        num_processes=state.num_processes, barrier=state.wait_for_everyone, progress=state.is_local_main_process,
        journal=ctx.teacher.paid, postfix=usage.postfix if usage else None,
    )  # fmt: skip
    state.wait_for_everyone()
    log.info("teacher PTs: %d requested, %d generated here", report.requested, report.generated)
    if usage is not None:
        ctx.teacher_usage = {**usage.summary(), "pts_generated": report.generated, "seconds": round(report.seconds, 1)}
        log.info("teacher endpoint: %s", ctx.teacher_usage)
    stats = ctx.store.pair_stats(ctx.teacher_fp, spec)
    kd, method = cfg.kd, METHODS[cfg.method]
    if method.word_level and kd.use_stored_topk and kd.temperature != 1 and stats is not None and stats.topk:
        raise ConfigError(
            "kd.temperature",
            f"{kd.temperature}, but the PTs in {ctx.store.root} hold the teacher's top-{stats.topk} at temperature 1 "
            "(its tail mass at another temperature is unknown): set kd.use_stored_topk=false to run the teacher live",
        )
    live = "logits" in ctx.teacher.capabilities
    if not live and method.word_level and kd.use_stored_topk and (stats is None or stats.topk < cfg.pts.topk):
        raise ConfigError(
            "pts.topk",
            f"{cfg.pts.topk}, but the PTs in {ctx.store.root} hold top-{stats.topk if stats else 0} (stored before "
            "with less), and this teacher cannot be run here: use a new pts.store, or method seq_kd",
        )
    if cfg.pts.topk and stats is not None and stats.topk < cfg.pts.topk:
        log.warning(
            "pts.topk=%d, but PTs already in %s hold top-%d: they are not generated again, and steps on them run "
            "the teacher (use a new pts.store to have top-%d stored)",
            cfg.pts.topk, ctx.store.root, stats.topk, cfg.pts.topk,
        )  # fmt: skip


def distill(cfg: DistillConfig) -> dict[str, Any]:
    """`distilgen distill`: the method's stage, then `final_finetune_epochs` of fine-tuning; resumable."""
    check_method(cfg)
    output_dir = writable_dir(cfg.output_dir)
    check_same_run(cfg, output_dir)
    set_seed(cfg.seed)
    method = METHODS[cfg.method]
    accelerator = make_accelerator(cfg.train, output_dir)
    splits = load_splits(cfg.data, ("train", "unlabeled", "dev"))
    unlabeled_only = method.teacher_pts and cfg.pts.unlabeled and bool(splits.get("unlabeled"))
    if not splits.get("train") and not unlabeled_only:
        raise TrainingError(
            "distillation needs labeled data (data.train or data.task), or unlabeled inputs (data.unlabeled) for a "
            "method that trains on teacher PTs (seq_kd, logits_kd_pt)"
        )
    splits.setdefault("train", [])
    teacher = load_teacher(cfg.teacher, cfg.precision, accelerator.device, cfg.data)
    student = _load_student(cfg, splits)
    if method.word_level and cfg.teacher.local:  # an endpoint's top-k is carried onto any vocabulary
        require_same_vocab(student.tokenizer, teacher.tokenizer, cfg.method)
    if accelerator.is_main_process:  # the checks passed: the directory now holds this run
        save_config(cfg, output_dir / "config.yaml")
    reduce = functools.partial(accelerator.reduce, reduction="sum")
    ctx = Context(cfg, teacher, student, splits, process_index=accelerator.process_index, reduce=reduce)
    if method.teacher_pts:
        prepare_pts(ctx, accelerator)
    evaluate = dev_evaluator(splits.get("dev", []), cfg.train, cfg.decoding, cfg.data)

    plan = method.build(ctx)
    stage = output_dir / "distill"
    state = train(
        student, plan.items, plan.loss, cfg.train, stage, accelerator, cfg.seed, evaluate, prepare=plan.prepare
    )
    summary = {"method": cfg.method, "distill": stage_summary(state, stage, cfg.train.metric)}
    if ctx.teacher_usage is not None:
        summary["teacher_api"] = ctx.teacher_usage
    final = stage / "model"
    if not splits["train"] and cfg.final_finetune_epochs > 0:
        log.info("no labeled data: the final fine-tuning stage (final_finetune_epochs) is skipped")
    if cfg.final_finetune_epochs > 0 and splits["train"] and (cfg.method != "finetune" or cfg.equal_budget):
        tuned = load_model(ModelConfig(path=str(final)), data=cfg.data)
        train_cfg = dataclasses.replace(cfg.train, epochs=cfg.final_finetune_epochs, max_steps=None)
        stage = output_dir / "finetune"
        ft_state = train(
            tuned, gold_items(dataclasses.replace(ctx, student=tuned)), cross_entropy_loss(cfg.train.label_smoothing),
            train_cfg, stage, accelerator, cfg.seed, evaluate,
        )  # fmt: skip
        summary["finetune"] = stage_summary(ft_state, stage, cfg.train.metric)
        final = _better(summary, cfg.train.metric)
    summary["model"] = str(final)
    if accelerator.is_main_process:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _better(summary: dict, metric: str) -> Path:
    """The final model: the fine-tuning stage's, unless it scored worse on dev than the method's own."""
    from distilgen.train import LOWER_IS_BETTER

    key = f"best_dev_{metric}"
    before, after = summary["distill"][key], summary["finetune"][key]
    if before is None or after is None:
        return Path(summary["finetune"]["model"])
    worse = after > before if metric in LOWER_IS_BETTER else after < before
    return Path(summary["distill" if worse else "finetune"]["model"])
