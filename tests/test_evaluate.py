from __future__ import annotations

import json

import pytest
import sacrebleu
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from distilgen.config import CostConfig, DecodingConfig, EvaluateConfig, FinetuneConfig, TrainConfig
from distilgen.data import Example
from distilgen.evaluate import evaluate, evaluate_model, generate, markdown_table, model_label
from tests.conftest import tiny_model_config


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tiny_data, tokenizer_dir):
    """A tiny encoder-decoder and a tiny decoder-only model, each fine-tuned a few steps by `finetune`."""
    from distilgen.train import finetune

    paths = {}
    for arch in ("bart", "gpt2"):
        out = tmp_path_factory.mktemp(arch)
        cfg = FinetuneConfig(
            str(out),
            tiny_data,
            tiny_model_config(arch, tokenizer_dir),
            TrainConfig(max_steps=4, batch_size=8, eval_every=2, metric="bleu"),
            DecodingConfig(max_new_tokens=6),
        )
        summary = finetune(cfg)
        assert summary["steps"] == 4 and summary["best_step"] in (2, 4)
        paths[arch] = str(out / "model")
    return paths


def test_finetuned_models_reload_in_plain_transformers(finetuned):
    assert AutoModelForSeq2SeqLM.from_pretrained(finetuned["bart"]).config.model_type == "bart"
    assert AutoModelForCausalLM.from_pretrained(finetuned["gpt2"]).config.model_type == "gpt2"
    assert AutoTokenizer.from_pretrained(finetuned["gpt2"]).sep_token == "<sep>"


def test_evaluate_compares_models_side_by_side_and_writes_the_report(finetuned, tiny_data, tmp_path):
    cfg = EvaluateConfig(
        str(tmp_path),
        tiny_data,
        [finetuned["bart"], finetuned["gpt2"]],
        decoding=DecodingConfig(max_new_tokens=6),
        cost=CostConfig(latency_runs=2, throughput_batch=4, throughput_examples=4),
    )
    result = evaluate(cfg)
    report = json.loads((tmp_path / "report.json").read_text())
    assert [m["name"][:4] for m in report["models"]] == ["bart", "gpt2"] and report["examples"] == 8
    for model in report["models"]:
        assert {"bleu", "rouge", "rouge1", "chrf", "exact_match", "perplexity"} <= set(model["scores"])
        assert model["cost"]["parameters"]["total"] > 0 and model["cost"]["latency_s"] > 0
        assert model["cost"]["latency_examples"] == 8 and model["cost"]["latency_per_token_ms"] > 0
        assert "peak_memory_mb" not in model["cost"]  # a CPU's resident set says nothing about one model
        assert model["cost"]["throughput"]["examples_per_s"] > 0 and model["cost"]["size_on_disk_mb"] > 0
    assert "| bart" in result["table"] and "1.00x" in result["table"]
    assert (tmp_path / "report.md").read_text().count("\n|---") == 1
    rows = [
        json.loads(line)
        for line in (tmp_path / "generations" / f"1-{report['models'][1]['name']}.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 8 and all(len(r["references"]) == 4 for r in rows)


def test_scores_match_sacrebleu_on_the_model_outputs_including_empty_ones(finetuned, tiny_data, tmp_path):
    from distilgen.config import ModelConfig
    from distilgen.models import load_model

    tm = load_model(ModelConfig(path=finetuned["bart"]))
    examples = [
        Example("a", "Kiga Rovers hosted Bisaik United.", "Kiga Rovers won.", ("Kiga Rovers won.", "x y")),
        Example("b", "Zo Vek scored.", "Zo Vek scored.", ("Zo Vek scored.",)),
    ]
    result, predictions = evaluate_model(tm, examples, ["bleu"], DecodingConfig(max_new_tokens=1), tiny_data)
    assert len(predictions) == 2  # nothing dropped, even if empty
    expected = sacrebleu.corpus_bleu(predictions, [["Kiga Rovers won.", "Zo Vek scored."], ["x y", None]]).score
    assert result["scores"]["bleu"] == pytest.approx(expected)


def test_generate_keeps_input_order_despite_length_sorting(finetuned, splits):
    from distilgen.config import ModelConfig
    from distilgen.models import load_model

    tm = load_model(ModelConfig(path=finetuned["gpt2"]))
    examples = splits["test"][:5]
    batched = generate(tm, examples, DecodingConfig(max_new_tokens=5, batch_size=2), 512)
    alone = [generate(tm, [e], DecodingConfig(max_new_tokens=5), 512)[0] for e in examples]
    assert batched == alone


def test_model_label_and_speed_up_column():
    assert model_label("runs/qs/teacher/model") == "teacher" and model_label("facebook/bart-base") == "bart-base"
    results = [
        {
            "name": n,
            "scores": {"bleu": b},
            "cost": {
                "parameters": {"total": 1e6},
                "latency_s": lat,
                "latency_per_token_ms": lat * 100,
                "throughput": {"examples_per_s": 3.0},
            },  # fmt: skip
        }
        for n, b, lat in (("t", 30.0, 0.2), ("s", 20.0, 0.05))
    ]
    table = markdown_table(results)
    assert "| s | 20.00 | 1.00 | 50.0 | 5.00 | 4.00x | 3.0 |" in table


@pytest.mark.parametrize("arch", ["bart", "gpt2"])
def test_greedy_evaluation_runs_the_pt_generation_loop_with_generates_tokens(finetuned, splits, arch, monkeypatch):
    """What evaluation (and its cost report) times is `generation.decode`, the loop PT generation runs, with the
    outputs `generate` gives; a model whose generation config adds rules that loop skips goes to `generate`."""
    import distilgen.generation.hf as hf
    from distilgen.config import ModelConfig
    from distilgen.models import load_model

    tm = load_model(ModelConfig(path=finetuned[arch]))
    examples, decoding = splits["dev"], DecodingConfig(max_new_tokens=8, batch_size=3)
    calls = []
    real_decode = hf.decode
    monkeypatch.setattr(hf, "decode", lambda *args, **kw: calls.append(1) or real_decode(*args, **kw))
    ours = generate(tm, examples, decoding, 256)
    assert len(calls) == 3  # 8 examples in batches of 3
    with monkeypatch.context() as patch:
        patch.setattr(hf, "generation_rules", lambda model: ["min_length"])  # as if the model asked for one
        assert generate(tm, examples, decoding, 256) == ours and len(calls) == 3  # generate's tokens, not our loop
    tm.model.generation_config.min_new_tokens = 6  # a rule of the model's own: applied, by `generate`
    generate(tm, examples, decoding, 256)
    assert len(calls) == 3
    tm.model.generation_config.min_new_tokens = None
    generate(tm, examples, DecodingConfig(max_new_tokens=8, num_beams=2), 256)  # beams: `generate`
    assert len(calls) == 3
