"""Student init: shrink a teacher by keeping a subset of its layers, and check tokenizer compatibility.

    student = shrink_layers(teacher, "6:2")     # BART 6:6 -> 6:2 keeps decoder layers 0 and 5
    student = shrink_layers(llama, "4")         # decoder-only (GPT-2, Llama, Qwen, Mistral, Gemma, Phi-3): keep 4

The study's finding: autoregressive decoding dominates latency, so shrinking the *decoder* (keep the
first and last layers, drop the middle) roughly halves it at little cost in quality.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distilgen.config import ConfigError

SEQUENCE_LEVEL_OBJECTIVES = ("seq_kd (cross-entropy on teacher pseudo-targets)", "finetune")


@dataclass(frozen=True)
class LayerStack:
    """Where one stack of layers lives in a model family, and which config field counts it."""

    path: str
    """Dotted attribute path of the `nn.ModuleList`."""
    config_key: str


STACKS: dict[str, dict[str, LayerStack]] = {
    "bart": {
        "encoder": LayerStack("model.encoder.layers", "encoder_layers"),
        "decoder": LayerStack("model.decoder.layers", "decoder_layers"),
    },
    "mbart": {
        "encoder": LayerStack("model.encoder.layers", "encoder_layers"),
        "decoder": LayerStack("model.decoder.layers", "decoder_layers"),
    },
    "t5": {
        "encoder": LayerStack("encoder.block", "num_layers"),
        "decoder": LayerStack("decoder.block", "num_decoder_layers"),
    },
    "gpt2": {"decoder": LayerStack("transformer.h", "n_layer")},
    **{
        model_type: {"decoder": LayerStack("model.layers", "num_hidden_layers")}
        for model_type in ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "smollm3")
    },
}


def evenly_spaced(total: int, keep: int) -> list[int]:
    """`keep` of `total` layer indices: the first and the last, the rest spread evenly (6, 2 -> [0, 5])."""
    if not 1 <= keep <= total:
        raise ConfigError("shrink", f"cannot keep {keep} of {total} layers")
    if keep == 1:
        return [0]
    return [round(i * (total - 1) / (keep - 1)) for i in range(keep)]


def parse_shrink_spec(spec: str, sizes: dict[str, int]) -> dict[str, list[int]]:
    """Layers to keep per stack from `E:D` (counts) or explicit lists (`0,1,2:0,5`); `D` alone for decoder-only.

    Args:
        sizes: the number of layers per stack, e.g. {"encoder": 6, "decoder": 6}.
    """
    parts = spec.split(":")
    names = list(sizes)
    if names == ["decoder"] and len(parts) == 2:
        if parts[0].strip() not in ("", "0"):
            raise ConfigError("shrink", f"a decoder-only model has no encoder: write '{parts[1]}' or '0:{parts[1]}'")
        parts = parts[1:]
    if len(parts) != len(names):
        raise ConfigError("shrink", f"expected {':'.join(n[0].upper() for n in names)} for this model, got '{spec}'")
    keep: dict[str, list[int]] = {}
    for name, part in zip(names, parts, strict=True):
        part = part.strip()
        if "," in part or part.startswith("["):
            try:
                layers = [int(x) for x in part.strip("[]").split(",") if x.strip()]
            except ValueError:
                raise ConfigError("shrink", f"bad layer list '{part}' in '{spec}'") from None
            if not layers or sorted(set(layers)) != layers or not all(0 <= i < sizes[name] for i in layers):
                raise ConfigError("shrink", f"{name} layers must be increasing indices below {sizes[name]}: '{part}'")
        else:
            if not part.isdigit():
                raise ConfigError("shrink", f"expected a layer count or a list for the {name}, got '{part}'")
            layers = evenly_spaced(sizes[name], int(part))
        keep[name] = layers
    return keep


def module_at(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """The submodule at dotted `path` (a stack of layers: `model.layers`)."""
    module = model
    for attr in path.split("."):
        module = getattr(module, attr)
    return module


def _set(model: torch.nn.Module, path: str, value: torch.nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(module_at(model, parent) if parent else model, attr, value)


def stacks_of(model: PreTrainedModel) -> dict[str, LayerStack]:
    model_type = model.config.model_type
    if model_type not in STACKS:
        raise ConfigError("shrink", f"cannot shrink a '{model_type}' model; supported: {', '.join(STACKS)}")
    return STACKS[model_type]


def shrink_layers(teacher: PreTrainedModel, spec: str) -> PreTrainedModel:
    """A copy of `teacher` keeping only the layers `spec` selects; embeddings and LM head are copied.

    The copy is an ordinary model of the same class with a smaller config, so it saves and loads in
    plain `transformers`; with every layer kept it computes exactly what the teacher computes.
    """
    stacks = stacks_of(teacher)
    sizes = {name: len(module_at(teacher, stack.path)) for name, stack in stacks.items()}
    keep = parse_shrink_spec(spec, sizes)
    student = copy.deepcopy(teacher)
    for name, stack in stacks.items():
        layers = module_at(student, stack.path)
        kept = torch.nn.ModuleList([layers[i] for i in keep[name]])
        if student.config.model_type == "t5" and keep[name][0] != 0:
            # Only T5's first block owns the relative position bias; the new first block takes it over.
            first = kept[0].layer[0].SelfAttention
            first.has_relative_attention_bias = True
            first.relative_attention_bias = layers[0].layer[0].SelfAttention.relative_attention_bias
        for new_index, layer in enumerate(kept):
            for module in layer.modules():  # KV-cache slots are indexed by layer position
                if hasattr(module, "layer_idx"):
                    module.layer_idx = new_index
        _set(student, stack.path, kept)
        setattr(student.config, stack.config_key, len(kept))
        if isinstance(getattr(student.config, "layer_types", None), list):  # per layer: sliding or full attention
            student.config.layer_types = [student.config.layer_types[i] for i in keep[name]]
    return student


def vocab_compatible(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> bool:
    """Word-level KD compares distributions token by token: both sides need the same vocabulary."""
    return student.get_vocab() == teacher.get_vocab()


def require_same_vocab(
    student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase, objective: str, key: str = "method"
) -> None:
    """A clear error naming the config `key` when a word-level objective is asked of models with different
    tokenizers."""
    if not vocab_compatible(student, teacher):
        raise ConfigError(
            key,
            f"'{objective}' compares teacher and student token distributions, but their tokenizers differ "
            f"({len(student)} vs {len(teacher)} tokens); use a sequence-level method instead: "
            + ", ".join(SEQUENCE_LEVEL_OBJECTIVES),
        )
