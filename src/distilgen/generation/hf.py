"""The `hf` generation backend: a `transformers` model run here.

    generator = HFGenerator(tm, max_source_length=256, batch_size=64, static_cache="auto")
    outputs = generator.generate(sources, settings, topk=8)     # text-level, batched longest-first
    new_ids = generator.run(batch, settings, seeds)             # tensor-level, one batch (student PTs)

Greedy and sampled outputs come from `decode.decode` (our loop: per-row seeds, top-k from the steps, a static cache
whose compiled step is reused across batches), beams from `generate`. A model whose own generation config adds rules
`decode` does not apply (`decode.GENERATION_RULES`: a minimum length, forced tokens...) is sent to `generate` when
`own_rules` is set (evaluation: the model as it is deployed); PTs are what their spec says, so PT generation
leaves it off.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from distilgen.config import GenerationSettings
from distilgen.data import Example
from distilgen.generation import Generated, input_key, plan_batches, sample_seed
from distilgen.generation.decode import decode, generation_rules, source_multiple, use_static_cache
from distilgen.models import Batch, Encoded, TextModel
from distilgen.progress import progress_bar
from distilgen.sharding import is_sharded


@dataclass(frozen=True)
class _Row:
    """One source to decode: its position in the call, token ids, the outputs wanted and its prefix."""

    at: int
    source: list[int]
    indices: tuple[int, ...]
    prefix: tuple[int, ...] | None


class HFGenerator:
    """A `TextModel` that writes: batching, the choice of loop, seeds and top-k capture."""

    def __init__(
        self,
        tm: TextModel,
        max_source_length: int = 512,
        batch_size: int = 32,
        static_cache: str = "off",
        own_rules: bool = True,
    ):
        """
        Args:
            batch_size: sequences decoded together (a source sampled K times counts K; beams count their width).
            static_cache: "on", "off" or "auto" (on a GPU with Triton): decode with a static KV cache, sources
                padded to multiples of `decode.SOURCE_BUCKET` tokens, so that the compiled step is reused.
            own_rules: apply the rules of the model's own generation config (through `generate`).
        """
        self.tm, self.max_source_length, self.batch_size = tm, max_source_length, batch_size
        # a sharded model's forward gathers weights from the other processes: no CUDA graph can hold it
        self.static = use_static_cache(static_cache, tm.device) and not is_sharded(tm.model)
        self.own_rules = own_rules and bool(generation_rules(tm.model))

    def generate(
        self,
        sources: Sequence[str],
        settings: GenerationSettings,
        *,
        indices: Sequence[Sequence[int]] | None = None,
        topk: int = 0,
        prefixes: Sequence[Sequence[int]] | None = None,
        desc: str | None = None,
        on_done: Callable[[int, list[Generated]], None] | None = None,
    ) -> list[list[Generated]]:
        """See `generation.Generator.generate`. Sources are batched longest-first; a batch shares its number of
        samples and its prefix length."""
        tm = self.tm
        examples = [Example(str(i), source, None, ()) for i, source in enumerate(sources)]
        encoded = [e.source for e in tm.encode(examples, self.max_source_length, targets=False)[0]]
        wanted = indices if indices is not None else [range(settings.num_return)] * len(sources)
        given = [tuple(p) for p in prefixes] if prefixes is not None else [None] * len(sources)
        rows = [_Row(i, ids, tuple(w), p) for i, (ids, w, p) in enumerate(zip(encoded, wanted, given, strict=True))]
        rows.sort(key=lambda r: (-len(r.indices), len(r.prefix or ()), -len(r.source), r.at))

        def cost(row: _Row) -> int:
            return settings.num_beams if settings.kind == "beam" else len(row.indices)

        def group(row: _Row) -> tuple[int, int]:
            return (len(row.indices) if settings.kind == "sample" else 0, len(row.prefix or ()))

        out: list[list[Generated]] = [[] for _ in sources]
        bar = progress_bar(total=len(rows), desc=desc, unit="seq", leave=False, disable=desc is None or len(rows) < 2)
        was_training = tm.model.training
        tm.model.eval()
        try:
            for batch in plan_batches(rows, cost, group, self.batch_size):
                keys = [input_key(sources[r.at]) for r in batch]
                for row, generated in zip(batch, self._batch(batch, keys, settings, topk), strict=True):
                    out[row.at] = generated
                    if on_done is not None:
                        on_done(row.at, generated)
                bar.update(len(batch))
        finally:
            bar.close()
            tm.model.train(was_training)
        return out

    @torch.no_grad()
    def run(
        self,
        batch: Batch,
        settings: GenerationSettings,
        seeds: Sequence[int] | None = None,
        prefix: torch.Tensor | None = None,
        on_scores=None,
    ) -> torch.Tensor:
        """(B * outputs per input, N) new token ids for a collated batch on the model's device, padded after EOS.

        Args:
            seeds: sampling: one per output row (input b's rows together).
            prefix: (B, P) target tokens the outputs continue (not returned).
            on_scores: `decode`'s per-step callback (top-k capture); unused by beams.
        """
        tm = self.tm
        if settings.kind == "beam" or self.own_rules:
            kwargs = settings.generate_kwargs()
            if settings.kind == "sample":
                kwargs["num_return_sequences"] = len(seeds) // batch["source_ids"].shape[0]
            kwargs.update(pad_token_id=tm.tokenizer.pad_token_id, eos_token_id=tm.tokenizer.eos_token_id)
            kwargs["synced_gpus"] = is_sharded(tm.model)  # every process steps until all have finished
            return tm.layout.generate(tm.model, batch, prefix, **kwargs)
        stops, blanks = tm.prompt.line_breaks() if tm.prompt is not None and tm.prompt.first_line else ((), ())
        return decode(
            tm, batch, settings, seeds, static=self.static, on_scores=on_scores, prefix=prefix, stops=stops,
            blanks=blanks,
        )  # fmt: skip

    def _batch(
        self, rows: Sequence[_Row], keys: Sequence[str], settings: GenerationSettings, topk: int
    ) -> list[list[Generated]]:
        """The outputs of one batch of rows, with top-k log-probs when asked."""
        tm = self.tm
        bucket = source_multiple(self.static and settings.kind != "beam")  # beams: `generate`'s own cache
        collated = tm.collate([Encoded("", r.source, []) for r in rows], source_multiple=bucket)
        batch = {k: v.to(tm.device) for k, v in collated.items()}
        prefix = None
        if rows[0].prefix is not None:
            prefix = torch.tensor([tm.output_prefix(r.prefix) for r in rows], dtype=torch.long, device=tm.device)
            settings = dataclasses.replace(settings, max_new_tokens=max(1, settings.max_new_tokens - prefix.shape[1]))
        seeds = None
        if settings.kind == "sample":
            seeds = [sample_seed(settings.seed, key, i) for r, key in zip(rows, keys, strict=True) for i in r.indices]
        steps_topk = StepTopK(topk) if topk and settings.kind != "beam" and not self.own_rules else None
        generated = self.run(batch, settings, seeds, prefix, on_scores=steps_topk)
        spent = [
            _generated_length(row, tm.tokenizer.eos_token_id, tm.tokenizer.pad_token_id) for row in generated.tolist()
        ]
        per_row = settings.num_return if settings.kind == "beam" else len(rows[0].indices)
        contents = tm.output_tokens(generated)
        if prefix is not None:
            contents = [[*rows[b // per_row].prefix, *c] for b, c in enumerate(contents)]  # type: ignore[misc]
        texts, contents = finished_outputs(tm, contents)
        targets = [tm.target_ids(c) for c in contents]
        top_ids = top_logprobs = None
        if topk:
            sources = [r.source for r in rows for _ in range(per_row)]
            top_ids, top_logprobs = _output_topk(tm, sources, targets, generated, steps_topk, topk)
        outputs = []
        for b, row in enumerate(rows):
            mine = []
            for j, index in enumerate(row.indices):
                at = b * per_row + (index if settings.kind == "beam" else j)
                mine.append(
                    Generated(
                        text=texts[at],
                        tokens=contents[at],
                        token_ids=targets[at],
                        new_tokens=spent[at],
                        seed=seeds[at] if seeds is not None and not self.own_rules else None,  # generate: unseeded
                        topk_ids=top_ids[at] if top_ids is not None else None,
                        topk_logprobs=top_logprobs[at] if top_logprobs is not None else None,
                    )
                )
            outputs.append(mine)
        return outputs


def _generated_length(row: list[int], eos: int, pad: int) -> int:
    """Tokens a row cost: up to and with its EOS; a row that `decode` ended at a stop token (a line break) is
    padded from there on, so it cost the tokens before its padding."""
    if eos in row:
        return row.index(eos) + 1
    return row.index(pad) if pad in row else len(row)


def finished_outputs(tm: TextModel, contents: list[list[int]]) -> tuple[list[str], list[list[int]]]:
    """The texts of generated text tokens, and the tokens, as the task keeps them (`Prompt.finish`: stripped, cut at
    the first line break): a cut output keeps the tokens the model wrote up to the cut."""
    texts = [tm.tokenizer.decode(c, skip_special_tokens=True).strip() for c in contents]
    if tm.prompt is None:
        return texts, contents
    kept = [tm.prompt.finish(text) for text in texts]
    cut = [
        c if done == text else _prefix_writing(tm, c, done) for c, text, done in zip(contents, texts, kept, strict=True)
    ]
    return kept, cut


def _prefix_writing(tm: TextModel, tokens: list[int], text: str) -> list[int]:
    """The shortest prefix of `tokens` that reads `text`; `text` tokenized anew where none does (a token that
    straddles the cut, such as ".\n")."""
    for n in range(len(tokens) + 1):
        if tm.tokenizer.decode(tokens[:n], skip_special_tokens=True).strip() == text:
            return tokens[:n]
    return tm.tokenizer(text, add_special_tokens=False)["input_ids"]


def open(tm: TextModel, **options) -> HFGenerator:  # noqa: A001 (the backend entry point, `generation.BACKENDS`)
    return HFGenerator(tm, **options)


class StepTopK:
    """`decode`'s `on_scores`: the k most likely tokens and their log-probs at every decoding step, kept on the
    device and fetched once."""

    def __init__(self, k: int):
        self.k, self.ids, self.logprobs, self.at = k, [], [], []

    def __call__(self, scores: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        logprobs, ids = torch.log_softmax(scores, dim=-1).topk(min(self.k, scores.shape[-1]), dim=-1)
        self.ids.append(ids)
        self.logprobs.append(logprobs)
        self.at.append(rows)

    def rows(self, count: int, width: int) -> tuple[list[list[list[int]]], list[list[list[float]]]]:
        """(count, width, k) ids and log-probs of the first `width` steps, as lists; zeros at the steps after a row
        was dropped from the batch (it had finished)."""
        k = self.ids[0].shape[-1]
        ids = self.ids[0].new_zeros((count, width, k))
        logprobs = self.logprobs[0].new_zeros((count, width, k))
        for t, (step_ids, step_logprobs, at) in enumerate(zip(self.ids[:width], self.logprobs, self.at, strict=False)):
            where = slice(None) if at is None else at
            ids[where, t], logprobs[where, t] = step_ids, step_logprobs
        return ids.cpu().tolist(), logprobs.cpu().tolist()


def _output_topk(
    tm: TextModel,
    sources: list[list[int]],
    targets: list[list[int]],
    generated: torch.Tensor,
    steps_topk: StepTopK | None,
    k: int,
) -> tuple[list[list[list[int]]], list[list[list[float]]]]:
    """The writer's top-k at every token of each output's target. Where the target is exactly what was decoded (its
    tokens open the decoded row), they are the decoding steps' own, at no extra cost; the other rows (beams; a
    special token dropped from the text; EOS added to an output cut at max_new_tokens) take a teacher-forced
    pass. Both are the model's distribution at each prefix of the target."""
    ids: list = [None] * len(targets)
    logprobs: list = [None] * len(targets)
    if steps_topk is not None:
        decoded = generated.tolist()
        step_ids, step_logprobs = steps_topk.rows(*generated.shape)
        for b, target in enumerate(targets):
            if decoded[b][: len(target)] == target:
                ids[b], logprobs[b] = step_ids[b][: len(target)], step_logprobs[b][: len(target)]
    redo = [b for b in range(len(targets)) if ids[b] is None]
    if redo:
        redo_ids, redo_logprobs = forced_topk(tm, [sources[b] for b in redo], [targets[b] for b in redo], k)
        for b, row_ids, row_logprobs in zip(redo, redo_ids, redo_logprobs, strict=True):
            ids[b], logprobs[b] = row_ids, row_logprobs
    return ids, logprobs


def forced_topk(
    tm: TextModel, sources: list[list[int]], targets: list[list[int]], k: int
) -> tuple[list[list[list[int]]], list[list[list[float]]]]:
    """The model's k most likely tokens and their log-probs at every position of each target, from one
    teacher-forced pass over (source, target) pairs (the positions a student trains on)."""
    _, ids, values = forced_logprobs(tm, sources, targets, k)
    return ids, values


@torch.no_grad()
def forced_logprobs(
    tm: TextModel, sources: list[list[int]], targets: list[list[int]], k: int
) -> tuple[list[list[float]], list[list[list[int]]], list[list[list[float]]]]:
    """From one teacher-forced pass over (source, target) pairs: the log-prob of each target token, and the k most
    likely tokens with their log-probs at every target position."""
    batch = tm.collate([Encoded("", source, target) for source, target in zip(sources, targets, strict=True)])
    logprobs = torch.log_softmax(tm.target_logits({k_: v.to(tm.device) for k_, v in batch.items()}).float(), dim=-1)
    chosen = logprobs.gather(-1, batch["target_ids"].to(logprobs.device).unsqueeze(-1)).squeeze(-1).cpu().tolist()
    values, ids = logprobs.topk(min(max(k, 1), logprobs.shape[-1]), dim=-1)  # (B, T, k)
    ids, values = ids.cpu().tolist(), values.cpu().tolist()
    return (
        [chosen[b][: len(t)] for b, t in enumerate(targets)],
        [ids[b][: len(t)] for b, t in enumerate(targets)],
        [values[b][: len(t)] for b, t in enumerate(targets)],
    )
