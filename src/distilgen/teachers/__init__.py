"""Teachers: the model a student learns from, as an object with a kind, a fingerprint and capabilities.

    teacher = load_teacher(cfg.teacher, precision="auto", device=device)  # cfg.teacher: a config.TeacherConfig
    teacher.kind, teacher.capabilities        # "hf", {"logits", "topk", "text"}
    fp = teacher.fingerprint(max_source_length=256, template="{source}")  # keys the teacher's PTs in the store

A kind is a file of this package with a `load(cfg, precision, device, data)` function, plus an entry in `TEACHER_KINDS`
that says what its teachers can give. Each method says what it needs of a teacher (`distill.Method.needs`): a
config that asks a method of a teacher that cannot serve it is refused when it loads, naming the methods that
would work. This module imports nothing of the pipeline, so that configs can check kinds and capabilities.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Protocol

CAPABILITIES: dict[str, str] = {
    "logits": "full next-token distributions along a given target (a model run here)",
    "topk": "the top-k log-probabilities of the tokens it writes",
    "text": "the text it writes",
}
"""What a teacher can give, by name: `logits` serves word-level KD on any target (gold targets, the student's
own PTs in Joint-Teaching); `topk` serves sparse KD on its own PTs; `text` serves sequence-level KD."""


@dataclass(frozen=True)
class TeacherKind:
    capabilities: frozenset[str]
    """What every teacher of this kind can give (keys of `CAPABILITIES`)."""
    module: str
    """The file of this package that loads it; imported only when a teacher of this kind is loaded."""


TEACHER_KINDS: dict[str, TeacherKind] = {
    "hf": TeacherKind(frozenset(CAPABILITIES), "distilgen.teachers.hf"),
    "api": TeacherKind(frozenset({"text", "topk"}), "distilgen.teachers.api"),
}
"""Teacher kinds by the name a config gives (`teacher.kind`)."""


class Teacher(Protocol):
    """What distilgen asks of any teacher; a kind adds what it is (the `hf` teacher is also a `TextModel`)."""

    kind: str
    capabilities: frozenset[str]
    paid: bool
    """Each output costs money (an endpoint): PT generation journals every answer as it arrives."""
    tokenizer: Any
    """Its tokenizer here (None: an endpoint whose tokenizer is not known): students sharing it get exact top-k."""

    def fingerprint(self, max_source_length: int, template: str = "{source}") -> str:
        """sha256 of everything that changes the teacher's outputs for an input: the store's key of its PTs."""
        ...

    def generator(self, max_source_length: int, batch_size: int, static_cache: str = "off", own_rules: bool = False):
        """The `generation.Generator` that writes the teacher's text (PTs, the diagnostic's completions).

        Args:
            own_rules: apply what the model's own generation settings add (a minimum length...); PTs are what their
                spec says, so PT generation leaves it off.
        """
        ...


def describe(capabilities: frozenset[str] | set[str]) -> str:
    """The capabilities in words, for errors."""
    return "; ".join(CAPABILITIES[c] for c in sorted(capabilities)) or "nothing"


def load_teacher(cfg: Any, precision: str, device: Any, data: Any = None) -> Teacher:
    """The teacher `cfg` (a `config.TeacherConfig`) describes, ready to generate and score on `device`.

    Args:
        precision: "auto", "fp32" or "bf16": the weights of a teacher run here (auto: bf16 on a GPU with it).
        data: the command's `config.DataConfig`: the teacher reads sources through its `prompt`.
    """
    return importlib.import_module(TEACHER_KINDS[cfg.kind].module).load(cfg, precision, device, data)
