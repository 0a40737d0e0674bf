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

import functools
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from distilgen.config import ConfigError, DecodingSpec, GenerateConfig, ModelConfig
from distilgen.data import load_splits
from distilgen.models import Encoded, TextModel, avoid_cudnn_attention, load_model
from distilgen.pseudo_targets import MissingPT, PTRecord, PTStore, get_spec, sample_seed

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Per-PT sampling
# ---------------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """A 64-bit constant as the int64 torch stores."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser on int64 tensors (products wrap mod 2**64; shifts made logical by masking)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _MIX1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _MIX2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def counter_uniform(seeds: torch.Tensor, step: int | torch.Tensor, size: int) -> torch.Tensor:
    """(B, size) uniforms in (0, 1): a hash of (seed of the row, step, column), on the seeds' device.

    A counter-based generator: no state, the same numbers on CPU and GPU (integer arithmetic is exact), and
    one vectorised call per decoding step for the whole batch. `step` may be a 0-d int64 tensor (a compiled
    caller then does not recompile for every step).
    """
    columns = torch.arange(size, device=seeds.device, dtype=torch.int64)
    step = torch.as_tensor(step, dtype=torch.int64, device=seeds.device)
    row_keys = _mix64(seeds.to(torch.int64) + step * _signed(_GOLDEN))  # (B,); int64 products wrap mod 2**64
    bits = _mix64(row_keys[:, None] + columns[None, :])  # (B, size)
    top24 = (bits >> 40) & ((1 << 24) - 1)
    return (top24.to(torch.float32) + 0.5) / float(1 << 24)


@functools.cache
def _warpers(temperature: float, top_k: int, top_p: float) -> tuple:
    """The warpers `generate` applies when sampling, in its order; one tuple per setting, so that a compiled
    sampler sees the same objects on every call."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
    warpers += [TopKLogitsWarper(top_k)] if top_k else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
    return tuple(warpers)


def gumbel_choice(scores: torch.Tensor, seeds: torch.Tensor, step: torch.Tensor, warpers: tuple) -> torch.Tensor:
    """(B, V) scores with all the mass on one token per row: argmax(warped scores + Gumbel noise of the row's
    seed at `step`), a sample of softmax(warped scores)."""
    scores = scores.float()
    for warper in warpers:
        scores = warper(None, scores)
    uniform = counter_uniform(seeds, step, scores.shape[1])
    choice = (scores - torch.log(-torch.log(uniform))).argmax(-1, keepdim=True)  # (B, 1)
    return torch.full_like(scores, float("-inf")).scatter_(-1, choice, 0.0)


@functools.cache
def _compiled_gumbel_choice():
    """`gumbel_choice` as one compiled function (dynamic in batch and vocabulary): eager, it runs some 50 small
    ops per decoding step (with top-p; `bench/decode_overhead.py`), each a kernel launch on a GPU, where they
    cost more than a small model's compiled decoder step."""
    return torch.compile(gumbel_choice, dynamic=True)


class SeededSampling:
    """A logits processor that samples each row from its own seed, by the Gumbel-max trick.

    `generate` samples with one global generator, so a row's sample depends on the rows beside it. Here the
    noise of row b at step t is `counter_uniform(seeds[b], t)`, and the row's token is argmax(warped logits +
    Gumbel noise), a sample of softmax(warped logits); the processor returns scores with all the mass on that
    token. Use through `seeded_generate_kwargs`; it must be the last processor. One instance serves one
    `generate` call. `compile` runs `gumbel_choice` compiled (for decoding on a GPU with a compiled step).

    Rows still depend on their batch through padding and float rounding of the logits; the sample only changes
    when that rounding moves a token across an argmax tie, which is rare in fp32.
    """

    def __init__(
        self, seeds: Sequence[int], temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, compile: bool = False
    ):
        self.seeds = torch.tensor([_signed(s & _MASK64) for s in seeds], dtype=torch.int64)
        self.step = torch.zeros((), dtype=torch.int64)
        self.warpers = _warpers(temperature, top_k, top_p)
        self.choose = _compiled_gumbel_choice() if compile else gumbel_choice

    def __call__(self, input_ids, scores):  # (B, L), (B, V) -> (B, V)
        if scores.shape[0] != len(self.seeds):
            raise ValueError(f"{len(self.seeds)} seeds for a batch of {scores.shape[0]} rows")
        if self.seeds.device != scores.device:
            self.seeds, self.step = self.seeds.to(scores.device), self.step.to(scores.device)
        out = self.choose(scores, self.seeds, self.step, self.warpers)
        self.step += 1  # on the device: no copy from the host per step
        return out


def seeded_generate_kwargs(
    spec: DecodingSpec, seeds: Sequence[int], per_input: int = 1, compile: bool = False
) -> dict[str, Any]:
    """`spec.generate_kwargs()` for a sampling spec, with `per_input` samples per input and sample b sampled
    from `seeds[b]` (see `SeededSampling`; `compile`: its compiled form)."""
    from transformers import LogitsProcessorList

    if spec.kind != "sample":
        raise ValueError(f"seeds are only for sampling specs; '{spec.name}' is {spec.kind}")
    kwargs = spec.generate_kwargs()
    for key in ("temperature", "top_p", "top_k"):
        kwargs.pop(key, None)
    sampler = SeededSampling(seeds, spec.temperature, spec.top_k, spec.top_p, compile=compile)
    kwargs["logits_processor"] = LogitsProcessorList([sampler])
    if per_input == 1:  # our sample is the argmax of the processed scores: no softmax and draw by `generate`
        kwargs["do_sample"] = False
    else:  # sampling mode returns several sequences per input, encoding the input once; each is our sample
        kwargs.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=per_input)
    return kwargs


def compiles_decoding(static_cache: bool, device: torch.device) -> bool:
    """Whether `generate` compiles its decoder step (transformers does with a static cache on a GPU); the
    seeded sampler is compiled with it, as it would otherwise cost more per token than the compiled step."""
    return static_cache and device.type == "cuda"


# ---------------------------------------------------------------------------------------------
# The teacher's identity
# ---------------------------------------------------------------------------------------------


def teacher_fingerprint(tm: TextModel, max_source_length: int, template: str = "{source}") -> str:
    """sha256 of everything that changes the teacher's PTs: its class, config, weights (in the dtype it runs
    in), tokenizer, and how inputs are cut (the template is already in the source text, but is kept for
    readability of mismatches)."""
    digest = hashlib.sha256()
    digest.update(type(tm.model).__name__.encode())
    config = tm.model.config.to_dict()
    for bookkeeping in ("_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype"):
        config.pop(bookkeeping, None)  # where it came from and what saved it, not what it computes
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(tm.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
    digest.update(tm.tokenizer.backend_tokenizer.to_str().encode())
    digest.update(f"max_source_length={max_source_length};template={template}".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


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


SOURCE_BUCKET = 64
"""Source widths under a static cache are multiples of this: few compiled shapes, little padding."""


def use_static_cache(setting: str, device: torch.device) -> bool:
    """Whether a `static_cache` setting ("on", "off", "auto": on a GPU) decodes with a static KV cache."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


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
        teacher_fp: `teacher_fingerprint(tm, ...)`, the store's key of this teacher.
        topk: also store the teacher's top-k log-probs at every PT token (0: none).
        shard_size: PTs buffered before they are written as one shard.
        static_cache: "on", "off" or "auto" (on when the teacher is on a GPU); see `GenerateConfig.static_cache`.
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
    report = GenerationReport(requested, len(todo), 0, 0, 0, 0.0)
    total = sum(_sequences(spec, r) for r in rows)
    bar = tqdm(total=total, desc=f"generate {spec.name}", unit="seq", disable=not progress or not rows)
    was_training = tm.model.training
    tm.model.eval()
    static = use_static_cache(static_cache, tm.device)
    buffer: list[PTRecord] = []
    for batch in plan_batches(rows, spec, batch_size):
        records = _generate_batch(tm, spec, batch, topk, static and spec.kind != "beam")
        buffer += records
        sequences = sum(_sequences(spec, r) for r in batch)
        report.sequences += sequences
        report.tokens += sum(len(r.token_ids) for r in records)
        if len(buffer) >= shard_size:
            report.generated += _flush(store, teacher_fp, spec, buffer)
        bar.update(sequences)
        bar.set_postfix(tok_s=f"{report.tokens / (time.perf_counter() - start):.0f}", stored=report.generated)
    report.generated += _flush(store, teacher_fp, spec, buffer)
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

    With `static_cache` the sources are padded to a multiple of `SOURCE_BUCKET` tokens, so that the compiled
    decoder step (one per cross-attention length) is reused across batches.
    """
    items = [Encoded("", r.source, []) for r in rows]
    collated = tm.collate(items, source_multiple=SOURCE_BUCKET if static_cache else 1)
    batch = {k: v.to(tm.device) for k, v in collated.items()}
    seeds = None
    if spec.kind == "sample":
        seeds = [sample_seed(spec.seed, r.input_key, i) for r in rows for i in r.sample_indices]
        per_input = len(rows[0].sample_indices)  # the same for every row of a batch
        kwargs = seeded_generate_kwargs(spec, seeds, per_input, compiles_decoding(static_cache, tm.device))
    else:
        kwargs = spec.generate_kwargs()
    per_row = kwargs.get("num_return_sequences", 1)
    kwargs.update(pad_token_id=tm.tokenizer.pad_token_id, eos_token_id=tm.tokenizer.eos_token_id)
    if static_cache:
        kwargs["cache_implementation"] = "static"
    generated = tm.layout.generate(tm.model, batch, **kwargs)  # (B * per_row, N), row b's outputs together
    contents = tm.output_tokens(generated)
    targets = [tm.target_ids(ids) for ids in contents]
    top_ids = top_logprobs = None
    if topk:
        sources = [r.source for r in rows for _ in range(per_row)]
        top_ids, top_logprobs = _teacher_topk(tm, sources, targets, topk)
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


def load_teacher(cfg: ModelConfig, precision: str, device: torch.device) -> TextModel:
    """The teacher in inference mode on `device`, in bf16 when asked (auto: on a GPU that supports it)."""
    tm = load_model(cfg)
    if device.type == "cuda":
        avoid_cudnn_attention()  # length-sorted batches: a new shape nearly every batch
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    tm.model.to(device=device, dtype=torch.bfloat16 if use_bf16 else torch.float32).eval()
    tm.model.requires_grad_(False)
    return tm


def generate(cfg: GenerateConfig) -> dict[str, Any]:
    """`distilgen generate`: PTs for every input of `cfg.splits`, sharded across processes under accelerate."""
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # cpu: processes launched on a CPU machine join up
    splits = load_splits(cfg.data, cfg.splits)
    for name in cfg.splits:
        if name not in splits:
            raise ConfigError("splits", f"split '{name}' has no data: configure data.{name} or drop it from splits")
    sources = [e.source for name in cfg.splits for e in splits[name][: cfg.limit]]
    tm = load_teacher(cfg.teacher, cfg.precision, state.device)
    teacher_fp = teacher_fingerprint(tm, cfg.data.max_source_length, cfg.data.template)
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
        "is_main_process": state.is_main_process,
    }
