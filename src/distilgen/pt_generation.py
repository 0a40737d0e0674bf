"""Pseudo-target generation: the teacher annotates inputs, and only what the store lacks is generated.

    distilgen generate configs/generate/sample4.yaml
    accelerate launch --num_processes 8 -m distilgen.cli generate configs/generate/sample4.yaml

`generate_pts` is the library call. It asks the store which PTs are missing, turns them into rows (one
per sampled PT, one per input for greedy and beam search), sorts the rows by source length so that each
batch holds inputs of similar length (little padding, and outputs that finish together), and adds the
results to the store every `shard_size` PTs, or every `flush_seconds` (a slow teacher: a large model on a
CPU). A run killed at any point loses at most the PTs not yet in a shard; rerunning generates exactly those,
with the same per-PT seeds, so it ends with the same PTs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distilgen.config import ConfigError, DecodingSpec, GenerateConfig
from distilgen.data import DataError, load_splits
from distilgen.generation import Generated, Generator
from distilgen.generation import plan_batches as batches_of
from distilgen.generation.api import ApiGenerator, EndpointError
from distilgen.progress import progress_bar
from distilgen.pseudo_targets import MissingPT, PTRecord, PTStore, get_spec, write_atomic
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
    source: str
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


def plan_rows(todo: Sequence[MissingPT], spec: DecodingSpec) -> list[Row]:
    """One row per input with missing PTs, longest source (in characters) first (ties in key order, so every process
    computes the same plan); sampled rows are grouped by how many samples they lack, so a batch shares that number.

    The PTs of an input come from one decoding: its K samples as K rows over one encoder or prompt pass, its beams
    from one beam search.
    """
    by_key: dict[str, list[int]] = {}
    sources: dict[str, str] = {}
    for m in todo:
        by_key.setdefault(m.input_key, []).append(m.sample_index)
        sources[m.input_key] = m.source
    rows = [Row(key, sources[key], tuple(sorted(indices))) for key, indices in by_key.items()]
    group = (lambda r: len(r.sample_indices)) if spec.kind == "sample" else (lambda r: 0)
    return sorted(rows, key=lambda r: (-group(r), -len(r.source), r.input_key))


def plan_batches(rows: Sequence[Row], spec: DecodingSpec, batch_size: int) -> list[list[Row]]:
    """Consecutive rows in batches of at most `batch_size` sequences (a sampled row counts its samples, a beam
    row its beams); a batch never mixes sampled rows lacking different numbers of samples."""
    group = (lambda r: len(r.sample_indices)) if spec.kind == "sample" else (lambda r: 0)
    return batches_of(rows, lambda r: _sequences(spec, r), group, batch_size)


def _sequences(spec: DecodingSpec, row: Row) -> int:
    return {"greedy": 1, "beam": spec.num_beams, "sample": len(row.sample_indices)}[spec.kind]


def generate_pts(
    generator: Generator,
    store: PTStore,
    teacher_fp: str,
    spec: DecodingSpec,
    sources: Sequence[str],
    *,
    batch_size: int = 64,
    topk: int = 0,
    shard_size: int = 2048,
    flush_seconds: float = 60.0,
    process_index: int = 0,
    num_processes: int = 1,
    barrier=None,
    progress: bool = True,
    journal: bool = False,
    postfix: Callable[[], dict[str, str]] | None = None,
) -> GenerationReport:
    """Generate the PTs of `sources` under `spec` that `store` lacks, and add them to it.

    Args:
        generator: what writes the PTs: the teacher's (`teacher.generator(...)`), its batch size at least
            `batch_size`.
        teacher_fp: the teacher's `fingerprint(...)`, the store's key of its PTs.
        topk: also store the teacher's top-k log-probs at every PT token (0: none).
        shard_size: PTs buffered before they are written as one shard.
        flush_seconds: ... or seconds since the last write, whichever comes first.
        process_index, num_processes: this process takes rows process_index, process_index + n, ... of the plan.
        barrier: called after every process has read the store and before any writes (`wait_for_everyone`), so
            that all processes plan the same rows.
        journal: keep each answer in the store's journal as it arrives (a paid teacher: `teacher.paid`), so that a
            kill loses only the requests in flight.
        postfix: more fields for the progress bar (an endpoint's tokens and cost so far).
    """
    start = time.perf_counter()
    todo = store.missing(teacher_fp, spec, sources)
    requested = len(dict.fromkeys(sources)) * spec.num_per_input
    if barrier is not None:
        barrier()
    rows = plan_rows(todo, spec)[process_index::num_processes]
    mine = list(dict.fromkeys(r.source for r in rows))  # this process's share of the inputs
    report = GenerationReport(requested, len(todo), 0, 0, 0, 0.0)
    bar = progress_bar(total=sum(_sequences(spec, r) for r in rows), desc=f"generate {spec.name}", unit="seq",
               disable=not progress or not rows)  # fmt: skip
    settings = spec.settings()
    buffer: list[PTRecord] = []
    waited, flushed = False, time.perf_counter()
    try:
        while rows:
            decoded = 0
            for batch in plan_batches(rows, spec, batch_size):
                # See [claims note] in pseudo_targets: skip what another writer holds, or stored since the plan.
                granted = store.claim(teacher_fp, spec.fingerprint(), [r.input_key for r in batch])
                still = {m.input_key for m in store.missing(teacher_fp, spec, [r.source for r in batch])}
                batch = [r for r in batch if r.input_key in granted & still]
                if not batch:
                    continue

                def keep(at: int, generated: list[Generated], batch: list[Row] = batch) -> None:
                    row = batch[at]
                    indices = row.sample_indices
                    records = [_record(row.input_key, i, g) for i, g in zip(indices, generated, strict=True)]
                    if journal:
                        store.journal(teacher_fp, spec, records)
                    buffer.extend(records)
                    report.sequences += _sequences(spec, row)
                    report.tokens += sum(r.num_tokens for r in records)
                    bar.update(_sequences(spec, row))
                    bar.set_postfix(tok_s=f"{report.tokens / (time.perf_counter() - start):.0f}",
                                    stored=report.generated, **(postfix() if postfix else {}))  # fmt: skip

                generator.generate(
                    [r.source for r in batch], settings, indices=[r.sample_indices for r in batch], topk=topk,
                    on_done=keep,
                )  # fmt: skip
                decoded += sum(_sequences(spec, r) for r in batch)
                if len(buffer) >= shard_size or time.perf_counter() - flushed >= flush_seconds:
                    report.generated += _flush(store, teacher_fp, spec, buffer)
                    flushed = time.perf_counter()
            report.generated += _flush(store, teacher_fp, spec, buffer)
            store.release()
            # What is still missing of this share was claimed by another writer: wait for it, or take it over
            # once that writer is gone.
            rows = plan_rows(store.missing(teacher_fp, spec, mine), spec)
            if rows and not decoded:
                if not waited:
                    log.info("waiting for %d inputs that another process is generating", len(rows))
                    waited = True
                time.sleep(CLAIM_POLL_S)
            bar.total = bar.n + sum(_sequences(spec, r) for r in rows)
    except BaseException:  # a refused request, the budget, an interrupt: store what was answered, then stop
        if buffer:
            with contextlib.suppress(Exception):  # (a second failure: the journal still holds it)
                report.generated += _flush(store, teacher_fp, spec, buffer)
        raise
    finally:
        store.release()
        bar.close()
    report.seconds = time.perf_counter() - start
    return report


def pt_batch_size(teacher: Any, batch_size: int) -> int:
    """Sequences per `generate_pts` batch: `batch_size` for a model run here; for an endpoint, enough to keep its
    `concurrency` requests in flight through a batch (a batch waits for its slowest request)."""
    if not teacher.paid:
        return batch_size
    api = teacher.cfg.api
    return max(batch_size, 4 * api.concurrency * api.max_n)


def _record(key: str, index: int, g: Generated) -> PTRecord:
    return PTRecord(key, index, g.text, g.token_ids, g.seed, g.topk_ids, g.topk_logprobs, g.token_bytes, g.topk_bytes)


def _flush(store: PTStore, teacher_fp: str, spec: DecodingSpec, buffer: list[PTRecord]) -> int:
    count = len(buffer)
    if buffer:
        store.add(teacher_fp, spec, buffer)
        buffer.clear()
        store.clear_journal()  # (a no-op when nothing was journaled)
    return count


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
    tm = load_teacher(cfg.teacher, cfg.precision, state.device, cfg.data)
    teacher_fp = tm.fingerprint(cfg.data.max_source_length, cfg.data.template)
    spec = resolve_spec(cfg.spec)
    store = PTStore(cfg.store)
    batch_size = pt_batch_size(tm, cfg.batch_size)
    generator = tm.generator(cfg.data.max_source_length, batch_size, cfg.static_cache)
    usage = generator.usage if tm.paid else None
    if usage is not None:
        generator.share_budget(state.num_processes)
    if cfg.batch != "off":
        if cfg.batch == "write":
            done = write_batch(generator, store, teacher_fp, spec, sources, cfg.topk, cfg.batch_file)
        else:
            done = read_batch(generator, store, teacher_fp, spec, sources, cfg.topk, cfg.batch_file, cfg.shard_size)
        return {"store": cfg.store, "teacher_fp": teacher_fp, "spec": spec.name, **done}
    report = generate_pts(
        generator,
        store,
        teacher_fp,
        spec,
        sources,
        batch_size=batch_size,
        topk=cfg.topk,
        shard_size=cfg.shard_size,
        flush_seconds=cfg.flush_seconds,
        process_index=state.process_index,
        num_processes=state.num_processes,
        barrier=state.wait_for_everyone,
        progress=state.is_local_main_process,
        journal=tm.paid,
        postfix=usage.postfix if usage else None,
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
        **({"teacher_api": usage.summary()} if usage else {}),
    }


# ---------------------------------------------------------------------------------------------
# Batch API files: an api teacher's requests answered offline
# ---------------------------------------------------------------------------------------------


def write_batch(
    generator: ApiGenerator, store: PTStore, teacher_fp: str, spec: DecodingSpec, sources: Sequence[str], topk: int,
    path: str,
) -> dict[str, Any]:  # fmt: skip
    """Write the requests of the PTs `store` lacks as an OpenAI Batch API input file."""
    rows = plan_rows(store.missing(teacher_fp, spec, sources), spec)
    lines = generator.batch_lines([r.source for r in rows], spec.settings(), [r.sample_indices for r in rows], topk)
    text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(path), text.encode())
    log.info("wrote %d requests for %d PTs to %s", len(lines), sum(len(r.sample_indices) for r in rows), path)
    return {"batch_file": path, "requests": len(lines), "missing_pts": sum(len(r.sample_indices) for r in rows)}


def read_batch(
    generator: ApiGenerator, store: PTStore, teacher_fp: str, spec: DecodingSpec, sources: Sequence[str], topk: int,
    path: str, shard_size: int,
) -> dict[str, Any]:  # fmt: skip
    """Add the answers of an OpenAI Batch API output file to `store`; lines for other inputs, failed requests and
    PTs already stored are counted, not stored."""
    missing = {(m.input_key, m.sample_index) for m in store.missing(teacher_fp, spec, sources)}
    settings = spec.settings()
    records: list[PTRecord] = []
    failed = foreign = 0
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                key, indices, outputs = generator.batch_answer(json.loads(line), settings, topk)
            except (ValueError, EndpointError) as err:
                raise DataError(f"{path}:{number}: not a Batch API output line of these requests: {err}") from None
            if outputs is None:
                failed += 1
                continue
            new = [_record(key, i, g) for i, g in zip(indices, outputs, strict=True) if (key, i) in missing]
            missing -= {(key, r.sample_index) for r in new}
            foreign += not new
            records += new
    for start in range(0, len(records), shard_size):
        store.add(teacher_fp, spec, records[start : start + shard_size])
    if failed or foreign:
        log.warning("%s: %d failed requests, %d answers for inputs not asked or already stored", path, failed, foreign)
    left = len(store.missing(teacher_fp, spec, sources))
    return {"batch_file": path, "stored_now": len(records), "failed_requests": failed, "not_asked": foreign,
            "still_missing": left, "teacher_api": generator.usage.summary()}  # fmt: skip
