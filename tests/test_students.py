from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from distilgen.config import ConfigError
from distilgen.models import load_model
from distilgen.students import evenly_spaced, parse_shrink_spec, require_same_vocab, shrink_layers, vocab_compatible
from tests.conftest import tiny_model_config

LAYERS = {"encoder_layers": 4, "decoder_layers": 4}


@pytest.fixture
def teacher(arch, tokenizer_dir):
    torch.manual_seed(0)
    tm = load_model(tiny_model_config(arch, tokenizer_dir, **LAYERS))
    tm.model.eval()
    return tm


def _logits(tm, model, examples):
    items, _ = tm.encode(examples)
    return tm.layout.target_logits(model, tm.collate(items))


def test_default_selection_keeps_first_and_last_and_spreads_the_rest():
    assert evenly_spaced(6, 2) == [0, 5]
    assert evenly_spaced(6, 3) == [0, 2, 5]
    assert evenly_spaced(12, 4) == [0, 4, 7, 11]
    assert evenly_spaced(6, 6) == list(range(6))
    assert evenly_spaced(6, 1) == [0]


def test_spec_parsing_counts_lists_and_decoder_only_forms():
    both = {"encoder": 6, "decoder": 6}
    assert parse_shrink_spec("6:2", both) == {"encoder": list(range(6)), "decoder": [0, 5]}
    assert parse_shrink_spec("0,2,4:1,3", both) == {"encoder": [0, 2, 4], "decoder": [1, 3]}
    assert parse_shrink_spec("2", {"decoder": 6}) == parse_shrink_spec("0:2", {"decoder": 6}) == {"decoder": [0, 5]}
    for bad in ("6", "7:2", "6:x", "3,1:2", "2:2:2"):
        with pytest.raises(ConfigError):
            parse_shrink_spec(bad, both)


def test_identity_shrink_reproduces_the_teacher_exactly(teacher, splits):
    spec = "4" if teacher.model.config.model_type == "gpt2" else "4:4"
    student = shrink_layers(teacher.model, spec)
    examples = splits["train"][:3]
    assert torch.equal(_logits(teacher, student, examples), _logits(teacher, teacher.model, examples))


def test_shrunk_model_has_the_expected_layers_and_reloads_in_plain_transformers(teacher, splits, tmp_path):
    decoder_only = teacher.model.config.model_type == "gpt2"
    student = shrink_layers(teacher.model, "2" if decoder_only else "3:2")
    config = student.config
    if decoder_only:
        assert config.n_layer == 2 and len(student.transformer.h) == 2
    elif config.model_type == "bart":
        assert (config.encoder_layers, config.decoder_layers) == (3, 2)
        assert len(student.model.decoder.layers) == 2
    else:
        assert (config.num_layers, config.num_decoder_layers) == (3, 2) and len(student.decoder.block) == 2
    student.save_pretrained(tmp_path)
    auto = AutoModelForCausalLM if decoder_only else AutoModelForSeq2SeqLM
    reloaded = auto.from_pretrained(tmp_path).eval()
    examples = splits["train"][:2]
    torch.testing.assert_close(_logits(teacher, reloaded, examples), _logits(teacher, student, examples))
    # the copy is independent of the teacher, and its embeddings started equal
    assert student.get_input_embeddings().weight.data_ptr() != teacher.model.get_input_embeddings().weight.data_ptr()
    assert torch.equal(student.get_input_embeddings().weight, teacher.model.get_input_embeddings().weight)


def test_shrunk_decoder_generates_with_the_kv_cache(teacher, splits):
    """Layer indices are renumbered, so cached generation equals uncached generation."""
    from distilgen.config import DecodingConfig
    from distilgen.generation.hf import HFGenerator

    spec = "1,3" if teacher.model.config.model_type == "gpt2" else "4:1,3"
    teacher.model = shrink_layers(teacher.model, spec).eval()
    items, _ = teacher.encode(splits["train"][:2], targets=False)
    batch = teacher.collate(items)
    cached = HFGenerator(teacher).run(batch, DecodingConfig(max_new_tokens=6).settings())
    uncached = teacher.layout.generate(
        teacher.model,
        batch,
        max_new_tokens=6,
        do_sample=False,
        use_cache=False,
        pad_token_id=teacher.tokenizer.pad_token_id,
    )
    assert torch.equal(cached, uncached)


def test_t5_shrink_without_the_first_block_keeps_the_position_bias(tokenizer_dir, splits):
    torch.manual_seed(0)
    tm = load_model(tiny_model_config("t5", tokenizer_dir, **LAYERS))
    student = shrink_layers(tm.model, "1,3:2")
    assert student.encoder.block[0].layer[0].SelfAttention.has_relative_attention_bias
    assert torch.isfinite(_logits(tm, student.eval(), splits["train"][:2])).all()


def test_word_level_kd_needs_the_same_vocabulary(tokenizer_dir, splits):
    from distilgen.models import train_tokenizer

    same = load_model(tiny_model_config("bart", tokenizer_dir)).tokenizer
    other = train_tokenizer([e.source for e in splits["train"]], vocab_size=150)
    assert vocab_compatible(same, same)
    with pytest.raises(ConfigError, match="seq_kd"):
        require_same_vocab(other, same, "logits_kd")
