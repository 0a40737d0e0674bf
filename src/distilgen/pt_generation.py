"""Pseudo-target generation: the teacher annotates inputs, and only what the store lacks is generated.

    distilgen generate configs/generate/sample4.yaml
    accelerate launch --num_processes 8 -m distilgen.cli generate configs/generate/sample4.yaml

`generate_pts` is the library call. It asks the store which PTs are missing, turns them into rows (one
per sampled PT, one per input for greedy and beam search), sorts the rows by source length so that each
batch holds inputs of similar length (little padding, and outputs that finish together), and adds the
results to the store every `shard_size` PTs. A run killed at any point loses at most the PTs not yet in a
shard; rerunning generates exactly those, with the same per-PT seeds, so it ends with the same PTs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from distilgen.config import ConfigError, DecodingSpec, GenerateConfig
from distilgen.data import load_splits
from distilgen.decoding import decode, source_multiple, use_static_cache
from distilgen.models import Encoded, TextModel
from distilgen.pseudo_targets import MissingPT, PTRecord, PTStore, get_spec, sample_seed
from distilgen.teachers import load_teacher
from distilgen.teachers.hf import teacher_fingerprint  # noqa: F401 (its earlier home: imports keep working)

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------

CLAIM_POLL_S = 2.0
"""Seconds between looks at the store while waiting for inputs another process is generating."""


@dataclass(frozen=True)
class Row:
    """One input to decode and the PT indices it lacks (its samples, or the ranks of its beams)."""

    input_key: str
    source: list[int]
    sample_indices: tuple[int, ...]


@dataclass
class GenerationReport:
    """What one `generate_pts` call did on this process."""

    requested: int
    """PTs asked for (inputs x PTs per input, repeated inputs counted once)."""
    missing: int
    """PTs the store lacked when the call began (all processes)."""
    generated: int
    """PTs this process generated and stored."""
    sequences: int
    """Sequences this process decoded (beam search returns several PTs per sequence)."""
    tokens: int
    """PT tokens this process generated."""
    seconds: float

    @property
    def sequences_per_s(self) -> float:
        return self.sequences / max(self.seconds, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def plan_rows(todo: Sequence[MissingPT], spec: DecodingSpec, encoded: dict[str, list[int]]) -> list[Row]:
    """One row per input with missing PTs, longest source first (ties in key order, so every process computes
    the same plan); sampled rows are grouped by how many samples they lack, so a batch shares that number.

    The PTs of an input come from one `generate` call: its K samples as K return sequences (the encoder or
    prompt runs once), its beams from one beam search.
    """
    by_key: dict[str, list[int]] = {}
    for m in todo:
        by_key.setdefault(m.input_key, []).append(m.sample_index)
    rows = [Row(key, encoded[key], tuple(sorted(indices))) for key, indices in by_key.items()]
    group = (lambda r: len(r.sample_indices)) if spec.kind == "sample" else (lambda r: 0)
    return sorted(rows, key=lambda r: (-group(r), -len(r.source), r.input_key))


def plan_batches(rows: Sequence[Row], spec: DecodingSpec, batch_size: int) -> list[list[Row]]:
    """Consecutive rows in batches of at most `batch_size` sequences (a sampled row counts its samples, a beam
    row its beams); a batch never mixes sampled rows lacking different numbers of samples."""
    batches: list[list[Row]] = []
    used = 0
    for row in rows:
        cost = _sequences(spec, row)
        same_group = batches and (
            spec.kind != "sample" or len(batches[-1][0].sample_indices) == len(row.sample_indices)
        )
        if same_group and used + cost <= batch_size:
            batches[-1].append(row)
            used += cost
        else:
            batches.append([row])
            used = cost
    return batches


def _sequences(spec: DecodingSpec, row: Row) -> int:
    return {"greedy": 1, "beam": spec.num_beams, "sample": len(row.sample_indices)}[spec.kind]


def generate_pts(
    tm: TextModel,
    store: PTStore,
    teacher_fp: str,
    spec: DecodingSpec,
    sources: Sequence[str],
    *,
    batch_size: int = 64,
    max_source_length: int = 512,
    topk: int = 0,
    shard_size: int = 2048,
    static_cache: str = "auto",
    process_index: int = 0,
    num_processes: int = 1,
    barrier=None,
    progress: bool = True,
) -> GenerationReport:
    """Generate the PTs of `sources` under `spec` that `store` lacks, and add them to it.

    Args:
        tm: the teacher, on its device and in its dtype.
        teacher_fp: the teacher's `fingerprint(...)`, the store's key of its PTs.
        topk: also store the teacher's top-k log-probs at every PT token (0: none).
        shard_size: PTs buffered before they are written as one shard.
        static_cache: "on", "off" or "auto" (on when the teacher is on a GPU with Triton); see
            `GenerateConfig.static_cache`.
        process_index, num_processes: this process takes rows process_index, process_index + n, ... of the plan.
        barrier: called after every process has read the store and before any writes (`wait_for_everyone`), so
            that all processes plan the same rows.
    """
    start = time.perf_counter()
    todo = store.missing(teacher_fp, spec, sources)
    requested = len(dict.fromkeys(sources)) * spec.num_per_input
    if barrier is not None:
        barrier()
    by_key = {m.input_key: m.source for m in todo}
    encoded = dict(zip(by_key, _source_ids(tm, list(by_key.values()), max_source_length), strict=True))
    rows = plan_rows(todo, spec, encoded)[process_index::num_processes]
    mine = list(dict.fromkeys(by_key[r.input_key] for r in rows))  # this process's share of the inputs
    report = GenerationReport(requested, len(todo), 0, 0, 0, 0.0)
    bar = tqdm(total=sum(_sequences(spec, r) for r in rows), desc=f"generate {spec.name}", unit="seq",
               disable=not progress or not rows)  # fmt: skip
    was_training = tm.model.training
    tm.model.eval()
    static = use_static_cache(static_cache, tm.device)
    buffer: list[PTRecord] = []
    waited = False
    try:
        while rows:
            decoded = 0
            for batch in plan_batches(rows, spec, batch_size):
                # See [claims note] in pseudo_targets: skip what another writer holds, or stored since the plan.
                granted = store.claim(teacher_fp, spec.fingerprint(), [r.input_key for r in batch])
                still = {m.input_key for m in store.missing(teacher_fp, spec, [by_key[r.input_key] for r in batch])}
                batch = [r for r in batch if r.input_key in granted & still]
                if not batch:
                    continue
                records = _generate_batch(tm, spec, batch, topk, static and spec.kind != "beam")
                buffer += records
                sequences = sum(_sequences(spec, r) for r in batch)
                decoded += sequences
                report.sequences += sequences
                report.tokens += sum(len(r.token_ids) for r in records)
                if len(buffer) >= shard_size:
                    report.generated += _flush(store, teacher_fp, spec, buffer)
                bar.update(sequences)
                bar.set_postfix(tok_s=f"{report.tokens / (time.perf_counter() - start):.0f}", stored=report.generated)
            report.generated += _flush(store, teacher_fp, spec, buffer)
            store.release()
            # What is still missing of this share was claimed by another writer: wait for it, or take it over
            # once that writer is gone.
            rows = plan_rows(store.missing(teacher_fp, spec, mine), spec, encoded)
            if rows and not decoded:
                if not waited:
                    log.info("waiting for %d inputs that another process is generating", len(rows))
                    waited = True
                time.sleep(CLAIM_POLL_S)
            bar.total = bar.n + sum(_sequences(spec, r) for r in rows)
    finally:
        store.release()
        bar.close()
        tm.model.train(was_training)
    report.seconds = time.perf_counter() - start
    return report


def _flush(store: PTStore, teacher_fp: str, spec: DecodingSpec, buffer: list[PTRecord]) -> int:
    count = len(buffer)
    if buffer:
        store.add(teacher_fp, spec, buffer)
        buffer.clear()
    return count


def _source_ids(tm: TextModel, sources: list[str], max_source_length: int) -> list[list[int]]:
    from distilgen.data import Example

    examples = [Example(str(i), source, None, ()) for i, source in enumerate(sources)]
    return [e.source for e in tm.encode(examples, max_source_length, targets=False)[0]]


@torch.no_grad()
def _generate_batch(
    tm: TextModel, spec: DecodingSpec, rows: Sequence[Row], topk: int, static_cache: bool = False
) -> list[PTRecord]:
    """Decode one batch of rows and turn the outputs into PT records (with top-k log-probs when asked).

    Greedy and sampled PTs come from `distilgen.decoding.decode`, beams from `generate`. With `static_cache`
    the sources are padded to a multiple of `decoding.SOURCE_BUCKET` tokens, so that the compiled decoder step (one per
    cross-attention length) is reused across batches.
    """
    items = [Encoded("", r.source, []) for r in rows]
    collated = tm.collate(items, source_multiple=source_multiple(static_cache))
    batch = {k: v.to(tm.device) for k, v in collated.items()}
    seeds = steps_topk = None
    if spec.kind == "beam":
        kwargs = {"pad_token_id": tm.tokenizer.pad_token_id, "eos_token_id": tm.tokenizer.eos_token_id}
        generated = tm.layout.generate(tm.model, batch, **spec.generate_kwargs(), **kwargs)
        per_row = spec.num_return
    else:
        if spec.kind == "sample":
            seeds = [sample_seed(spec.seed, r.input_key, i) for r in rows for i in r.sample_indices]
        steps_topk = StepTopK(topk) if topk else None
        generated = decode(tm, batch, spec, seeds, static=static_cache, on_scores=steps_topk)
        per_row = len(rows[0].sample_indices) if seeds is not None else 1  # the same for every row of a batch
    contents = tm.output_tokens(generated)
    targets = [tm.target_ids(ids) for ids in contents]
    top_ids = top_logprobs = None
    if topk:
        sources = [r.source for r in rows for _ in range(per_row)]
        top_ids, top_logprobs = _pt_topk(tm, sources, targets, generated, steps_topk, topk)
    records = []
    for b, row in enumerate(rows):
        for j, index in enumerate(row.sample_indices):
            at = b * per_row + (j if spec.kind == "sample" else index)
            records.append(
                PTRecord(
                    input_key=row.input_key,
                    sample_index=index,
                    text=tm.tokenizer.decode(contents[at], skip_special_tokens=True).strip(),
                    token_ids=targets[at],
                    seed=seeds[at] if seeds is not None else None,
                    topk_ids=top_ids[at] if top_ids is not None else None,
                    topk_logprobs=top_logprobs[at] if top_logprobs is not None else None,
                )
            )
    return records


class StepTopK:
    """`decode`'s `on_scores`: the k most likely tokens and their log-probs at every decoding step, kept on the
    device and fetched once."""

    def __init__(self, k: int):
        self.k, self.ids, self.logprobs = k, [], []

    def __call__(self, scores: torch.Tensor) -> None:
        logprobs, ids = torch.log_softmax(scores, dim=-1).topk(min(self.k, scores.shape[-1]), dim=-1)
        self.ids.append(ids)
        self.logprobs.append(logprobs)

    def rows(self, width: int) -> tuple[list[list[list[int]]], list[list[list[float]]]]:
        """(B, width, k) ids and log-probs of the first `width` steps, as lists."""
        ids, logprobs = torch.stack(self.ids[:width], dim=1), torch.stack(self.logprobs[:width], dim=1)
        return ids.cpu().tolist(), logprobs.cpu().tolist()


def _pt_topk(
    tm: TextModel,
    sources: list[list[int]],
    targets: list[list[int]],
    generated: torch.Tensor,
    steps_topk: StepTopK | None,
    k: int,
) -> tuple[list[list[list[int]]], list[list[list[float]]]]:
    """The teacher's top-k at every token of each PT target. Where the target is exactly what was decoded (its
    tokens open the decoded row), they are the decoding steps' own, at no extra cost; the other rows (beams; a
    special token dropped from the text; EOS added to an output cut at max_new_tokens) take a teacher-forced
    pass. Both are the teacher's distribution at each prefix of the target."""
    ids: list = [None] * len(targets)
    logprobs: list = [None] * len(targets)
    if steps_topk is not None:
        decoded = generated.tolist()
        step_ids, step_logprobs = steps_topk.rows(generated.shape[1])
        for b, target in enumerate(targets):
            if decoded[b][: len(target)] == target:
                ids[b], logprobs[b] = step_ids[b][: len(target)], step_logprobs[b][: len(target)]
    redo = [b for b in range(len(targets)) if ids[b] is None]
    if redo:
        redo_ids, redo_logprobs = _teacher_topk(tm, [sources[b] for b in redo], [targets[b] for b in redo], k)
        for b, row_ids, row_logprobs in zip(redo, redo_ids, redo_logprobs, strict=True):
            ids[b], logprobs[b] = row_ids, row_logprobs
    return ids, logprobs


def _teacher_topk(
    tm: TextModel, sources: list[list[int]], targets: list[list[int]], k: int
) -> tuple[list[list[list[int]]], list[list[list[float]]]]:
    """The teacher's k most likely tokens and their log-probs at every position of each PT target, from one
    teacher-forced pass over (source, target) pairs (the positions a student trains on)."""
    batch = tm.collate([Encoded("", source, target) for source, target in zip(sources, targets, strict=True)])
    logprobs = torch.log_softmax(tm.target_logits({k_: v.to(tm.device) for k_, v in batch.items()}).float(), dim=-1)
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)  # (B, T, k)
    ids, values = ids.cpu().tolist(), values.cpu().tolist()
    return [ids[b][: len(t)] for b, t in enumerate(targets)], [values[b][: len(t)] for b, t in enumerate(targets)]


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def resolve_spec(spec: str | DecodingSpec) -> DecodingSpec:
    return get_spec(spec) if isinstance(spec, str) else spec


def generate(cfg: GenerateConfig) -> dict[str, Any]:
    """`distilgen generate`: PTs for every input of `cfg.splits`, sharded across processes under accelerate."""
    from distilgen.train import process_state

    state = process_state()
    splits = load_splits(cfg.data, cfg.splits)
    for name in cfg.splits:
        if name not in splits:
            raise ConfigError("splits", f"split '{name}' has no data: configure data.{name} or drop it from splits")
    sources = [e.source for name in cfg.splits for e in splits[name][: cfg.limit]]
    tm = load_teacher(cfg.teacher, cfg.precision, state.device)
    teacher_fp = tm.fingerprint(cfg.data.max_source_length, cfg.data.template)
    spec = resolve_spec(cfg.spec)
    store = PTStore(cfg.store)
    report = generate_pts(
        tm,
        store,
        teacher_fp,
        spec,
        sources,
        batch_size=cfg.batch_size,
        max_source_length=cfg.data.max_source_length,
        topk=cfg.topk,
        shard_size=cfg.shard_size,
        static_cache=cfg.static_cache,
        process_index=state.process_index,
        num_processes=state.num_processes,
        barrier=state.wait_for_everyone,
        progress=state.is_local_main_process,
    )
    state.wait_for_everyone()
    stats = store.pair_stats(teacher_fp, spec)
    return {
        "store": cfg.store,
        "teacher_fp": teacher_fp,
        "spec": spec.name,
        "spec_fp": spec.fingerprint(),
        "inputs": len(dict.fromkeys(sources)),
        "requested": report.requested,
        "already_stored": report.requested - report.missing,
        "generated_here": report.generated,
        "processes": state.num_processes,
        "sequences_per_s": round(report.sequences_per_s, 2),
        "tokens_per_s": round(report.tokens_per_s, 1),
        "stored_pts": stats.pts if stats else 0,
    }
