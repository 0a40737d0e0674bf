"""Typed configs: one dataclass per concern, loaded from YAML, overridden by `key.sub=value`.

Every value is checked before any model or data is touched: an unknown key, a wrong type, a
missing file or an impossible value raises `ConfigError` with the dotted key and a fix, which the
CLI prints as one line with exit code 2.

    cfg = load_config(FinetuneConfig, "configs/quickstart_teacher.yaml", ["train.lr=3e-4"])
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import tempfile
import types
import typing
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from distilgen.registry import lookup, registrar


class ConfigError(ValueError):
    """A user error in a config: `key` is the dotted path of the offending value."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)

    def under(self, prefix: str) -> ConfigError:
        """The same error, for a config placed under `prefix` ("" : at the top)."""
        if not prefix:
            return self
        return ConfigError(f"{prefix}.{self.key}" if self.key else prefix, self.message)


def check(condition: bool, key: str, message: str) -> None:
    """Raise a `ConfigError` for `key` unless `condition` holds (used in `__post_init__`)."""
    if not condition:
        raise ConfigError(key, message)


_MISSING_PATHS: ContextVar[list[ConfigError] | None] = ContextVar("missing paths", default=None)
"""While `load_config` builds a config: where `check_path` puts the paths it finds missing."""
_WHERE: ContextVar[str] = ContextVar("config prefix", default="")
"""The dotted key of the config `from_dict` is building (for the keys of deferred errors)."""


def check_path(condition: bool, key: str, message: str) -> None:
    """`check` for a file or directory that must exist. While `load_config` builds a whole config it is checked
    last: every key's value is validated first, so a misspelled key is reported even when a path is missing too."""
    if condition:
        return
    missing = _MISSING_PATHS.get()
    if missing is None:
        raise ConfigError(key, message)
    missing.append(ConfigError(key, message).under(_WHERE.get()))


@contextlib.contextmanager
def paths_checked_last(missing: list[ConfigError]) -> Iterator[list[ConfigError]]:
    """Within it, `check_path` puts the paths it finds missing in `missing` instead of raising."""
    token = _MISSING_PATHS.set(missing)
    try:
        yield missing
    finally:
        _MISSING_PATHS.reset(token)


def writable_dir(path: str | os.PathLike, key: str = "output_dir") -> Path:
    """Create directory `path` (parents too) and check that files can be written in it, before any work starts:
    a `ConfigError` naming `key` when it is a file, or the place is read-only."""
    path = Path(path)
    check(not path.exists() or path.is_dir(), key, f"{path} is a file; name a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ConfigError(key, f"cannot write in {path} ({err.strerror.lower()})") from None
    return path


# ---------------------------------------------------------------------------------------------
# Concerns
# ---------------------------------------------------------------------------------------------


@dataclass
class BuiltinTaskConfig:
    """A procedurally generated task (see `distilgen.tasks`); sizes are numbers of examples."""

    name: str = "match_reports"
    """Registered task name."""
    seed: int = 0
    """Seed of the generator: the same seed gives the same splits on every machine."""
    train_size: int = 2000
    """Labeled training examples."""
    unlabeled_size: int = 8000
    """Unlabeled inputs (about 4x the labeled data, as in the study's realistic setup)."""
    dev_size: int = 200
    """Labeled examples for early stopping."""
    test_size: int = 500
    """Labeled examples for the final report."""

    def __post_init__(self):
        from distilgen.tasks import TASKS

        check(self.name in TASKS, "name", f"unknown task '{self.name}'; choose one of: {', '.join(sorted(TASKS))}")
        for key in ("train_size", "unlabeled_size", "dev_size", "test_size"):
            check(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")


@dataclass
class DataConfig:
    """Where the splits come from and how records are read.

    A split is a file (`.jsonl`, `.json`, `.csv`, `.parquet`), a directory written by
    `datasets.save_to_disk` (`dir` or `dir@split` for a DatasetDict), or a hub dataset
    `hub:owner/name@split` (the only case that touches the network).
    """

    task: BuiltinTaskConfig | None = None
    """A built-in task; when set, it supplies every split and the file fields must be empty."""
    train: str | None = None
    """Labeled training data."""
    unlabeled: str | None = None
    """Task inputs without targets (their targets, if any, are ignored)."""
    dev: str | None = None
    """Labeled data for early stopping."""
    test: str | None = None
    """Labeled data for the final report."""
    source_field: str = "source"
    """Column holding the model input."""
    target_field: str = "target"
    """Column holding the target: a string, or a list of strings (several references; the first trains)."""
    id_field: str | None = None
    """Column holding a stable example id; by default the id is a hash of the source."""
    hub_config: str | None = None
    """Config name for `hub:` datasets that have several."""
    template: str = "{source}"
    """Prompt template applied to every source, e.g. 'summarize: {source}'."""
    max_source_length: int = 256
    """Source tokens kept (longer sources are truncated and counted)."""
    max_target_length: int = 64
    """Target tokens kept (longer targets are truncated and counted)."""

    def __post_init__(self):
        files = ("train", "unlabeled", "dev", "test")
        if self.task is not None:
            for key in files:
                check(getattr(self, key) is None, key, "leave empty when data.task is set (the task supplies it)")
        else:
            check(
                self.train is not None or self.test is not None or self.unlabeled is not None,
                "",
                "data needs a built-in `task` or at least one split file (train, unlabeled, dev, test)",
            )
        for key in files:
            spec = getattr(self, key)
            if spec is not None and not spec.startswith("hub:"):
                path = spec.split("@", 1)[0] if not os.path.exists(spec) else spec
                check_path(os.path.exists(path), key, f"file not found: {path}")
        check("{source}" in self.template, "template", f"must contain '{{source}}', got {self.template!r}")
        check(self.max_source_length > 0, "max_source_length", f"must be > 0, got {self.max_source_length}")
        check(self.max_target_length > 0, "max_target_length", f"must be > 0, got {self.max_target_length}")


Architecture = Literal["bart", "t5", "gpt2"]


def _looks_local(name: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else (or anything that exists) is a local path."""
    return os.path.exists(name) or name.startswith(("/", ".", "~")) or name.count("/") > 1


@dataclass
class ModelConfig:
    """A model to load (`path`: hub id or local directory) or to build at random from `arch` and sizes."""

    path: str | None = None
    """Hub id or local directory of a `transformers` model; leave empty to build one from `arch`."""
    arch: Architecture | None = None
    """Family of a model built from scratch: bart / t5 (encoder-decoder) or gpt2 (decoder-only)."""
    hidden_size: int = 128
    """Width of the model (d_model)."""
    encoder_layers: int = 2
    """Encoder layers (ignored for gpt2)."""
    decoder_layers: int = 2
    """Decoder layers (the transformer layers for gpt2)."""
    num_heads: int = 4
    """Attention heads per layer (must divide hidden_size)."""
    ffn_size: int = 512
    """Inner width of the feed-forward blocks."""
    dropout: float = 0.1
    """Dropout rate of a model built from scratch."""
    max_positions: int = 512
    """Longest source + target the model can see (learned position tables)."""
    shrink: str | int | None = None
    """Keep only some layers of the model at `path`: `E:D` counts (6:2 keeps encoder 0-5, decoder 0 and 5),
    explicit lists (0,2,4:0,5), or `D` for decoder-only; first and last layers kept, the rest spread evenly."""
    tokenizer: str | None = None
    """Tokenizer directory or hub id; default: the model's own, or one trained on the task data."""
    vocab_size: int = 2000
    """Vocabulary of a tokenizer trained on the task data (only when one is trained)."""

    def __post_init__(self):
        check(
            self.path is not None or self.arch is not None,
            "",
            "model needs `path` (a hub id or directory) or `arch` (bart, t5, gpt2) to build one",
        )
        check(self.path is None or self.arch is None, "arch", "set either `path` or `arch`, not both")
        check(self.shrink is None or self.path is not None, "shrink", "shrinking needs a teacher to copy: set `path`")
        self.shrink = None if self.shrink is None else str(self.shrink)  # `shrink=4` (a count) reads as an integer
        if self.path is not None and _looks_local(self.path):
            check_path(os.path.isdir(self.path), "path", f"directory not found: {self.path}")
        for key in ("hidden_size", "decoder_layers", "num_heads", "ffn_size", "max_positions"):
            check(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)}")
        check(self.encoder_layers >= 0, "encoder_layers", f"must be >= 0, got {self.encoder_layers}")
        check(
            self.hidden_size % self.num_heads == 0,
            "num_heads",
            f"must divide hidden_size ({self.hidden_size}), got {self.num_heads}",
        )
        check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        check(self.vocab_size >= 100, "vocab_size", f"must be >= 100, got {self.vocab_size}")


@dataclass
class TeacherConfig(ModelConfig):
    """The teacher: its kind, and for a model run here (`hf`) the model to load, as any `model` section."""

    kind: str = "hf"
    """hf: a transformers model (path: hub id or directory), run here; it can give full logits, top-k, text."""

    def __post_init__(self):
        from distilgen.teachers import TEACHER_KINDS  # imports nothing of the pipeline

        check(
            self.kind in TEACHER_KINDS,
            "kind",
            f"unknown teacher kind '{self.kind}'; one of: {', '.join(TEACHER_KINDS)}",
        )
        super().__post_init__()

    def require(self, needs: frozenset[str], what: str, alternatives: list[str] | None = None) -> None:
        """A `ConfigError` unless this teacher can give `needs` (capabilities `what` asks for), naming the
        `alternatives` that would work."""
        from distilgen.teachers import TEACHER_KINDS, describe

        missing = needs - TEACHER_KINDS[self.kind].capabilities
        if missing:
            hint = f"; with this teacher choose one of: {', '.join(alternatives)}" if alternatives else ""
            raise ConfigError("teacher.kind", f"{what} needs a teacher that gives {describe(missing)}, which a "
                              f"'{self.kind}' teacher does not{hint}")  # fmt: skip


@dataclass
class DecodingConfig:
    """How to generate: greedy, beam search or sampling (the keyword arguments of `generate`)."""

    max_new_tokens: int = 64
    """Longest output, in tokens."""
    num_beams: int = 1
    """Beam width; 1 is greedy (or plain sampling with do_sample)."""
    do_sample: bool = False
    """Sample instead of taking the most likely token."""
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
        check(self.max_new_tokens > 0, "max_new_tokens", f"must be > 0, got {self.max_new_tokens}")
        check(self.num_beams >= 1, "num_beams", f"must be >= 1, got {self.num_beams}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.top_k >= 0, "top_k", f"must be >= 0, got {self.top_k}")
        check(self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size", "must be >= 0")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")

    def greedy_spec(self) -> DecodingSpec | None:
        """These settings as a greedy `DecodingSpec` (for `decoding.decode`); None for beam search or sampling."""
        if self.num_beams > 1 or self.do_sample:
            return None
        return DecodingSpec(
            "greedy", max_new_tokens=self.max_new_tokens, no_repeat_ngram_size=self.no_repeat_ngram_size
        )

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "num_beams": self.num_beams,
            "do_sample": self.do_sample,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        if self.num_beams > 1:
            kwargs["length_penalty"] = self.length_penalty
        if self.no_repeat_ngram_size:
            kwargs["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        return kwargs


SpecKind = Literal["greedy", "beam", "sample"]

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
        self._decoding_config()  # range checks of the shared generation settings, with the same keys
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key, kind in _USED_BY.items():
            if self.kind != kind:
                check(
                    getattr(self, key) == defaults[key],
                    key,
                    f"only used by kind '{kind}' (this spec is '{self.kind}'); remove it or change the kind",
                )
        if self.kind == "beam":
            check(self.num_beams >= 2, "num_beams", f"beam search needs >= 2 beams, got {self.num_beams}")
            check(
                1 <= self.num_return <= self.num_beams,
                "num_return",
                f"must be in [1, num_beams={self.num_beams}], got {self.num_return}",
            )
        check(self.num_samples >= 1, "num_samples", f"must be >= 1, got {self.num_samples}")
        check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")

    @property
    def num_per_input(self) -> int:
        """PTs generated per input: 1 (greedy), num_return (beam) or num_samples (sample)."""
        return {"greedy": 1, "beam": self.num_return, "sample": self.num_samples}[self.kind]

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of every field that changes a PT (not the name nor the counts)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in _COUNT_FIELDS}
        return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `transformers` `generate` (which samples from torch's global generator; PTs of
        greedy and sampling specs come from `distilgen.decoding.decode`, with per-PT seeds)."""
        kwargs = self._decoding_config().generate_kwargs()
        if self.kind == "beam":
            kwargs["num_return_sequences"] = self.num_return
        return kwargs

    def _decoding_config(self) -> DecodingConfig:
        return DecodingConfig(
            max_new_tokens=self.max_new_tokens,
            num_beams=self.num_beams,
            do_sample=self.kind == "sample",
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            length_penalty=self.length_penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
        )


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
):
    register_spec(_spec.name)(_spec)


def get_spec(name: str) -> DecodingSpec:
    """The built-in spec `name`; a ValueError listing the valid names otherwise."""
    return lookup(SPECS, name, "decoding spec")


Precision = Literal["auto", "no", "bf16", "fp16"]
StaticCache = Literal["auto", "on", "off"]
"""Decoding with a static KV cache (compiled decoder step on a GPU); auto: on when the model is on a GPU where
the step compiles (Triton installed)."""


@dataclass
class TrainConfig:
    """Optimisation, evaluation during training, early stopping and checkpoints."""

    epochs: float = 10.0
    """Passes over the training data (fractions allowed); `max_steps` wins when set."""
    max_steps: int | None = None
    """Optimizer steps to train for; overrides epochs."""
    batch_size: int = 32
    """Examples per micro-batch on each process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 5e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and norms)."""
    warmup_ratio: float = 0.05
    """Fraction of the steps with a linear warm-up."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate decay after warm-up."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global norm."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""
    precision: Precision = "auto"
    """Mixed precision: auto = bf16 on a GPU that supports it, else full fp32."""
    eval_every: int = 200
    """Steps between dev evaluations (and checkpoints); 0 evaluates only at the end of each epoch."""
    metric: str = "bleu"
    """Dev metric for early stopping and the best checkpoint ('loss' avoids generation)."""
    patience: int = 5
    """Dev evaluations without improvement before stopping; 0 never stops early."""
    dev_limit: int | None = None
    """Evaluate on at most this many dev examples (faster evaluation)."""
    checkpoint_every: int = 0
    """Extra checkpoints between evaluations (steps); 0 checkpoints only at evaluations."""
    log_every: int = 10
    """Steps between loss lines in metrics.jsonl and the progress bar."""
    trackers: list[str] = field(default_factory=list)
    """Accelerate trackers to log to besides the JSONL log (e.g. tensorboard, wandb)."""
    max_bad_steps: int = 3
    """Consecutive steps with a non-finite loss or gradient that are skipped before training stops."""

    def __post_init__(self):
        check(self.epochs > 0, "epochs", f"must be > 0, got {self.epochs}")
        check(self.max_steps is None or self.max_steps > 0, "max_steps", f"must be > 0, got {self.max_steps}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.grad_accum >= 1, "grad_accum", f"must be >= 1, got {self.grad_accum}")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(0 <= self.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        check(self.max_grad_norm > 0, "max_grad_norm", f"must be > 0, got {self.max_grad_norm}")
        check(0 <= self.label_smoothing < 1, "label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        check(self.eval_every >= 0, "eval_every", f"must be >= 0, got {self.eval_every}")
        from distilgen.metrics import METRICS, MODEL_METRICS

        valid = sorted([*METRICS, *MODEL_METRICS, "loss"])
        check(self.metric in valid, "metric", f"unknown metric '{self.metric}'; choose one of: {', '.join(valid)}")
        check(self.patience >= 0, "patience", f"must be >= 0, got {self.patience}")
        check(self.dev_limit is None or self.dev_limit > 0, "dev_limit", f"must be > 0, got {self.dev_limit}")
        check(self.checkpoint_every >= 0, "checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        check(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        check(self.max_bad_steps >= 1, "max_bad_steps", f"must be >= 1, got {self.max_bad_steps}")


@dataclass
class InspectConfig:
    """`distilgen inspect MODEL`: parameters, FLOPs, latency and throughput of a model (or of a shrunk copy)."""

    model: str
    """Model directory or hub id."""
    shrink: str | int | None = None
    """Report on a copy keeping these layers (E:D or D, see model.shrink) instead of the model itself."""
    save: str | None = None
    """Write the (shrunk) model and its tokenizer to this directory."""
    input_length: int = 128
    """Source tokens of the timed inputs (random token ids)."""
    output_length: int = 32
    """Generated tokens per timed output (exactly this many: EOS is ignored)."""
    batch_size: int = 32
    """Batch size of the throughput measurement."""
    latency_runs: int = 10
    """Single-example generations whose median is the latency."""
    seed: int = 0
    """Seed of the random inputs."""

    def __post_init__(self):
        self.shrink = None if self.shrink is None else str(self.shrink)
        for key in ("input_length", "output_length", "batch_size", "latency_runs"):
            check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")


@dataclass
class CostConfig:
    """How the cost of a model is measured (latency at batch 1, throughput at batch N)."""

    enabled: bool = True
    """Measure cost at all (it takes extra generations)."""
    latency_runs: int = 10
    """Single-example generations whose median is the latency."""
    throughput_batch: int = 32
    """Batch size of the throughput measurement."""
    throughput_examples: int = 128
    """Examples generated to measure throughput."""

    def __post_init__(self):
        check(self.latency_runs >= 1, "latency_runs", f"must be >= 1, got {self.latency_runs}")
        check(self.throughput_batch >= 1, "throughput_batch", f"must be >= 1, got {self.throughput_batch}")
        check(self.throughput_examples >= 1, "throughput_examples", "must be >= 1")


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


@dataclass
class FinetuneConfig:
    """`distilgen finetune`: train a model on labeled data (teachers and the student baseline)."""

    output_dir: str
    """Run directory: checkpoints, logs and the final model (`output_dir/model`)."""
    data: DataConfig
    """The splits: train (required), unlabeled (for the tokenizer), dev (early stopping)."""
    model: ModelConfig
    """The model to train."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, evaluation and checkpoints."""
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    """Decoding for dev evaluation."""
    objective: Literal["target", "denoise"] = "target"
    """target: learn source -> target on the labeled data. denoise: domain-adaptive pre-training on the task's
    text without labels (sources of train and unlabeled): rebuild windows of text from a copy with tokens
    dropped or masked, as in BART; fine-tune the result with `model.path` afterwards."""
    denoise: DenoiseConfig = field(default_factory=lambda: DenoiseConfig())
    """Settings of objective=denoise."""
    seed: int = 0
    """Seed of model initialisation, dropout and data order."""

    def __post_init__(self):
        check(
            self.objective != "denoise" or self.train.metric in ("loss", "perplexity"),
            "train.metric",
            "denoising is early-stopped on dev loss or perplexity (its outputs are text windows); set loss",
        )


@dataclass
class DenoiseConfig:
    """Denoising pre-training: each window of text is rebuilt from a noised copy (fresh noise every step)."""

    window: int = 64
    """Tokens per window (texts are cut into consecutive windows)."""
    rate: float = 0.3
    """Share of the source's tokens hit by noise (permute: share of tokens that start a new span)."""
    kind: Literal["mask", "drop", "permute"] = "drop"
    """drop: hit tokens are removed; mask: replaced by the mask (else unknown) token; permute: the source is
    cut into spans (mean length 1/rate) put in random order, so the model must find each next span by content."""
    source: Literal["window", "text"] = "window"
    """window: the model reads the noised window; text: it reads the whole noised text and writes one of its
    windows, so every source position is trained and the window must be found in a long input."""

    def __post_init__(self):
        check(self.window >= 4, "window", f"must be >= 4, got {self.window}")
        check(0.0 < self.rate < 1.0, "rate", f"must be in (0, 1), got {self.rate}")


@dataclass
class EvaluateConfig:
    """`distilgen evaluate`: score one or several models side by side on a split."""

    output_dir: str
    """Where report.json, report.md and generations/ go."""
    data: DataConfig
    """The split to score comes from here."""
    models: list[str]
    """Model directories (or hub ids) to compare, the first being the reference (e.g. the teacher)."""
    split: Literal["dev", "test"] = "test"
    """Which labeled split to score."""
    metrics: list[str] = field(default_factory=lambda: ["bleu", "rouge", "chrf", "exact_match", "perplexity"])
    """Text metrics (see distilgen.metrics) and `perplexity` of the gold targets."""
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    """How every model generates."""
    cost: CostConfig = field(default_factory=CostConfig)
    """How cost (latency, throughput, memory) is measured."""
    limit: int | None = None
    """Score at most this many examples."""
    seed: int = 0
    """Seed for sampling decoders."""

    def __post_init__(self):
        from distilgen.metrics import METRICS, MODEL_METRICS

        check(len(self.models) >= 1, "models", "name at least one model directory or hub id")
        for i, path in enumerate(self.models):
            check_path(not _looks_local(path) or os.path.isdir(path), f"models[{i}]", f"directory not found: {path}")
        valid = sorted([*METRICS, *MODEL_METRICS])
        for metric in self.metrics:
            check(metric in valid, "metrics", f"unknown metric '{metric}'; choose from: {', '.join(valid)}")
        check(self.limit is None or self.limit > 0, "limit", f"must be > 0, got {self.limit}")


@dataclass
class GenerateConfig:
    """`distilgen generate`: the teacher's pseudo-targets for the labeled and unlabeled inputs, into a PT store.

    Under `accelerate launch` each process generates a disjoint share; all write into the one store.
    """

    store: str
    """Directory of the PT store (created if missing); shared by every spec and teacher."""
    data: DataConfig
    """The inputs: the splits named in `splits` (the template and max_source_length apply)."""
    teacher: TeacherConfig
    """The teacher: `path` to a trained model (its fingerprint keys the store)."""
    spec: str | DecodingSpec = "sample"
    """A built-in spec (greedy, beam4, sample, sample_t15) or a mapping of spec fields
    ({name: mine, kind: sample, num_samples: 8, top_p: 0.95})."""
    splits: list[Literal["train", "unlabeled", "dev", "test"]] = field(default_factory=lambda: ["train", "unlabeled"])
    """Splits whose inputs get PTs (the study: labeled + unlabeled)."""
    batch_size: int = 64
    """Sequences generated together (a sampled input's K samples are K sequences)."""
    topk: int = 0
    """Also store the teacher's top-k token ids and log-probs at every PT token (for sparse Logits KD without
    the teacher); 0 stores texts and tokens only. Taken from the decoding steps where a PT is what was decoded,
    else from a teacher-forced pass (beams, outputs cut at max_new_tokens)."""
    shard_size: int = 2048
    """PTs per store shard: the most work a crash can lose."""
    static_cache: StaticCache = "auto"
    """Decode with a static KV cache (greedy and sampling specs): on a GPU the decoder step is then compiled
    into CUDA graphs (transformers' compiled call), about 2x faster per batch after a compile of ~10 s per
    source-length bucket (sources are padded to multiples of 64 tokens), and the seeded sampler is compiled
    with it. auto: on when the teacher is on a GPU with Triton; off suits short jobs."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Teacher weights during generation; auto is bf16 on a GPU that supports it, fp32 elsewhere. Part of the
    teacher fingerprint (bf16 and fp32 PTs are stored apart)."""
    limit: int | None = None
    """Use at most this many inputs per split."""

    def __post_init__(self):
        if isinstance(self.spec, str):
            check(self.spec in SPECS, "spec", f"unknown spec '{self.spec}'; built-in: {', '.join(SPECS)}, or a mapping")
        check(self.teacher.path is not None, "teacher.path", "generation needs a trained teacher: set its directory")
        self.teacher.require(frozenset({"text", "topk"} if self.topk else {"text"}), "generate")
        check(len(self.splits) >= 1, "splits", "name at least one split")
        for key in ("batch_size", "shard_size"):
            check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        check(self.topk >= 0, "topk", f"must be >= 0, got {self.topk}")
        check(self.limit is None or self.limit > 0, "limit", f"must be > 0, got {self.limit}")


@dataclass
class KDConfig:
    """Word-level KD: how student and teacher next-token distributions are compared."""

    divergence: str = "forward_kl"
    """forward_kl, reverse_kl, jsd, skew_kl, skew_reverse_kl or total_variation (see distilgen.objectives)."""
    temperature: float = 1.0
    """Softens both distributions; losses are scaled by temperature^2. Stored top-k holds the teacher at
    temperature 1 only: with PTs that carry it, another temperature needs use_stored_topk false."""
    beta: float = 0.5
    """jsd: m = beta p_T + (1 - beta) p_S, loss (1 - beta) KL(p_T||m) + beta KL(p_S||m); 0 is forward KL, 1 reverse
    KL. TRL's generalized_jsd_loss weights the two KLs the other way round: the same at 0, 0.5 and 1 only."""
    alpha: float = 0.1
    """skew_kl / skew_reverse_kl: share of the first distribution mixed into the second; 0 is the plain KL."""
    use_stored_topk: bool = True
    """On teacher PTs whose top-k log-probs are stored, use them (sparse KD over the top-k plus a tail bucket,
    with `divergence`; no teacher pass) instead of the live teacher. Student PTs always need the live teacher."""

    def __post_init__(self):
        from distilgen.objectives import DIVERGENCES

        check(self.divergence in DIVERGENCES, "divergence", f"choose one of: {', '.join(DIVERGENCES)}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(0 <= self.beta <= 1, "beta", f"must be in [0, 1], got {self.beta}")
        check(0 <= self.alpha <= 1, "alpha", f"must be in [0, 1], got {self.alpha}")


@dataclass
class PTConfig:
    """Teacher pseudo-targets for PT methods (seq_kd, logits_kd_pt, joint_teaching)."""

    store: str | None = None
    """PT store directory, shared across runs; default: output_dir/pts."""
    spec: str | DecodingSpec = "sample"
    """How the teacher generates them: a built-in spec (greedy, beam4, sample, sample_t15) or a mapping."""
    unlabeled: bool = True
    """PTs for the unlabeled inputs too (the study's best); false: labeled inputs only."""
    k: int | None = None
    """PTs cycled per input, a different one each epoch; default: all the spec generates (e.g. 4)."""
    include_gold: bool = True
    """Also train on the gold target of each labeled input, every epoch."""
    topk: int = 0
    """Store the teacher's top-k log-probs with new PTs (then kd.use_stored_topk skips the teacher pass)."""
    batch_size: int = 64
    """Sequences per teacher generate call."""
    static_cache: StaticCache = "auto"
    """Teacher decoding with a static KV cache, as `GenerateConfig.static_cache`."""

    def __post_init__(self):
        if isinstance(self.spec, str):
            check(self.spec in SPECS, "spec", f"unknown spec '{self.spec}'; built-in: {', '.join(SPECS)}, or a mapping")
        check(self.k is None or self.k >= 1, "k", f"must be >= 1, got {self.k}")
        if self.k is not None:
            spec = get_spec(self.spec) if isinstance(self.spec, str) else self.spec
            field = "num_samples" if spec.kind == "sample" else "num_return"
            check(
                self.k <= spec.num_per_input,
                "k",
                f"the spec makes {spec.num_per_input} PTs per input, fewer than k={self.k}; raise its {field} or "
                "lower k",
            )
        check(self.topk >= 0, "topk", f"must be >= 0, got {self.topk}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass
class StudentPTConfig:
    """Student PTs, sampled online by the current student (student_pt, joint_teaching)."""

    alpha: float = 0.5
    """Joint-Teaching: weight of teacher PTs; 1 - alpha goes to fresh student PTs (student_pt is alpha 0)."""
    mixing: Literal["steps", "batch"] = "steps"
    """steps: a fraction 1 - alpha of the optimizer steps train on student PTs, interleaved exactly (the
    study); batch: every step trains on both, weighted alpha and 1 - alpha."""
    top_p: float = 0.95
    """Nucleus sampling of the student."""
    temperature: float = 1.0
    """Sampling temperature of the student."""
    max_new_tokens: int = 64
    """Longest student PT."""
    refresh_every: int = 1
    """Staleness knob: sample the student PTs of this many student-PT steps at once, in one batched `decode`,
    by the student of the first of them (1: fresh every step, as in the study). Larger values keep a GPU busier
    during generation; the PTs of a window's later steps are up to refresh_every - 1 student steps old. A
    window stops at the end of an epoch, and a resumed run starts a new one."""
    static_cache: StaticCache = "auto"
    """Sample student PTs with a static KV cache, which on a GPU compiles the student's decoder step (sources
    padded to multiples of 64 tokens; ~19 s of compile per source bucket, once per run) and the seeded
    sampler: on an H100, Joint-Teaching trained 1.26x more samples/s with the compiled step alone (in
    `generate`'s loop). auto: on a GPU with Triton."""

    def __post_init__(self):
        check(0.0 <= self.alpha <= 1.0, "alpha", f"must be in [0, 1], got {self.alpha}")
        check(self.refresh_every >= 1, "refresh_every", f"must be >= 1, got {self.refresh_every}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(self.max_new_tokens > 0, "max_new_tokens", f"must be > 0, got {self.max_new_tokens}")


@dataclass
class NoiseConfig:
    """Noisy KD: noise in the teacher (dropout) and in the student's input (token masking or dropping)."""

    teacher_dropout: float = 0.1
    """Dropout rate the teacher runs with."""
    token_rate: float = 0.1
    """Share of the student's source tokens hit."""
    token_kind: Literal["mask", "drop"] = "drop"
    """mask: replace hit tokens by the tokenizer's mask (or unk) token; drop: remove them."""

    def __post_init__(self):
        check(0.0 <= self.teacher_dropout < 1.0, "teacher_dropout", f"must be in [0, 1), got {self.teacher_dropout}")
        check(0.0 <= self.token_rate < 1.0, "token_rate", f"must be in [0, 1), got {self.token_rate}")


@dataclass
class AttentionKDConfig:
    """Attention-relation KD (MiniLMv2) added to Logits KD."""

    weight: float = 1.0
    """Weight of the relation loss per token, next to the Logits KD term."""
    relation_heads: int = 4
    """Heads the q/k/v projections are re-split into (must divide both models' widths)."""
    which: Literal["encoder", "decoder"] = "encoder"
    """Which stack's last self-attention layer is matched (decoder-only models: decoder)."""

    def __post_init__(self):
        check(self.weight >= 0, "weight", f"must be >= 0, got {self.weight}")
        check(self.relation_heads >= 1, "relation_heads", f"must be >= 1, got {self.relation_heads}")


@dataclass
class DistillConfig:
    """`distilgen distill`: train a student from a teacher with one method of the study."""

    output_dir: str
    """Run directory: the method's stage (distill/), the final fine-tuning stage (finetune/), summary.json."""
    data: DataConfig
    """train (labeled), unlabeled, dev (early stopping)."""
    teacher: TeacherConfig
    """The trained teacher (`path`); never updated."""
    student: ModelConfig
    """The student: a shrunk teacher (path + shrink), another checkpoint, or built from `arch`."""
    method: str = "joint_teaching"
    """finetune, logits_kd, noisy_kd, attention_kd, seq_kd, logits_kd_pt, student_pt or joint_teaching."""
    kd: KDConfig = field(default_factory=KDConfig)
    """Word-level KD settings."""
    pts: PTConfig = field(default_factory=PTConfig)
    """Teacher PTs (PT methods)."""
    student_pts: StudentPTConfig = field(default_factory=StudentPTConfig)
    """Student PTs and Joint-Teaching's mixing."""
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    """Noisy KD settings."""
    attention: AttentionKDConfig = field(default_factory=AttentionKDConfig)
    """Attention-relation KD settings."""
    final_finetune_epochs: float = 1.0
    """Epochs of plain fine-tuning on the labeled data after the method (the study's final stage); 0 skips."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, dev evaluation and checkpoints (both stages)."""
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    """Decoding for dev evaluation."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Teacher weights (generation and KD passes); auto: bf16 on a GPU that supports it."""
    seed: int = 0
    """Seed of student initialisation, dropout, data order and student PT sampling."""

    def __post_init__(self):
        # What depends on the method (its name, what it needs of the teacher) is checked by `distill.check_method`
        # when the command starts, before anything loads: methods live with their code, and configs import none.
        check(self.teacher.path is not None, "teacher.path", "distillation needs a trained teacher: set its directory")
        check(self.final_finetune_epochs >= 0, "final_finetune_epochs", "must be >= 0")


@dataclass
class StudyVariant:
    """One extra run of a study: a method with some settings changed."""

    name: str
    """Its name in the report, e.g. logits_kd_pt_labeled_only."""
    method: str
    """The distillation method."""
    set: dict[str, Any] = field(default_factory=dict)
    """Settings of this run only, as in a distill config, e.g. {pts: {unlabeled: false}}."""


@dataclass
class StudyConfig:
    """`distilgen study`: several methods (and seeds) on one task with a shared teacher, student init and PT
    store; a report of test scores, the fraction of the teacher-student gap closed, cost and a plot."""

    output_dir: str
    """Study directory: one run directory per seed and method, pts/, report.md, report.json, study.png."""
    data: DataConfig
    """The task's splits."""
    teacher: TeacherConfig
    """The trained teacher (`path`)."""
    student: ModelConfig
    """The student every method starts from (same init for the same seed)."""
    methods: list[str] = field(
        default_factory=lambda: ["finetune", "logits_kd", "seq_kd", "logits_kd_pt", "joint_teaching"]
    )
    """Methods run with the common settings; `finetune` is the baseline the gap is measured from."""
    variants: list[StudyVariant] = field(default_factory=list)
    """Extra runs with their own settings (e.g. PTs for labeled inputs only)."""
    common: dict[str, Any] = field(default_factory=dict)
    """Settings of every run, as in a distill config: train, kd, pts, student_pts, final_finetune_epochs..."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Every run is repeated per seed; the report gives mean and standard deviation."""
    split: Literal["dev", "test"] = "test"
    """Split of the final scores."""
    metrics: list[str] = field(default_factory=lambda: ["bleu", "rouge", "chrf", "exact_match"])
    """Text metrics of the report; the gap closed is reported for each."""
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    """How every model generates for the report."""
    cost: CostConfig = field(default_factory=CostConfig)
    """How cost is measured (once per model of seed 0)."""

    def __post_init__(self):
        check(len(self.seeds) >= 1, "seeds", "give at least one seed")
        names = [*self.methods, *(v.name for v in self.variants)]
        check(len(set(names)) == len(names), "variants", f"run names must be unique, got {names}")
        for key in ("output_dir", "data", "teacher", "student", "method", "seed"):
            check(key not in self.common, f"common.{key}", "set by the study itself; remove it")
        self.run_configs()  # every run's settings are checked now, before anything trains

    def run_configs(self) -> list[tuple[str, int, DistillConfig]]:
        """(run name, seed, its distill config) for every run of the study."""
        runs = [(m, m, {}) for m in self.methods] + [(v.name, v.method, v.set) for v in self.variants]
        out = []
        for seed in self.seeds:
            for name, method, own in runs:
                shared = _merge({"pts": {"store": str(Path(self.output_dir) / "pts")}}, self.common)
                data = _merge(
                    shared,
                    {
                        **own,
                        "output_dir": str(Path(self.output_dir) / f"seed{seed}" / name),
                        "data": dataclasses.asdict(self.data),
                        "teacher": dataclasses.asdict(self.teacher),
                        "student": dataclasses.asdict(self.student),
                        "method": method,
                        "seed": seed,
                    },
                )
                where = "common" if not own else f"variants.{name}"
                try:
                    out.append((name, seed, from_dict(DistillConfig, data)))
                except ConfigError as err:
                    raise err.under(where) from None
        return out


@dataclass
class DiagnoseConfig:
    """`distilgen diagnose`: the exposure-bias check. The student writes the first X% of each output and the
    teacher completes it; the score per X shows how much the student's own prefixes hurt."""

    output_dir: str
    """Where diagnose.json, diagnose.md and diagnose.png go."""
    data: DataConfig
    """The split to score comes from here."""
    teacher: TeacherConfig
    """The teacher that completes the outputs (`path`)."""
    students: list[str]
    """Student model directories (e.g. checkpoints of one run, in training order)."""
    fractions: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """Shares of the student's output kept as the prefix (0: the teacher alone; 1: the student alone)."""
    split: Literal["dev", "test"] = "test"
    """Which labeled split to score."""
    metric: str = "bleu"
    """Text metric of the table."""
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    """Greedy or beam settings of both models."""
    limit: int | None = None
    """Score at most this many examples."""

    def __post_init__(self):
        from distilgen.metrics import METRICS

        check(self.teacher.path is not None, "teacher.path", "set the teacher's directory")
        self.teacher.require(frozenset({"logits"}), "diagnose (the teacher completes the student's prefixes)")
        check(len(self.students) >= 1, "students", "name at least one student directory")
        for i, path in enumerate(self.students):
            check_path(not _looks_local(path) or os.path.isdir(path), f"students[{i}]", f"directory not found: {path}")
        check(all(0.0 <= f <= 1.0 for f in self.fractions), "fractions", "every fraction must be in [0, 1]")
        check(self.metric in METRICS, "metric", f"choose one of: {', '.join(sorted(METRICS))}")
        check(self.limit is None or self.limit > 0, "limit", f"must be > 0, got {self.limit}")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the type hint `tp` (with the few coercions YAML needs)."""
    origin = typing.get_origin(tp)
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0] if len(errors) == 1 else ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        check(value in typing.get_args(tp), key, f"expected one of {_type_name(tp)}, got {value!r}")
        return value
    if origin is dict:  # free-form mappings, validated by the code that reads them (e.g. study runs)
        check(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        return value
    if origin is list:
        check(isinstance(value, list | tuple), key, f"expected a list, got {value!r}")
        return [_convert(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        check(isinstance(value, dict), key, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, key)
    if tp is bool:
        check(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        check(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        check(isinstance(value, int | float) and not isinstance(value, bool), key, f"expected a number, got {value!r}")
        check(math.isfinite(value), key, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {key}")  # an internal bug, not a user error


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a plain mapping, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    where = f"{prefix}." if prefix else ""
    for key in data:
        if key not in fields:
            raise ConfigError(f"{where}{key}", f"unknown key; valid keys here: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            value = data[name]
            if f.default_factory is not dataclasses.MISSING and isinstance(value, dict):
                default = f.default_factory()
                if dataclasses.is_dataclass(default):  # a partial mapping overrides the default's fields
                    value = _merge(dataclasses.asdict(default), value)
            kwargs[name] = _convert(value, hints[name], f"{where}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}{name}", "required key is missing")
    where_token = _WHERE.set(prefix)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.under(prefix) from None
    finally:
        _WHERE.reset(where_token)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        both_dicts = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_dicts else value
    return merged


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


class _YamlLoader(yaml.SafeLoader):
    """YAML with 1.2-style numbers: `3e-4` is a float and `6:2` a string (YAML 1.1 reads a string and 362)."""


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(_INT, re.compile(r"^[-+]?(0|[1-9][0-9_]*)$"), list("-+0123456789"))
_YamlLoader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"^[-+]?(\.[0-9]+|[0-9][0-9_]*(\.[0-9_]*)?)([eE][-+]?[0-9]+)?$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 (a SafeLoader subclass)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a nested mapping, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "overrides are written key.sub=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = data
        for key in keys[:-1]:
            if node.get(key) is None:
                node[key] = {}
            if not isinstance(node[key], dict):
                raise ConfigError(dotted, f"'{key}' is not a mapping, cannot set a sub-key")
            node = node[key]
        try:
            node[keys[-1]] = parse_yaml(raw)
        except yaml.YAMLError as err:
            raise ConfigError(dotted, f"cannot parse value {raw!r}: {err.problem}") from None
    return data


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"config file not found: {path}")
    try:
        data = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError("", f"{path}{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: the top level must be a mapping of keys")
    return data


def load_config(
    cls: type, path: str | os.PathLike | None, overrides: list[str] = (), missing_paths: list | None = None
) -> Any:
    """Read YAML (optional), apply dotted overrides, then build and validate `cls`, checking that files and
    directories exist last (see `check_path`). With a `missing_paths` list, those errors go there instead."""
    data = read_yaml(path) if path is not None else {}
    found: list[ConfigError] = []
    with paths_checked_last(found):
        cfg = from_dict(cls, apply_overrides(data, list(overrides)))
    if missing_paths is not None:
        missing_paths.extend(found)
    elif found:
        raise found[0]
    return cfg


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write `cfg` as YAML, atomically (a crash leaves the old file or the new one)."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
