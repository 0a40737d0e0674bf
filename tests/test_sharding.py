"""FSDP2 (`distilgen.sharding`): a student sharded over two CPU processes trains, samples and saves as the
unsharded data-parallel one does, under the shipped accelerate config (configs/accelerate/fsdp.yaml)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distilgen.config import ModelConfig, to_dict
from distilgen.models import load_model
from tests.conftest import (
    DISTILL_TASK,
    ROOT,
    TINY,
    cli_env,
    distill_config,
    free_port,
    kill_tree,
    kill_when,
    launch_two_processes,
)

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


def _command(tmp_path: Path, teacher_dir: Path, name: str, launch: list[str], **overrides) -> list[str]:
    cfg = distill_config(tmp_path, teacher_dir, "joint_teaching", output_dir=str(tmp_path / name), **overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return [*launch, "-m", "distilgen.cli", "distill", str(path)]


def _run(command: list[str], env: dict, timeout: float = 400) -> subprocess.CompletedProcess:
    """Run a launch to its end; on a timeout (a hang), kill it with every process it started."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        kill_tree(proc)
    assert proc.returncode == 0, stderr[-3000:]
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def _kill_at_a_checkpoint(command: list[str], env: dict, checkpoint: Path) -> int:
    """Start `command` and SIGKILL it, launcher and processes together, once it has checkpointed a step in 1-9."""
    state = checkpoint / "trainer_state.json"

    def checkpointed() -> bool:
        with contextlib.suppress(FileNotFoundError):  # a new checkpoint may be renamed in between
            return 0 < json.loads(state.read_text())["step"] < 10
        return False

    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, checkpointed, timeout=400)
    if not state.exists():  # killed between a new checkpoint's two renames: the next run puts the old one back
        state = checkpoint.with_name("checkpoint.old") / "trainer_state.json"
    return json.loads(state.read_text())["step"]


def _assert_same_model(ddp_dir: Path, fsdp_dir: Path) -> None:
    """The sharded run's saved model is the DDP run's: the same files and keys (tied weights written once), the
    same weights up to the order of float sums in the gradient reductions, and the model's own class name."""
    ddp, fsdp = (load_file(path / "model.safetensors") for path in (ddp_dir, fsdp_dir))
    assert ddp.keys() == fsdp.keys()
    for key in ddp:
        if not key.endswith("k_proj.bias"):  # its gradient is 0 but for rounding, which AdamW scales up to lr
            torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-4, atol=1e-5, msg=key)
    config = json.loads((fsdp_dir / "config.json").read_text())
    assert not config["architectures"][0].startswith("FSDP")  # the class accelerate swaps in is not saved


def _ending_early(path: Path, teacher_dir: Path, config: dict) -> Path:
    """A random BART student whose samples end early, at very different lengths: EOS gets 30% of each step's
    probability (from the logits' bias, a buffer no step trains). A random student writes to the limit."""
    tm = load_model(ModelConfig(**config, tokenizer=str(teacher_dir)))
    bias = tm.model.final_logits_bias  # (1, V)
    bias[0, tm.tokenizer.eos_token_id] = math.log(0.3 / 0.7 * bias.shape[1])
    tm.save(path)
    return path


@pytest.mark.parametrize("arch", ["bart", "llama"])
def test_a_sharded_student_trains_samples_and_saves_as_the_unsharded_one(tmp_path, teacher_dir, arch):
    """Joint-Teaching: each process samples its own student PTs, of different lengths, so the sharded student's
    processes step together until all have finished (BART's samples end early); the best model is gathered
    whole. BART's steps start from its encoder, and its dev score comes from `generate`'s beams; its sharded run
    is killed (kill -9) at a checkpoint and resumed from the shards. Llama's dev score decodes greedily, and its
    run goes on to the final fine-tuning stage, a second model sharded in the same processes."""
    student = {"arch": arch, "hidden_size": 16, "num_heads": 2, "ffn_size": 32, "decoder_layers": 2}
    if arch == "bart":
        student = {"path": str(_ending_early(tmp_path / "student", teacher_dir, {**student, "encoder_layers": 1}))}
    overrides = {"student": student, "train.eval_every": 6, "train.metric": "chrf", "train.checkpoint_every": 3,
                 "final_finetune_epochs": int(arch == "llama"), "decoding.num_beams": 1 + (arch == "bart")}  # fmt: skip
    _run(_command(tmp_path, teacher_dir, "ddp", launch_two_processes(), **overrides), cli_env())
    sharded = _command(tmp_path, teacher_dir, "fsdp", launch_fsdp(), **overrides)
    checkpoint = tmp_path / "fsdp" / "distill" / "checkpoint"
    if arch == "bart":
        killed_at = _kill_at_a_checkpoint(sharded, fsdp_env(), checkpoint)
        sharded[sharded.index("--main_process_port") + 1] = str(free_port())  # the killed one may still hold it
        assert f"resumed from {checkpoint} at step {killed_at}/12" in _run(sharded, fsdp_env()).stdout
    else:
        _run(sharded, fsdp_env())

    assert len(list((checkpoint / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2  # each process wrote its part
    summaries = [json.loads((tmp_path / run / "summary.json").read_text()) for run in ("ddp", "fsdp")]
    assert Path(summaries[1]["model"]).relative_to(tmp_path / "fsdp") == Path(summaries[0]["model"]).relative_to(
        tmp_path / "ddp"
    )
    _assert_same_model(Path(summaries[0]["model"]), Path(summaries[1]["model"]))
    logs = [(tmp_path / run / "distill" / "metrics.jsonl").read_text().splitlines() for run in ("ddp", "fsdp")]
    scores = [[json.loads(line)["dev_chrf"] for line in log if "dev_chrf" in line] for log in logs]
    assert scores[0] == pytest.approx(scores[1]) and len(scores[0]) == 2


def test_finetune_shards_a_gpt2_and_keeps_the_model_the_unsharded_run_keeps(tmp_path, teacher_dir):
    """`distilgen finetune` under the FSDP config: GPT-2's blocks are units, its tied embedding and output layer
    one, its learned positions in the root; dev loss is computed on every process, and the best model gathered."""

    def command(name: str, launch: list[str]) -> list[str]:
        model = {"arch": "gpt2", "hidden_size": 16, "num_heads": 2, "ffn_size": 32, "decoder_layers": 2,
                 "tokenizer": str(teacher_dir)}  # fmt: skip
        train = {"batch_size": 8, "max_steps": 6, "eval_every": 3, "metric": "loss", "lr": 3e-3}
        body = {"output_dir": str(tmp_path / name), "data": {"task": DISTILL_TASK}, "model": model, "train": train}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(body))
        return [*launch, "-m", "distilgen.cli", "finetune", str(tmp_path / f"{name}.yaml")]

    _run(command("ddp", launch_two_processes()), cli_env())
    _run(command("fsdp", launch_fsdp()), fsdp_env())
    _assert_same_model(tmp_path / "ddp" / "model", tmp_path / "fsdp" / "model")
    states = [json.loads((tmp_path / run / "model" / "distilgen_state.json").read_text()) for run in ("ddp", "fsdp")]
    assert states[1]["step"] == states[0]["step"] and states[1]["dev_score"] == pytest.approx(states[0]["dev_score"])


def test_a_sharded_model_decodes_what_the_unsharded_one_does(tmp_path, teacher_dir):
    """Two processes sample their own inputs with a BART sharded over both: their samples end at different
    steps, and each process steps until both have finished (its forwards are collectives). Each writes what the
    unsharded model writes for the same inputs and seeds."""
    from distilgen.config import GenerationSettings
    from distilgen.generation.decode import decode

    model_dir = _ending_early(tmp_path / "model", teacher_dir, {**TINY, "arch": "bart", "hidden_size": 16})
    tm = load_model(ModelConfig(path=str(model_dir)))
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for rank in range(2):
        source = torch.randint(5, 300, (8, 12), generator=generator)
        batch = {"source_ids": source, "source_mask": torch.ones_like(source)}
        inputs.append({"batch": batch, "seeds": [100 * rank + row for row in range(8)]})
    torch.save(inputs, tmp_path / "inputs.pt")
    worker = ROOT / "tests" / "sharded_decode_worker.py"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
              str(free_port()), str(worker), str(model_dir), str(tmp_path)]  # fmt: skip
    _run(launch, cli_env(), timeout=120)

    settings = GenerationSettings(kind="sample", max_new_tokens=24)
    expected = [decode(tm, one["batch"], settings, seeds=one["seeds"]) for one in inputs]
    assert expected[0].shape[1] != expected[1].shape[1]  # the processes' samples end at different steps
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), expected[rank])


def test_an_fsdp_launch_where_accelerate_cannot_shard_is_refused_in_one_line(tmp_path, teacher_dir):
    """Without the test's shim accelerate would quietly train data-parallel on this CPU machine."""
    command = _command(tmp_path, teacher_dir, "run", launch_fsdp())
    result = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    refusal = "distilgen distill: error: accelerate launch: FSDP was asked for, but accelerate"
    assert result.stderr.count(refusal) == 2, result.stderr[-3000:]
    assert "distilgen/" not in result.stderr  # one line, no traceback of ours
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_the_shipped_fsdp_config_is_accelerate_s_and_asks_for_fsdp2():
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / "configs" / "accelerate" / "fsdp.yaml"))
    assert cfg.distributed_type == "FSDP" and cfg.fsdp_config["fsdp_version"] == 2
