"""Configs of how a model writes: decoding settings for evaluation, and the named specs PTs are generated with."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

from distilgen.config.base import check
from distilgen.registry import lookup, registrar

SpecKind = Literal["greedy", "beam", "sample"]


@dataclass(frozen=True)
class GenerationSettings:
    """How a model writes, the one type every generator reads (`distilgen.generation`): what `decoding:` (evaluation),
    a named PT spec and `student_pts:` each say, with their range checks here once.

    Sample i of an input is drawn with seed `sample_seed(seed, input_key(source), i)`: a hash of the input and the
    index only, so a sample does not depend on the batch it is drawn in, nor on the machine."""

    kind: SpecKind = "greedy"
    """greedy (one output per input), beam (the `num_return` best beams) or sample (`num_return` samples)."""
    max_new_tokens: int = 64
    """Longest output, in tokens."""
    num_return: int = 1
    """Outputs per input: beams returned (kind beam) or samples (kind sample)."""
    num_beams: int = 1
    """Beam width (kind beam)."""
    temperature: float = 1.0
    """Sampling temperature (kind sample)."""
    top_p: float = 1.0
    """Nucleus sampling mass (kind sample); 1.0 is plain sampling."""
    top_k: int = 0
    """Keep only the k most likely tokens (kind sample); 0 disables."""
    length_penalty: float = 1.0
    """Beam search: exponent on the length when ranking finished beams (> 1 favours longer outputs)."""
    no_repeat_ngram_size: int = 0
    """Forbid repeating any n-gram of this size; 0 allows repeats."""
    seed: int = 0
    """Base seed of the samples (kind sample)."""

    def __post_init__(self):
        check(self.kind in ("greedy", "beam", "sample"), "kind", f"must be greedy, beam or sample, got {self.kind!r}")
        check(self.max_new_tokens > 0, "max_new_tokens", f"must be > 0, got {self.max_new_tokens}")
        check(self.num_beams >= 1, "num_beams", f"must be >= 1, got {self.num_beams}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.top_k >= 0, "top_k", f"must be >= 0, got {self.top_k}")
        check(self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size", "must be >= 0")
        check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        if self.kind == "beam":
            check(self.num_beams >= 2, "num_beams", f"beam search needs >= 2 beams, got {self.num_beams}")
            check(
                1 <= self.num_return <= self.num_beams,
                "num_return",
                f"must be in [1, num_beams={self.num_beams}], got {self.num_return}",
            )
        else:
            check(self.num_beams == 1, "num_beams", f"only beam search uses beams (this is {self.kind})")
        check(self.num_return >= 1, "num_return", f"must be >= 1, got {self.num_return}")

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `transformers` `generate` (beam search, and a model whose own generation config adds
        rules; `generate` samples from torch's global generator, not from per-sample seeds)."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "num_beams": self.num_beams,
            "do_sample": self.kind == "sample",
            "num_return_sequences": self.num_return,
        }
        if self.kind == "sample":
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        if self.kind == "beam":
            kwargs["length_penalty"] = self.length_penalty
        if self.no_repeat_ngram_size:
            kwargs["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        return kwargs


@dataclass
class DecodingConfig:
    """How a model writes in evaluation, the diagnostic and dev evaluation: greedy, beam search or sampling."""

    max_new_tokens: int = 64
    """Longest output, in tokens."""
    num_beams: int = 1
    """Beam width; 1 is greedy (or plain sampling with do_sample)."""
    do_sample: bool = False
    """Sample instead of taking the most likely token (each input's sample is seeded by its text; a model whose
    own generation config adds rules samples through `generate`, from torch's global generator)."""
    temperature: float = 1.0
    """Sampling temperature (with do_sample)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with this much probability (with do_sample)."""
    top_k: int = 0
    """0 disables top-k filtering."""
    length_penalty: float = 1.0
    """Beam search: exponent on the length when ranking finished beams (> 1 favours longer outputs)."""
    no_repeat_ngram_size: int = 0
    """Forbid repeating any n-gram of this size; 0 allows repeats."""
    batch_size: int = 32
    """Sequences generated together."""

    def __post_init__(self):
        check(not (self.do_sample and self.num_beams > 1), "do_sample", "beam search does not sample: set num_beams=1")
        self.settings()  # the range checks, under the same keys
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")

    def settings(self, seed: int = 0) -> GenerationSettings:
        """These settings for a generator; a sample of an input is seeded by `seed` and the input's text."""
        return GenerationSettings(
            "beam" if self.num_beams > 1 else "sample" if self.do_sample else "greedy",
            max_new_tokens=self.max_new_tokens,
            num_beams=self.num_beams,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            length_penalty=self.length_penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            seed=seed,
        )


_USED_BY = {
    "num_beams": "beam",
    "num_return": "beam",
    "length_penalty": "beam",
    "num_samples": "sample",
    "temperature": "sample",
    "top_p": "sample",
    "top_k": "sample",
    "seed": "sample",
}
"""Fields that only one kind uses; the others must leave them at their defaults (a mistake otherwise)."""

_COUNT_FIELDS = ("name", "num_return", "num_samples")
"""Fields that do not change any single PT, so not in the fingerprint: output i of beam search is the i-th best
beam whatever the number returned, and sample i depends only on (seed, input, i). Raising the count later only
generates the extra indices."""


@dataclass(frozen=True)
class DecodingSpec:
    """A named way to generate PTs: greedy, beam search (the best `num_return` beams) or `num_samples` samples."""

    name: str
    """Name shown in reports; not part of the fingerprint (two names for one spec share their PTs)."""
    kind: SpecKind = "greedy"
    """greedy (1 PT per input), beam (num_return PTs) or sample (num_samples PTs)."""
    num_beams: int = 1
    """Beam width (kind beam, >= 2)."""
    num_return: int = 1
    """Best beams kept as PTs (kind beam, <= num_beams)."""
    num_samples: int = 1
    """Samples per input (kind sample): the K PTs an example cycles through, one per epoch."""
    temperature: float = 1.0
    """Sampling temperature (kind sample)."""
    top_p: float = 1.0
    """Nucleus sampling mass (kind sample); 1.0 is plain sampling."""
    top_k: int = 0
    """Keep only the k most likely tokens (kind sample); 0 disables."""
    max_new_tokens: int = 64
    """Longest PT, in teacher tokens."""
    length_penalty: float = 1.0
    """Beam search length exponent (kind beam)."""
    no_repeat_ngram_size: int = 0
    """Forbid repeating n-grams of this size; 0 allows repeats."""
    seed: int = 0
    """Base seed of sampled PTs (kind sample): sample i of input x uses `sample_seed(seed, input_key(x), i)`."""

    def __post_init__(self):
        check(bool(self.name), "name", "must not be empty")
        check(self.kind in ("greedy", "beam", "sample"), "kind", f"must be greedy, beam or sample, got {self.kind!r}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key, kind in _USED_BY.items():
            if self.kind != kind:
                check(
                    getattr(self, key) == defaults[key],
                    key,
                    f"only used by kind '{kind}' (this spec is '{self.kind}'); remove it or change the kind",
                )
        check(self.num_samples >= 1, "num_samples", f"must be >= 1, got {self.num_samples}")
        self.settings()  # the range checks of the shared settings, under the same keys

    @property
    def num_per_input(self) -> int:
        """PTs generated per input: 1 (greedy), num_return (beam) or num_samples (sample)."""
        return self.settings().num_return

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of every field that changes a PT (not the name nor the counts)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in _COUNT_FIELDS}
        return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def settings(self) -> GenerationSettings:
        """The spec as the settings a generator reads (its samples or beams returned as `num_return`)."""
        shared = [f.name for f in dataclasses.fields(GenerationSettings) if hasattr(self, f.name)]
        fields = {name: getattr(self, name) for name in shared}
        fields["num_return"] = {"greedy": 1, "beam": self.num_return, "sample": self.num_samples}[self.kind]
        return GenerationSettings(**fields)


SPECS: dict[str, DecodingSpec] = {}
"""Built-in decoding specs by name (`pts.spec: sample`), filled by `register_spec`; here, beside the spec type,
so that validating a config imports nothing of the pipeline."""

register_spec = registrar(SPECS, "decoding spec")
"""`register_spec(name)(spec)` adds a named spec to `SPECS`."""

for _spec in (
    DecodingSpec("greedy"),
    DecodingSpec("beam4", "beam", num_beams=4),
    DecodingSpec("sample", "sample", num_samples=4),  # the study: plain sampling beats beam PTs
    DecodingSpec("sample_t15", "sample", num_samples=4, temperature=1.5),  # high temperature: comparable
    DecodingSpec("sample_t07", "sample", num_samples=4, temperature=0.7, top_p=0.9),  # instruct LLM teachers
):
    register_spec(_spec.name)(_spec)


def get_spec(name: str) -> DecodingSpec:
    """The built-in spec `name`; a ValueError listing the valid names otherwise."""
    return lookup(SPECS, name, "decoding spec")
