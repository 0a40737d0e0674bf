"""Generation: every text a model writes goes through a `Generator` (teacher PTs, student PTs, evaluation, the
diagnostic).

    generator = open_generator("hf", teacher, max_source_length=256, batch_size=32)
    outputs = generator.generate(sources, get_spec("sample").settings(), topk=8)   # outputs[i][j]: a Generated

Sources (text) and one `config.GenerationSettings` in; per source its outputs out, each with its text, the token ids a
model trains on, its seed and (when asked) the writer's top-k log-probs at every token. Sample i of a source is
seeded by `sample_seed(settings.seed, input_key(source), i)`, whatever batch it is drawn in.

A backend is a file of this package with an `open(model, **options)` function, plus one entry in `BACKENDS`:
`hf.py` runs a `transformers` model here (its own decoding loop, `decode.py`, for greedy and sampling; `generate`
for beams); `api.py` asks an OpenAI-compatible endpoint; `ct2.py` runs a CTranslate2 export (`distilgen export`).
This module imports nothing of the pipeline.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

BACKENDS: dict[str, str] = {
    "hf": "distilgen.generation.hf",
    "api": "distilgen.generation.api",
    "ct2": "distilgen.generation.ct2",
}
"""Generation backends by name -> the module whose `open(model, **options)` returns a `Generator`."""


@dataclass
class Generated:
    """One output of one source."""

    text: str
    tokens: list[int]
    """The text's tokens in the writer's vocabulary (no special tokens; empty where the writer gives only text)."""
    token_ids: list[int]
    """The output as the writer's training target (`tokens` within the special tokens and EOS a target holds)."""
    new_tokens: int = 0
    """Tokens the writer generated for it (up to and with its EOS, before any cut): what it cost."""
    seed: int | None = None
    """The sample's seed (sampling only)."""
    topk_ids: list[list[int]] | None = None
    """Per token of `token_ids`, the writer's k most likely tokens there (when asked)..."""
    topk_logprobs: list[list[float]] | None = None
    """...and their log-probabilities."""
    token_bytes: list[bytes] | None = None
    """A writer without a vocabulary here (an endpoint): its tokens as bytes, in place of `tokens`/`token_ids`..."""
    topk_bytes: list[list[bytes]] | None = None
    """...and its top-k candidates per token as bytes, in place of `topk_ids`."""


class Generator(Protocol):
    """What writes text: a model run here, and later an endpoint or an exported runtime."""

    def generate(
        self,
        sources: Sequence[str],
        settings: Any,
        *,
        indices: Sequence[Sequence[int]] | None = None,
        topk: int = 0,
        prefixes: Sequence[Sequence[int]] | None = None,
        desc: str | None = None,
        on_done: Callable[[int, list[Generated]], None] | None = None,
    ) -> list[list[Generated]]:
        """The outputs of each source under `settings` (a `config.GenerationSettings`), in the sources' order.

        Args:
            indices: per source, which of its `settings.num_return` outputs to write (sample indices, beam ranks);
                default all of them.
            topk: also give the writer's top-k log-probs at every output token (0: none).
            prefixes: per source, target tokens its output starts with (given, and part of the output).
            desc: a progress bar's label (None: no bar).
            on_done: called with (position in `sources`, its outputs) as soon as a source's outputs are ready (an
                endpoint's answers as they arrive), so that a caller can keep them before the whole call ends.
        """
        ...


def open_generator(backend: str, model: Any, **options: Any) -> Generator:
    """A generator of backend `backend` (a key of `BACKENDS`) around `model`."""
    return importlib.import_module(BACKENDS[backend]).open(model, **options)


def input_key(source: str) -> str:
    """The store's key of an input: sha256 of the exact source text the teacher reads (template applied)."""
    return hashlib.sha256(source.encode()).hexdigest()


def sample_seed(base_seed: int, key: str, sample_index: int) -> int:
    """The seed of sample `sample_index` of the input with key `key`, in [0, 2**63).

    A hash of the three arguments only: not of the batch the sample is generated in, nor of what was generated
    before. A run killed at any point and resumed generates the missing PTs with the seeds the uninterrupted run
    would have used, so (with per-row noise, `generation.decode`) it ends with exactly the same PTs.
    """
    digest = hashlib.sha256(f"{base_seed}:{key}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def plan_batches(
    items: Sequence[Any], cost: Callable[[Any], int], group: Callable[[Any], Hashable], batch_size: int
) -> list[list[Any]]:
    """Consecutive items in batches of at most `batch_size` sequences (an item costs `cost(item)`; one over the
    size is a batch of its own); a batch never mixes items of different `group`s."""
    batches: list[list[Any]] = []
    used = 0
    for item in items:
        if batches and group(batches[-1][0]) == group(item) and used + cost(item) <= batch_size:
            batches[-1].append(item)
            used += cost(item)
        else:
            batches.append([item])
            used = cost(item)
    return batches
