"""Configs of the commands that put a model to use: `serve` (an OpenAI-compatible API) and `export` (a runtime)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from distilgen.config.base import check, check_path
from distilgen.config.sources import check_model_path


@dataclass
class ExportConfig:
    """`distilgen export MODEL`: the model converted for a fast inference runtime, as it will be deployed."""

    model: str
    """Model directory, hub id or `pkg:` file to export (a student, a teacher, an HF checkpoint, a GGUF file)."""
    output_dir: str
    """The export (loaded by `evaluate` and `serve` like any model)."""
    format: Literal["ctranslate2"] = "ctranslate2"
    """The runtime: CTranslate2 (BART, T5, GPT-2, Llama, Qwen2/3, Mistral)."""
    quantization: Literal["int8", "int8_float32", "float16", "float32"] = "int8"
    """Weights as stored and computed: int8 (int8 matrix products), int8_float32, float16 (GPU), float32."""
    overwrite: bool = False
    """Replace an existing `output_dir`."""
    trim_vocabulary: str | None = None
    """A YAML config whose `data` is the model's task (its distill config): the export keeps only the tokens of the
    train, unlabeled and dev prompts and references (all of them, whatever `data.limits` says), and what tokenizing
    other text needs (README, "Deployment"): a smaller output layer, faster decoding for a student with an LLM's
    vocabulary. Empty: the whole vocabulary."""

    def __post_init__(self):
        check(self.format == "ctranslate2", "format", f"must be ctranslate2, got {self.format!r}")
        if self.trim_vocabulary is not None:
            check_path(os.path.isfile(self.trim_vocabulary), "trim_vocabulary", f"{self.trim_vocabulary} is not a file")
        valid = ("int8", "int8_float32", "float16", "float32")
        got = self.quantization
        check(got in valid, "quantization", f"must be one of {', '.join(valid)}, got {got!r}")
        check_model_path(self.model, "model")


@dataclass
class ServeConfig:
    """`distilgen serve MODEL`: an OpenAI-compatible HTTP server for a model distilgen can load."""

    model: str
    """Model directory, hub id or `pkg:` file (a student, a teacher, an HF checkpoint, a GGUF file)."""
    name: str | None = None
    """The model id clients name in requests; default: the model's directory name (`model_label`)."""
    host: str = "127.0.0.1"
    """Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface)."""
    port: int = 8000
    """Port to listen on."""
    api_key_env: str | None = None
    """An environment variable holding the API key: requests must then send `Authorization: Bearer KEY`."""
    max_tokens: int = 256
    """The most tokens a request may ask for (`max_tokens`); more is a 400."""
    max_prompt_tokens: int = 1024
    """The longest prompt accepted, in the model's tokens; longer is a 400 (never cut)."""
    max_batch_size: int = 16
    """Concurrent requests decoded together (outputs: a request with n = 4 counts 4)."""
    max_wait_ms: float = 10.0
    """How long the first request waits for others to join its batch."""
    fault_rate: float = 0.0
    """Share of /v1 requests answered with an injected error instead (testing clients' retries); 0: off."""
    fault_status: list[int] = field(default_factory=lambda: [429, 500])
    """The injected errors' HTTP status, one drawn per faulty request."""
    fault_seed: int = 0
    """Seed of which requests fail."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 on a GPU that supports it, else fp32."""

    def __post_init__(self):
        check(1 <= self.port <= 65535, "port", f"must be in 1..65535, got {self.port}")
        for key in ("max_tokens", "max_prompt_tokens", "max_batch_size"):
            check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        check(self.max_wait_ms >= 0, "max_wait_ms", f"must be >= 0, got {self.max_wait_ms}")
        check(0 <= self.fault_rate <= 1, "fault_rate", f"must be in [0, 1], got {self.fault_rate}")
        check(
            bool(self.fault_status) and all(400 <= s <= 599 for s in self.fault_status),
            "fault_status",
            f"must be HTTP error statuses (400-599), got {self.fault_status}",
        )
        if self.api_key_env is not None:
            check(
                bool(os.environ.get(self.api_key_env)),
                "api_key_env",
                f"the environment variable {self.api_key_env} is empty or unset",
            )
