"""Shared fixtures: a tiny slice of the built-in task and tiny models built from configs (no downloads)."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest
import torch

from distilgen.config import BuiltinTaskConfig, DataConfig, DistillConfig, ModelConfig, from_dict
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


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer_dir):
    """A tiny random BART teacher saved with its tokenizer, as `distilgen finetune` leaves one."""
    path = tmp_path_factory.mktemp("teacher") / "model"
    torch.manual_seed(0)
    load_model(tiny_model_config("bart", tokenizer_dir)).save(path)
    return path


ROOT = Path(__file__).resolve().parents[1]


def cli_env() -> dict[str, str]:
    """Environment of a `python -m distilgen.cli` subprocess: this checkout, offline, one thread."""
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def launch_two_processes() -> list[str]:
    """`accelerate launch` of 2 processes on this machine, on a free port (the default 29500 of a launch that
    has just ended may still be held). Without a GPU, accelerate starts several processes only with
    --multi_gpu (torchrun); they form a gloo group."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
            "--dynamo_backend", "no"]  # fmt: skip


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 240, log: Path | None = None) -> None:
    """SIGKILL `proc` as soon as `ready()` holds (polled every 20 ms); the test fails if `proc` ends first
    (showing the end of `log`, where the process's output went, if given)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.02)
    output = log.read_text()[-3000:] if log is not None and log.exists() else ""
    assert proc.poll() is None, f"the process ended (code {proc.returncode}) before it could be killed\n{output}"
    kill_tree(proc)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL `proc` with every process it started (torchrun starts its workers in sessions of their own)."""
    if proc.poll() is not None:
        return
    launcher = psutil.Process(proc.pid)
    for process in [*launcher.children(recursive=True), launcher]:
        process.kill()
    proc.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`distilgen serve MODEL` in its own process on 127.0.0.1, until `stop()`."""

    def __init__(self, model: str, *overrides: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "distilgen.cli", "serve", model, f"port={self.port}", *overrides]
        self.proc = subprocess.Popen(command, env={**cli_env(), **(env or {})}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)  # fmt: skip
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read()
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError("the server did not answer /health within 120 s")

    def client(self, key: str = "none"):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


DISTILL_TASK = {"train_size": 24, "unlabeled_size": 8, "dev_size": 4, "test_size": 0}
DISTILL_STUDENT = {"arch": "bart", **TINY, "hidden_size": 16, "encoder_layers": 1, "decoder_layers": 1}


def distill_config(tmp_path, teacher_dir, method, **overrides) -> DistillConfig:
    """A tiny distillation run of `method` (dotted `overrides`), with its PT store under `tmp_path`."""
    data = {
        "output_dir": str(tmp_path / method),
        "data": {"task": DISTILL_TASK, "max_source_length": 256, "max_target_length": 48},
        "teacher": {"path": str(teacher_dir)},
        "student": DISTILL_STUDENT,
        "method": method,
        "pts": {
            "spec": {"name": "s2", "kind": "sample", "num_samples": 2, "max_new_tokens": 24},
            "store": str(tmp_path / "pts"),
        },
        "student_pts": {"max_new_tokens": 24},
        "attention": {"relation_heads": 2},
        "train": {"max_steps": 12, "batch_size": 8, "lr": 3e-3, "eval_every": 0, "metric": "loss", "log_every": 1},
        "decoding": {"max_new_tokens": 24},
        "final_finetune_epochs": 0,
    }  # fmt: skip
    data = copy.deepcopy(data)  # overrides must not reach DISTILL_STUDENT
    for key, value in overrides.items():
        node = data
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return from_dict(DistillConfig, data)
