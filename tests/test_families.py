"""The modern decoder-only families (Llama, Qwen2, Qwen3, Mistral, Gemma 2/3, Phi-3), built tiny with grouped-query
attention: decoding, logits at target positions only, shrinking, and every kind of method end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from distilgen.config import DECODER_ONLY_FAMILIES, DistillConfig, GenerationSettings, ModelConfig, from_dict
from distilgen.distill import distill
from distilgen.generation.decode import decode
from distilgen.models import load_model
from distilgen.objectives import capture_qkv
from distilgen.students import shrink_layers
from tests.conftest import tiny_model_config

FAMILY = {"num_heads": 4, "num_kv_heads": 2, "decoder_layers": 3}
"""Four query heads over two key/value heads (grouped-query attention), three layers to shrink."""


@pytest.fixture(params=DECODER_ONLY_FAMILIES)
def family(request, tokenizer_dir):
    torch.manual_seed(0)
    tm = load_model(tiny_model_config(request.param, tokenizer_dir, **FAMILY))
    tm.model.eval()
    return tm


def _batch(tm, splits, targets=True):
    encoded, _ = tm.encode(splits["train"][:4], 64, 24, targets=targets)
    return tm.collate(encoded)


def test_greedy_and_sampled_decoding_match_generate_and_a_static_cache(family, splits):
    tm = family
    batch = _batch(tm, splits, targets=False)
    greedy = GenerationSettings("greedy", max_new_tokens=10)
    ours = decode(tm, batch, greedy)
    kwargs = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": tm.tokenizer.pad_token_id}
    assert torch.equal(ours, tm.layout.generate(tm.model, batch, **kwargs))
    assert torch.equal(ours, decode(tm, batch, greedy, static=True))
    sample, seeds = GenerationSettings("sample", num_return=2, max_new_tokens=10), list(range(8))
    assert torch.equal(decode(tm, batch, sample, seeds), decode(tm, batch, sample, seeds, static=True))


def test_logits_are_computed_at_target_positions_only_and_equal_the_full_pass(family, splits):
    tm = family
    batch = _batch(tm, splits)
    calls = []
    head = tm.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[1]))
    with torch.no_grad():
        kept = tm.target_logits(batch)
        ids = torch.cat([batch["source_ids"], batch["target_ids"]], dim=1)[:, :-1]
        mask = torch.cat([batch["source_mask"], batch["target_mask"]], dim=1)[:, :-1]
        full = tm.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
    handle.remove()
    width = batch["target_ids"].shape[1]
    assert calls == [width, ids.shape[1]]  # the LM head saw only the target positions, then (for reference) all
    torch.testing.assert_close(kept, full[:, -width:], rtol=1e-5, atol=1e-5)


def test_shrinking_keeps_first_and_last_layers_and_saves_as_a_plain_model(family, splits, tmp_path):
    tm = family
    batch = _batch(tm, splits)
    same = shrink_layers(tm.model, "3").eval()
    with torch.no_grad():
        torch.testing.assert_close(tm.layout.target_logits(same, batch), tm.target_logits(batch))
    student = shrink_layers(tm.model, "2").eval()
    layers = tm.model.model.layers
    kept = student.model.layers
    assert len(kept) == student.config.num_hidden_layers == 2
    assert torch.equal(kept[1].mlp.down_proj.weight, layers[2].mlp.down_proj.weight)
    if isinstance(getattr(tm.model.config, "layer_types", None), list):
        assert student.config.layer_types == [tm.model.config.layer_types[i] for i in (0, 2)]
    student.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(tm.layout.target_logits(plain, batch), tm.layout.target_logits(student, batch))
    greedy = GenerationSettings("greedy", max_new_tokens=8)
    shrunk = type(tm)(student, tm.tokenizer, tm.layout)
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tm.tokenizer.pad_token_id}
    assert torch.equal(decode(shrunk, batch, greedy), tm.layout.generate(student, batch, **kwargs))  # KV cache slots


def test_attention_projections_are_captured_with_grouped_query_heads(family, splits):
    tm = family
    with capture_qkv(tm.model) as qkv, torch.no_grad():
        tm.target_logits(_batch(tm, splits))
    head = tm.model.config.head_dim
    assert qkv["q"].shape[-1] == 4 * head and qkv["k"].shape[-1] == qkv["v"].shape[-1] == 2 * head


TASK = {"train_size": 16, "unlabeled_size": 8, "dev_size": 4, "test_size": 0}


@pytest.mark.parametrize("arch", DECODER_ONLY_FAMILIES)
def test_every_kind_of_method_trains_a_shrunk_student_of_the_family(arch, tmp_path, tokenizer_dir):
    """Joint-Teaching (live teacher, student PTs), sparse KD from stored top-k, Noisy KD and attention-relation
    KD, on a teacher of the family and a student shrunk from it."""
    torch.manual_seed(0)
    teacher_dir = tmp_path / "teacher"
    load_model(tiny_model_config(arch, tokenizer_dir, **FAMILY)).save(teacher_dir)
    for method in ("joint_teaching", "logits_kd_pt", "noisy_kd", "attention_kd"):
        cfg = from_dict(
            DistillConfig,
            {
                "output_dir": str(tmp_path / method),
                "data": {"task": TASK, "max_source_length": 64, "max_target_length": 24},
                "teacher": {"path": str(teacher_dir)},
                "student": {"path": str(teacher_dir), "shrink": "2"},
                "method": method,
                "pts": {"spec": {"name": "g", "max_new_tokens": 12}, "store": str(tmp_path / "pts"), "topk": 4},
                "student_pts": {"max_new_tokens": 12},
                "attention": {"relation_heads": 2},
                "train": {"max_steps": 3, "batch_size": 4, "eval_every": 0, "metric": "loss", "log_every": 1},
                "decoding": {"max_new_tokens": 12},
                "final_finetune_epochs": 0,
            },
        )
        summary = distill(cfg)
        lines = [json.loads(x) for x in (Path(cfg.output_dir) / "distill" / "metrics.jsonl").read_text().splitlines()]
        losses = [line["loss"] for line in lines if "loss" in line]
        assert len(losses) == 3 and all(map(torch.isfinite, torch.tensor(losses))), (method, losses)
        student = AutoModelForCausalLM.from_pretrained(summary["model"])
        assert student.config.num_hidden_layers == 2 and type(student).__name__.lower().startswith(arch[:4])


def test_a_family_that_cannot_give_encoder_attention_says_what_it_can(tokenizer_dir):
    tm = load_model(ModelConfig(arch="llama", tokenizer=tokenizer_dir, hidden_size=32, num_heads=2))
    with pytest.raises(ValueError, match="llama.*which='encoder'.*supported"), capture_qkv(tm.model, "encoder"):
        pass
