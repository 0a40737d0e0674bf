"""Shared fixtures: a tiny slice of the built-in task and tiny models built from configs (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

from distilgen.config import BuiltinTaskConfig, DataConfig, ModelConfig
from distilgen.data import load_splits
from distilgen.models import load_model, train_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = {
    "hidden_size": 32,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "num_heads": 2,
    "ffn_size": 64,
    "max_positions": 320,
    "dropout": 0.0,
}


@pytest.fixture(scope="session")
def tiny_data() -> DataConfig:
    return DataConfig(task=BuiltinTaskConfig(train_size=48, unlabeled_size=16, dev_size=8, test_size=8))


@pytest.fixture(scope="session")
def splits(tiny_data):
    return load_splits(tiny_data)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, splits):
    texts = [e.source for s in splits.values() for e in s] + [r for e in splits["train"] for r in e.references]
    path = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(texts, vocab_size=300).save_pretrained(path)
    return str(path)


@pytest.fixture(params=["bart", "t5", "gpt2"])
def arch(request) -> str:
    return request.param


def tiny_model_config(arch: str, tokenizer: str, **overrides) -> ModelConfig:
    return ModelConfig(arch=arch, tokenizer=tokenizer, **{**TINY, **overrides})


@pytest.fixture
def tiny_model(arch, tokenizer_dir):
    torch.manual_seed(0)
    return load_model(tiny_model_config(arch, tokenizer_dir))
