"""A student's vocabulary trimmed to its task's tokens, for export: a smaller output layer to compute per token.

    kept = task_token_ids(tm, examples, 512, 128)            # every token the task's prompts and references use
    spec, old_ids = trim_tokenizer(json.loads(tokenizer_json), kept)
    trim_embeddings(tm.model, old_ids)                       # rows old_ids[0], old_ids[1], ... become ids 0, 1, ...

A student distilled from an LLM inherits its vocabulary (49,152 tokens for SmolLM2, 151,646 for Qwen), and for a
small student the output layer over it is most of a decoding step's work. One task writes few of those tokens.
The trimmed tokenizer keeps, besides the task's tokens, every special token, every token no merge produces (the
byte or character alphabet) and every token a kept one is merged from: a text made of kept tokens tokenizes as
before, and any other text still tokenizes, into smaller kept pieces (BPE) or single characters (Unigram). The
trimmed model gives the kept tokens the logits it gave them before; it can no longer write the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from distilgen.config import ConfigError


def task_token_ids(tm: Any, examples: Iterable[Any], max_source_length: int, max_target_length: int) -> set[int]:
    """Every id of the examples' model inputs (prompt included) and of each of their references as a target, with
    the ids the tokenizer and the model's configs name (special tokens, start and end tokens)."""
    from distilgen.data import Example

    examples = list(examples)
    references = [Example(e.id, e.source, ref, ()) for e in examples for ref in e.references]
    kept = set(tm.tokenizer.all_special_ids)
    for encoded in tm.encode([*examples, *references], max_source_length, max_target_length)[0]:
        kept.update(encoded.source)
        kept.update(encoded.target)
    kept.update(i for i in named_ids(tm.model) if i >= 0)
    return kept


def _token_id_fields(model: Any) -> list[tuple[Any, str, Any]]:
    """(config, name, value) of every `*_token_id` field of the model's config and generation config."""
    configs = (model.config, model.generation_config)
    return [(c, name, value) for c in configs for name, value in list(vars(c).items()) if name.endswith("_token_id")]


def named_ids(model: Any) -> list[int]:
    """The token ids the model's config and generation config name (pad, BOS, EOS, decoder start, forced ...)."""
    ids = [i for _, _, value in _token_id_fields(model) for i in (value if isinstance(value, list) else [value])]
    return [i for i in ids if isinstance(i, int)]


def trim_tokenizer(spec: dict[str, Any], keep: set[int]) -> tuple[dict[str, Any], list[int]]:
    """A tokenizer's `tokenizer.json` (`spec`) cut to the tokens of ids `keep` and what they need; the new spec and
    the old id of each new id (kept tokens in their old order)."""
    model, added = spec["model"], spec.get("added_tokens", [])
    keep = keep | {a["id"] for a in added}  # all kept, whether or not the model's vocabulary holds them
    if model["type"] == "BPE":
        if model.get("continuing_subword_prefix"):  # its merges drop the prefix: parts and results differ
            raise ConfigError("trim_vocabulary", "a BPE tokenizer with a continuing-subword prefix cannot be trimmed")
        vocab, closed = model["vocab"], _bpe_closure(model, keep)
    elif model["type"] == "Unigram":
        vocab = {piece: i for i, (piece, _) in enumerate(model["vocab"])}
        closed = {p for p, i in vocab.items() if i in keep or len(p) == 1 or i == model.get("unk_id")}
        if model.get("byte_fallback"):  # characters it lacks are written as <0xNN> bytes
            closed |= {p for p in vocab if len(p) == 6 and p.startswith("<0x") and p.endswith(">")}
    else:
        raise ConfigError("trim_vocabulary", f"a {model['type']} tokenizer: trimming covers BPE and Unigram ones")
    old_ids = sorted({vocab[token] for token in closed} | {a["id"] for a in added})
    new_id = {old: new for new, old in enumerate(old_ids)}
    out = {**spec, "model": dict(model)}
    if model["type"] == "BPE":
        out["model"]["vocab"] = {token: new_id[i] for token, i in vocab.items() if i in new_id}
        out["model"]["merges"] = [m for m in model["merges"] if _merged(m) in closed]
    else:
        out["model"]["vocab"] = [model["vocab"][i] for i in old_ids if i < len(model["vocab"])]
        if model.get("unk_id") is not None:
            out["model"]["unk_id"] = new_id[model["unk_id"]]
    out["added_tokens"] = [{**a, "id": new_id[a["id"]]} for a in added]
    out["post_processor"] = _renumbered(spec.get("post_processor"), new_id)
    if isinstance(spec.get("padding"), dict) and spec["padding"].get("pad_id") in new_id:
        out["padding"] = {**spec["padding"], "pad_id": new_id[spec["padding"]["pad_id"]]}
    return out, old_ids


def _pair(merge: str | Sequence[str]) -> tuple[str, str]:
    """A merge as its two parts (`tokenizer.json` writes them as a list, or as one space-separated string)."""
    left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
    return left, right


def _merged(merge: str | Sequence[str]) -> str:
    return "".join(_pair(merge))


def _bpe_closure(model: dict[str, Any], keep: set[int]) -> set[str]:
    """The kept tokens, the alphabet (tokens no merge produces) and, recursively, the parts of every kept token."""
    vocab = model["vocab"]
    produced = {_merged(m) for m in model["merges"]}
    closed = {token for token, i in vocab.items() if i in keep or token not in produced}
    if model.get("unk_token") in vocab:
        closed.add(model["unk_token"])
    changed = True
    while changed:  # merges come after their parts' merges, so one backward pass adds nearly everything
        changed = False
        for merge in reversed(model["merges"]):
            left, right = _pair(merge)
            if left + right in closed and not (left in closed and right in closed):
                closed |= {left, right}
                changed = True
    return closed


def _renumbered(processor: Any, new_id: dict[int, int]) -> Any:
    """A post-processor spec with its special tokens' ids renumbered (template, BERT and RoBERTa processors)."""
    if not isinstance(processor, dict):
        return processor
    out = dict(processor)
    if processor.get("type") == "Sequence":
        out["processors"] = [_renumbered(p, new_id) for p in processor["processors"]]
    if processor.get("type") == "TemplateProcessing":
        out["special_tokens"] = {
            name: {**token, "ids": [new_id[i] for i in token["ids"]]}
            for name, token in processor["special_tokens"].items()
        }
    for name in ("sep", "cls"):  # BertProcessing, RobertaProcessing: [token, id]
        if isinstance(processor.get(name), list):
            out[name] = [processor[name][0], new_id[processor[name][1]]]
    return out


@torch.no_grad()
def trim_embeddings(model: Any, old_ids: Sequence[int]) -> None:
    """Keep only the embedding and output rows `old_ids`, renumbered 0, 1, ... in that order, in place; the ids the
    configs name follow. Ties between input and output embeddings, an embedding's scale and BART's logits bias are
    kept (transformers' own resizing does the cut, after the kept rows are moved to the front)."""
    vocab_size = model.get_input_embeddings().weight.shape[0]
    kept = torch.tensor(old_ids, dtype=torch.long)
    order = torch.cat([kept, torch.tensor(sorted(set(range(vocab_size)) - set(old_ids)), dtype=torch.long)])
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tensors = [embedding.weight]
    if head is not None and head.weight is not embedding.weight:
        tensors.append(head.weight)
    if head is not None and getattr(head, "bias", None) is not None:
        tensors.append(head.bias)
    for tensor in tensors:
        tensor.copy_(tensor[order])
    bias = getattr(model, "final_logits_bias", None)  # BART: (1, V)
    if bias is not None:
        bias.copy_(bias[:, order])
    model.resize_token_embeddings(len(old_ids))
    new_id = {old: new for new, old in enumerate(old_ids)}
    missing = sorted(set(named_ids(model)) - set(new_id) - {-1})
    if missing:
        raise ValueError(f"the model's configs name tokens {missing}, which are not kept")
    renumber = lambda i: new_id[i] if isinstance(i, int) and i >= 0 else i  # noqa: E731
    for config, name, value in _token_id_fields(model):
        setattr(config, name, [renumber(i) for i in value] if isinstance(value, list) else renumber(value))
