"""Vocabulary trimming for export: what the trimmed tokenizer and model keep, and exports that use them."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from distilgen.config import ConfigError, DecodingConfig, ExportConfig, ModelConfig
from distilgen.data import Example
from distilgen.evaluate import generate
from distilgen.models import load_model
from distilgen.vocabulary import trim_embeddings, trim_tokenizer
from tests.conftest import tiny_model_config

pytest.importorskip("ctranslate2")

from distilgen.export import export  # noqa: E402 (needs ctranslate2)


def _texts(splits) -> list[str]:
    return [e.source for s in splits.values() for e in s] + [r for e in splits["train"] for r in e.references]


def _byte_level(texts: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800, special_tokens=["<|end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def _unigram(texts: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(
        texts, trainers.UnigramTrainer(vocab_size=400, special_tokens=["<unk>"], unk_token="<unk>")
    )
    return tokenizer


def _trimmed(tokenizer: Tokenizer, kept_texts: list[str]) -> tuple[Tokenizer, list[int]]:
    keep = {i for text in kept_texts for i in tokenizer.encode(text).ids}
    spec, old_ids = trim_tokenizer(json.loads(tokenizer.to_str()), keep)
    return Tokenizer.from_str(json.dumps(spec)), old_ids


@pytest.mark.parametrize("kind", ["byte_level_bpe", "unigram"])
def test_a_trimmed_tokenizer_tokenizes_kept_text_as_before_and_any_other_text_into_kept_pieces(kind, splits):
    texts = _texts(splits)
    tokenizer = (_byte_level if kind == "byte_level_bpe" else _unigram)(texts)
    task, other = texts[:10], ["Zyxwvut quokka jamboree!", "xylophone 12345 ~~ naïve café"]
    trimmed, old_ids = _trimmed(tokenizer, task)
    assert len(old_ids) < tokenizer.get_vocab_size() * 0.8 and old_ids == sorted(old_ids)
    for text in task:  # the same tokens, renumbered
        before, after = tokenizer.encode(text), trimmed.encode(text)
        assert after.tokens == before.tokens and [old_ids[i] for i in after.ids] == before.ids
    for text in other:
        after = trimmed.encode(text)
        assert len(after.ids) >= len(tokenizer.encode(text).ids)
        if kind == "byte_level_bpe":  # bytes are always kept: any text comes back whole
            assert trimmed.decode(after.ids) == text
    assert trimmed.token_to_id("<|end|>" if kind == "byte_level_bpe" else "<unk>") is not None


def test_special_tokens_outside_the_models_vocabulary_are_kept_and_renumbered(splits):
    """Qwen and Llama 3 keep their chat tokens as added tokens only, after the BPE vocabulary; a template
    post-processor names one by id."""
    from tokenizers import processors

    texts = _texts(splits)
    tokenizer = _byte_level(texts)
    tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    start = tokenizer.token_to_id("<|im_start|>")
    assert start >= tokenizer.get_vocab_size(with_added_tokens=False)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", start)]
    )
    trimmed, old_ids = _trimmed(tokenizer, texts[:5])
    text = texts[0] + "<|im_end|>"
    before, after = tokenizer.encode(text), trimmed.encode(text)
    assert after.tokens == before.tokens and [old_ids[i] for i in after.ids] == before.ids
    assert after.tokens[0] == "<|im_start|>" and after.tokens[-1] == "<|im_end|>"
    assert trimmed.token_to_id("<|im_start|>") == old_ids.index(start) < start


def test_the_trimmed_tokenizer_keeps_the_parts_every_kept_token_is_merged_from(splits):
    tokenizer = _byte_level(_texts(splits))
    spec = json.loads(tokenizer.to_str())
    merges = spec["model"]["merges"]
    longest = max((m for m in merges), key=lambda m: len("".join(m)))  # a token built by several merges
    keep = {spec["model"]["vocab"]["".join(longest)]}
    trimmed, old_ids = trim_tokenizer(spec, keep)
    kept = trimmed["model"]["vocab"]
    assert "".join(longest) in kept and all(part in kept for part in longest)
    assert all("".join(m) in kept and m[0] in kept and m[1] in kept for m in trimmed["model"]["merges"])
    assert sorted(kept.values()) == list(range(len(old_ids)))
    word = "".join(longest).replace("Ġ", " ")
    assert Tokenizer.from_str(json.dumps(trimmed)).encode(word).tokens == tokenizer.encode(word).tokens


@pytest.mark.parametrize("family", ["bart", "llama"])
def test_trimmed_embeddings_give_the_kept_tokens_the_logits_they_had(family, tokenizer_dir):
    torch.manual_seed(0)
    tm = load_model(tiny_model_config(family, tokenizer_dir))
    if family == "bart":  # a logits bias to carry over
        tm.model.final_logits_bias.normal_()
    vocab = tm.model.config.vocab_size
    old_ids = sorted({0, 1, 2, 3, 4, *range(40, vocab, 3)})
    ids = torch.tensor([[old_ids[5], old_ids[9], old_ids[2]]])
    new = torch.tensor([[5, 9, 2]])
    kwargs = lambda x: {"input_ids": x, **({"decoder_input_ids": x} if family == "bart" else {})}  # noqa: E731
    before = tm.model(**kwargs(ids)).logits[..., old_ids]
    tm.model.config.eos_token_id = tm.model.generation_config.eos_token_id = old_ids[7]  # renumbered to 7
    trim_embeddings(tm.model, old_ids)
    assert tm.model.config.vocab_size == len(old_ids) and tm.model.get_output_embeddings().weight.shape[0] == len(
        old_ids
    )
    assert tm.model.config.eos_token_id == tm.model.generation_config.eos_token_id == 7
    torch.testing.assert_close(tm.model(**kwargs(new)).logits, before)
    if family == "bart":
        assert tm.model.get_output_embeddings().weight is tm.model.get_input_embeddings().weight  # still tied


def test_a_trimmed_export_writes_the_pytorch_models_outputs_with_a_smaller_vocabulary(tmp_path, splits):
    """The task's data holds the PyTorch model's own outputs as references, so every token it writes is kept: the
    float32 trimmed export must then write exactly those outputs."""
    texts = _texts(splits) * 3
    from distilgen.models import train_tokenizer

    tokenizer_path = tmp_path / "tokenizer"
    train_tokenizer(texts, vocab_size=1200).save_pretrained(tokenizer_path)
    torch.manual_seed(0)
    tm = load_model(tiny_model_config("gpt2", str(tokenizer_path)))
    tm.save(tmp_path / "model")
    examples = splits["test"]
    decoding = DecodingConfig(max_new_tokens=12)
    expected = generate(tm, examples, decoding, 256)
    train = tmp_path / "train.jsonl"
    train.write_text(
        "".join(
            json.dumps({"source": e.source, "target": out}) + "\n" for e, out in zip(examples, expected, strict=True)
        )
    )
    config = tmp_path / "distill.yaml"
    data = {"train": str(train), "limits": {"train": 2}}  # what training takes: the vocabulary takes every example
    config.write_text(yaml.safe_dump({"data": data, "method": "seq_kd"}))
    out = tmp_path / "export"
    summary = export(ExportConfig(model=str(tmp_path / "model"), output_dir=str(out), quantization="float32",
                                  trim_vocabulary=str(config)))  # fmt: skip
    vocabulary = summary["vocabulary"]
    assert vocabulary["of"] == tm.model.config.vocab_size and vocabulary["kept"] < vocabulary["of"] / 2
    assert vocabulary["examples"] == len(examples)
    exported = load_model(ModelConfig(path=str(out)), allow_export=True)
    assert len(exported.tokenizer) == vocabulary["kept"] == exported.model.config.vocab_size
    assert generate(exported, [Example(e.id, e.source, None, ()) for e in examples], decoding, 256) == expected
    untrimmed = export(ExportConfig(model=str(tmp_path / "model"), output_dir=str(tmp_path / "full")))
    assert untrimmed["vocabulary"] == {"kept": tm.model.config.vocab_size}


def test_a_config_without_data_is_one_line(tmp_path, tokenizer_dir):
    torch.manual_seed(0)
    load_model(tiny_model_config("gpt2", tokenizer_dir)).save(tmp_path / "model")
    config = tmp_path / "c.yaml"
    config.write_text("method: seq_kd\n")
    with pytest.raises(ConfigError, match="no `data` section"):
        export(ExportConfig(model=str(tmp_path / "model"), output_dir=str(tmp_path / "x"), trim_vocabulary=str(config)))
    with pytest.raises(ConfigError, match="trim_vocabulary"):
        ExportConfig(model=str(tmp_path / "model"), output_dir=str(tmp_path / "x"), trim_vocabulary="missing.yaml")
    assert not (tmp_path / "x").exists()


def test_a_tokenizer_whose_trimmed_copy_lacks_kept_tokens_is_refused_in_one_line(tmp_path, tokenizer_dir, monkeypatch):
    """Other files of a tokenizer may name tokens by id; if the reloaded copy does not hold exactly the kept tokens,
    the export stops with nothing written."""
    import distilgen.export as export_module

    torch.manual_seed(0)
    load_model(tiny_model_config("gpt2", tokenizer_dir)).save(tmp_path / "model")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"task": {"train_size": 4, "unlabeled_size": 0, "dev_size": 0}}}))

    def one_id_too_many(spec, keep):
        trimmed, old_ids = trim_tokenizer(spec, keep)
        extra = min(set(range(max(old_ids))) - set(old_ids))  # a token the trim dropped
        return trimmed, sorted([*old_ids, extra])

    monkeypatch.setattr(export_module, "trim_tokenizer", one_id_too_many)
    with pytest.raises(ConfigError, match="not trimmable"):
        export(ExportConfig(model=str(tmp_path / "model"), output_dir=str(tmp_path / "x"), trim_vocabulary=str(config)))
    assert not (tmp_path / "x").exists()
