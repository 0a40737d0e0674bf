"""FSDP2 (`distilgen.sharding`): a student sharded over two CPU processes trains, samples and saves as the
unsharded data-parallel one does, under the shipped accelerate config (configs/accelerate/fsdp.yaml)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distilgen.config import to_dict
from tests.conftest import ROOT, cli_env, launch_two_processes
from tests.test_distill import _cfg

FSDP_ON_CPU = Path(__file__).parent / "fsdp_on_cpu"
"""Its sitecustomize lets accelerate shard in a CPU process group (which accelerate 1.15 does not do alone)."""


def launch_fsdp() -> list[str]:
    """Two processes under the shipped FSDP config (the command line's process count and port win)."""
    launch = launch_two_processes()
    at = launch.index("--multi_gpu")
    return [*launch[:at], "--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), *launch[at + 1 :]]


def fsdp_env() -> dict[str, str]:
    env = cli_env()
    env["PYTHONPATH"] = f"{FSDP_ON_CPU}{os.pathsep}{env['PYTHONPATH']}"
    return env


def _distill(tmp_path: Path, teacher_dir: Path, name: str, launch: list[str], env: dict, **overrides):
    cfg = _cfg(tmp_path, teacher_dir, "joint_teaching", output_dir=str(tmp_path / name), **overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    result = subprocess.run([*launch, "-m", "distilgen.cli", "distill", str(path)], env=env, capture_output=True,
                            text=True, timeout=400)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("arch", ["bart", "llama"])
def test_a_sharded_student_trains_samples_and_saves_as_the_unsharded_one(tmp_path, teacher_dir, arch):
    """Joint-Teaching: each process samples its own student PTs, of different lengths, so the sharded student's
    processes step together until all have finished; dev chrF decodes greedily; the best model is gathered whole.
    BART's loop calls its encoder outside the root unit's hooks."""
    student = {"arch": arch, "hidden_size": 16, "num_heads": 2, "ffn_size": 32, "decoder_layers": 2}
    if arch == "bart":
        student["encoder_layers"] = 1
    overrides = {"student": student, "train.eval_every": 6, "train.metric": "chrf"}
    _distill(tmp_path, teacher_dir, "ddp", launch_two_processes(), cli_env(), **overrides)
    _distill(tmp_path, teacher_dir, "fsdp", launch_fsdp(), fsdp_env(), **overrides)

    checkpoint = tmp_path / "fsdp" / "distill" / "checkpoint"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir()  # sharded: each process wrote its part
    assert len(list((checkpoint / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2
    ddp, fsdp = (load_file(tmp_path / run / "distill" / "model" / "model.safetensors") for run in ("ddp", "fsdp"))
    assert ddp.keys() == fsdp.keys()
    for key in ddp:  # the same training, up to the order of float sums in the gradient reductions
        if not key.endswith("k_proj.bias"):  # its gradient is 0 but for rounding, which AdamW scales up to lr
            torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-4, atol=1e-5, msg=key)
    config = json.loads((tmp_path / "fsdp" / "distill" / "model" / "config.json").read_text())
    assert not config["architectures"][0].startswith("FSDP")  # the class accelerate swaps in is not saved
    logs = [(tmp_path / run / "distill" / "metrics.jsonl").read_text().splitlines() for run in ("ddp", "fsdp")]
    scores = [[json.loads(line)["dev_chrf"] for line in log if "dev_chrf" in line] for log in logs]
    assert scores[0] == pytest.approx(scores[1]) and len(scores[0]) == 2


def test_an_fsdp_launch_where_accelerate_cannot_shard_is_refused_in_one_line(tmp_path, teacher_dir):
    """Without the test's shim accelerate would quietly train data-parallel on this CPU machine."""
    cfg = _cfg(tmp_path, teacher_dir, "joint_teaching", output_dir=str(tmp_path / "run"))
    path = tmp_path / "jt.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    result = subprocess.run([*launch_fsdp(), "-m", "distilgen.cli", "distill", str(path)], env=cli_env(),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode != 0
    refusal = "distilgen distill: error: accelerate launch: FSDP was asked for, but accelerate"
    assert result.stderr.count(refusal) == 2, result.stderr[-3000:]
    assert "distilgen/" not in result.stderr  # one line, no traceback of ours
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_the_shipped_fsdp_config_is_accelerate_s_and_asks_for_fsdp2():
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / "configs" / "accelerate" / "fsdp.yaml"))
    assert cfg.distributed_type == "FSDP" and cfg.fsdp_config["fsdp_version"] == 2
