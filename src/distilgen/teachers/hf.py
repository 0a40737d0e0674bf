"""The `hf` teacher: a `transformers` model (a hub id, or a directory such as one `distilgen finetune` wrote), run
here. It can give everything (`CAPABILITIES`): full logits along any target, top-k log-probs, text.

    teacher = load(TeacherConfig(path="runs/teacher/model"), precision="auto", device=torch.device("cuda"))
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import ClassVar

import torch

from distilgen.config import DataConfig, ModelConfig
from distilgen.generation import open_generator
from distilgen.generation.hf import HFGenerator
from distilgen.models import TextModel, avoid_cudnn_attention, load_model
from distilgen.teachers import TEACHER_KINDS


@dataclass
class HFTeacher(TextModel):
    """A `TextModel` in inference mode that is also a `Teacher`."""

    kind: ClassVar[str] = "hf"
    capabilities: ClassVar[frozenset[str]] = TEACHER_KINDS["hf"].capabilities
    paid: ClassVar[bool] = False

    def fingerprint(self, max_source_length: int, template: str = "{source}") -> str:
        return teacher_fingerprint(self, max_source_length, template)

    def generator(
        self, max_source_length: int, batch_size: int, static_cache: str = "off", own_rules: bool = False
    ) -> HFGenerator:
        return open_generator(
            "hf", self, max_source_length=max_source_length, batch_size=batch_size, static_cache=static_cache,
            own_rules=own_rules,
        )  # fmt: skip


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
    if tm.prompt is not None:  # (absent for plain sources, so that stores from before prompts keep their key)
        digest.update(f"prompt={tm.prompt.fingerprint()}".encode())
    return digest.hexdigest()


def load(cfg: ModelConfig, precision: str, device: torch.device, data: DataConfig | None = None) -> HFTeacher:
    """The teacher in inference mode on `device`, in bf16 when asked (auto: on a GPU that supports it), reading
    sources through `data.prompt` when `data` is given."""
    tm = load_model(cfg, key="teacher", data=data)
    if device.type == "cuda":
        avoid_cudnn_attention()  # length-sorted batches: a new shape nearly every batch
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    tm.model.to(device=device, dtype=torch.bfloat16 if use_bf16 else torch.float32).eval()
    tm.model.requires_grad_(False)
    return HFTeacher(tm.model, tm.tokenizer, tm.layout, tm.prompt)
