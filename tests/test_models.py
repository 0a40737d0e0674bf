from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from distilgen.config import DecodingConfig, ModelConfig
from distilgen.models import load_model


def _batch(tm, examples, **lengths):
    items, stats = tm.encode(examples, **lengths)
    return tm.collate(items), stats


def test_target_logits_do_not_depend_on_padding(tiny_model, splits):
    """Each row's target logits are the same batched (padded) as alone: the layout aligns targets."""
    tm = tiny_model
    tm.model.eval()
    examples = splits["train"][:3]
    batch, _ = _batch(tm, examples)
    together = tm.target_logits(batch)  # (B, T, V)
    assert together.shape[:2] == batch["target_ids"].shape
    for i, example in enumerate(examples):
        alone_batch, _ = _batch(tm, [example])
        alone = tm.target_logits(alone_batch)[0]
        length = int(batch["target_mask"][i].sum())
        torch.testing.assert_close(together[i, :length], alone[:length], atol=1e-5, rtol=1e-5)


def test_targets_end_with_eos_and_sources_are_truncated_and_counted(tiny_model, splits):
    tm = tiny_model
    items, stats = tm.encode(splits["train"][:4], max_source_length=16, max_target_length=5)
    assert all(len(it.source) <= 16 for it in items)
    assert all(len(it.target) <= 5 and it.target[-1] == tm.tokenizer.eos_token_id for it in items)
    assert stats.sources_truncated == 4 and stats.targets_truncated == 4
    items, stats = tm.encode(splits["train"][:4], max_source_length=1000, max_target_length=1000)
    assert stats.sources_truncated == 0 and stats.targets_truncated == 0


def test_saved_model_reloads_in_plain_transformers_with_the_same_logits(tiny_model, splits, tmp_path):
    tm = tiny_model
    tm.model.eval()
    batch, _ = _batch(tm, splits["train"][:2])
    before = tm.target_logits(batch)
    tm.save(tmp_path)
    auto = AutoModelForSeq2SeqLM if tm.is_encoder_decoder else AutoModelForCausalLM
    plain = auto.from_pretrained(tmp_path).eval()
    assert AutoTokenizer.from_pretrained(tmp_path).get_vocab() == tm.tokenizer.get_vocab()
    reloaded = load_model(ModelConfig(path=str(tmp_path)))
    assert type(reloaded.model) is type(plain)
    torch.testing.assert_close(reloaded.target_logits(batch), before)


def test_generation_returns_new_tokens_only_and_decodes_up_to_eos(tiny_model, splits):
    from distilgen.generation.hf import HFGenerator

    tm = tiny_model
    batch, _ = _batch(tm, splits["train"][:2])
    generator = HFGenerator(tm)
    ids = generator.run(batch, DecodingConfig(max_new_tokens=7).settings())
    assert ids.shape[0] == 2 and ids.shape[1] <= 7
    eos = tm.tokenizer.eos_token_id
    forced = torch.tensor([[5, 6, eos, 7], [8, eos, 9, 9]])
    assert tm.output_tokens(forced) == [[5, 6], [8]]
    ((written,),) = generator.generate([splits["train"][0].source], DecodingConfig(max_new_tokens=7).settings())
    assert written.token_ids == tm.target_ids(written.tokens) and 0 < len(written.tokens) <= 7
    assert written.text == tm.tokenizer.decode(written.tokens).strip()


def test_a_model_built_without_a_tokenizer_trains_one_on_the_task_text(splits):
    texts = [e.source for e in splits["train"]] + [e.target for e in splits["train"]]
    tm = load_model(
        ModelConfig(arch="bart", hidden_size=32, num_heads=2, ffn_size=64, vocab_size=200), texts=lambda: iter(texts)
    )
    assert len(tm.tokenizer) == 200
    assert tm.model.config.vocab_size == 200
    source = splits["train"][0].source
    assert tm.tokenizer.decode(tm.tokenizer(source, add_special_tokens=False)["input_ids"]) == source


def test_models_built_from_scratch_scale_their_init_to_the_width(tokenizer_dir):
    """See [init scale note]: std 1/sqrt(width), not the 0.02 tuned for 1024-wide models."""
    from tests.conftest import tiny_model_config

    for arch, weight in (
        ("bart", lambda m: m.model.encoder.layers[0].fc1.weight),
        ("gpt2", lambda m: m.transformer.h[0].mlp.c_fc.weight),
    ):
        torch.manual_seed(0)
        model = load_model(tiny_model_config(arch, tokenizer_dir, hidden_size=64)).model
        assert abs(weight(model).std().item() - 64**-0.5) < 0.02
