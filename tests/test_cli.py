"""The real `distilgen` command, run as a user would (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distilgen.cli import COMMANDS, main
from tests.conftest import cli_env, kill_when, launch_two_processes

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "distilgen.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """`distilgen ARGS` in this process, from directory `cwd`: (exit code, stdout, stderr). Faster than a
    subprocess for commands that stop early; the kill and launch tests below start real processes."""

    def run(*args, cwd):
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _finetune_yaml(tmp_path, tokenizer_dir, **train) -> Path:
    cfg = {
        "output_dir": str(tmp_path / "run"),
        "data": {"task": {"train_size": 48, "unlabeled_size": 0, "dev_size": 4, "test_size": 4}},
        "model": {
            "arch": "bart",
            "hidden_size": 32,
            "num_heads": 2,
            "ffn_size": 64,
            "encoder_layers": 1,
            "decoder_layers": 1,
            "tokenizer": tokenizer_dir,
            "max_positions": 320,
        },
        "train": {"batch_size": 8, "max_steps": 12, "eval_every": 6, "metric": "loss", **train},
        "decoding": {"max_new_tokens": 8},
    }
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_describes_every_config_key(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"] if command else ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    if command in COMMANDS and COMMANDS[command].config is not None:
        keys = out.split("config keys")[1].splitlines()[1:]
        undocumented = [line for line in keys if " -- " not in line and not line.rstrip().endswith(".")]
        assert keys and not undocumented
    if command == "finetune":
        for key in ("train.lr", "data.task.train_size", "model.arch", "decoding.num_beams", "output_dir"):
            assert f"  {key}" in out
        assert "Run directory" in out  # field docs are shown


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lr=-1", "train.lr: must be > 0"),
        ("train.nope=1", "train.nope: unknown key"),
        ("train.batch_size=many", "train.batch_size: expected an integer"),
        ("data.max_target_length=0", "data.max_target_length: must be > 0"),
        ("data.task=null data.test=missing.jsonl", "data.test: file not found: missing.jsonl"),
    ],
)
def test_a_bad_config_is_one_line_and_exit_code_2(tmp_path, tokenizer_dir, override, expected, run_cli):
    code, _, err = run_cli("finetune", _finetune_yaml(tmp_path, tokenizer_dir), *override.split(), cwd=tmp_path)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"distilgen finetune: error: {expected}")
    assert not (tmp_path / "run").exists()  # nothing was started


def test_a_bad_progress_interval_is_one_line_before_the_command_starts(tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("DISTILGEN_PROGRESS_SECONDS", "often")
    code, _, err = run_cli("data", "nope.yaml", cwd=tmp_path)
    assert code == 2 and err.strip() == (
        "distilgen data: error: DISTILGEN_PROGRESS_SECONDS must be a number of seconds, got 'often'"
    )


def test_a_missing_config_file_exits_2(tmp_path, run_cli):
    code, _, err = run_cli("finetune", "nope.yaml", cwd=tmp_path)
    assert code == 2 and "config file not found: nope.yaml" in err


def test_a_bad_data_file_is_one_line_naming_file_and_line(tmp_path, run_cli):
    (tmp_path / "train.jsonl").write_text('{"source": "a", "target": "b"}\n{"source": "c", "target": \n')
    cfg = tmp_path / "data.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"train": "train.jsonl"}}))
    code, _, err = run_cli("data", cfg, cwd=tmp_path)
    assert code == 2
    assert "train.jsonl" in err and "line 2" in err
    assert len(err.strip().splitlines()) == 1


def test_data_command_exports_the_built_in_task_as_jsonl(tmp_path, run_cli):
    cfg = tmp_path / "data.yaml"
    cfg.write_text(
        yaml.safe_dump({"data": {"task": {"train_size": 5, "unlabeled_size": 3, "dev_size": 2, "test_size": 2}}})
    )
    code, _, err = run_cli("data", cfg, "--export", tmp_path / "out", cwd=tmp_path)
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(isinstance(r["target"], list) and len(r["target"]) > 1 for r in rows)


def test_data_command_counts_tokens_and_what_the_max_lengths_would_cut(tmp_path, run_cli, teacher_dir):
    from distilgen.config import ModelConfig
    from distilgen.models import load_model

    rows = [{"source": "word " * n, "target": "t " * m, "id": str(n)} for n, m in ((2, 1), (9, 3), (30, 12))]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = {"train": "train.jsonl", "max_source_length": 12, "max_target_length": 6, "id_field": "id"}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"data": data}))
    code, out, err = run_cli("data", tmp_path / "data.yaml", "--model", teacher_dir, cwd=tmp_path)
    assert code == 0, err
    stats = json.loads(out.split("train: ", 1)[1].splitlines()[0])
    tm = load_model(ModelConfig(path=str(teacher_dir)))
    sources = [
        len(tm.source_ids(tm.tokenizer(r["source"].strip(), add_special_tokens=False)["input_ids"])) for r in rows
    ]
    targets = [
        len(tm.target_ids(tm.tokenizer(r["target"].strip(), add_special_tokens=False)["input_ids"])) for r in rows
    ]
    assert stats["source_tokens_max"] == max(sources) and stats["target_tokens_max"] == max(targets)
    assert stats["sources_cut"] == sum(n > 12 for n in sources) >= 1
    assert stats["targets_cut"] == sum(n > 6 for n in targets) >= 1
    assert stats["examples"] == 3 and stats["source_words_max"] == 30


def test_a_one_process_command_under_a_two_process_launch_is_refused_before_it_starts(tmp_path):
    cfg = tmp_path / "data.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"task": {"train_size": 5, "unlabeled_size": 0, "dev_size": 2}}}))
    command = [*launch_two_processes(), "-m", "distilgen.cli", "data", str(cfg), "--export", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=cli_env(), timeout=300)
    assert result.returncode != 0
    refusal = "distilgen data: error: runs in one process, on one device, but `accelerate launch` started 2"
    assert result.stderr.count(refusal) == 2, result.stderr[-3000:]  # each process says so, and stops
    assert "finetune, distill, study, generate)" in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_fsdp1_launch_is_refused_in_one_line_before_anything_is_written(tmp_path):
    """`accelerate launch --use_fsdp` asks for FSDP1 unless told otherwise: refused (exit 2) before accelerate
    starts (its FSDP1 plugin would fail on this CPU machine with a traceback), naming what to do."""
    cfg = tmp_path / "finetune.yaml"
    task = {"train_size": 5, "unlabeled_size": 0, "dev_size": 2}
    body = {"output_dir": str(tmp_path / "run"), "data": {"task": task}, "model": {"arch": "llama", "hidden_size": 32}}
    cfg.write_text(yaml.safe_dump(body))
    launch = [*launch_two_processes()]
    launch[launch.index("--multi_gpu")] = "--use_fsdp"
    result = subprocess.run([*launch, "-m", "distilgen.cli", "finetune", str(cfg)], capture_output=True, text=True,
                            cwd=tmp_path, env=cli_env(), timeout=300)  # fmt: skip
    assert result.returncode != 0
    refusal = (
        "distilgen finetune: error: `accelerate launch` asked for FSDP1; distilgen runs FSDP2: set fsdp_version: 2"
    )
    assert result.stderr.count(refusal) == 2, result.stderr[-3000:]
    assert "distilgen/" not in result.stderr  # no frame of ours: the launcher's own report follows the exit 2
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key, name", [("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"),
                                       ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM")])  # fmt: skip
def test_every_sharded_launch_is_refused_the_same_way(tmp_path, monkeypatch, capsys, key, name):
    from distilgen.cli import main

    cfg = tmp_path / "finetune.yaml"
    task = {"train_size": 5, "unlabeled_size": 0, "dev_size": 2}
    cfg.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), "data": {"task": task},
                                   "model": {"arch": "llama", "hidden_size": 32}}))  # fmt: skip
    monkeypatch.setenv(key, "True")  # as accelerate reads it: any case
    assert main(["finetune", str(cfg)]) == 2
    assert f"distilgen finetune: error: `accelerate launch` asked for {name}," in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_sigkill_during_finetune_then_rerun_resumes_and_finishes(tmp_path, tokenizer_dir):
    config = _finetune_yaml(tmp_path, tokenizer_dir, max_steps=40, checkpoint_every=4, eval_every=20)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "distilgen.cli", "finetune", str(config)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state_file = tmp_path / "run" / "checkpoint" / "trainer_state.json"
    kill_when(proc, lambda: state_file.exists() and 4 <= json.loads(state_file.read_text())["step"] < 40)
    killed_at = json.loads(state_file.read_text())["step"]
    assert killed_at < 40

    result = _cli("finetune", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"resumed from {tmp_path / 'run' / 'checkpoint'} at step {killed_at}/40" in result.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 40
    assert (tmp_path / "run" / "config.yaml").exists() and (tmp_path / "run" / "model" / "model.safetensors").exists()


def test_rerunning_a_run_directory_with_another_model_is_refused(tmp_path, tokenizer_dir, run_cli):
    config = _finetune_yaml(tmp_path, tokenizer_dir, max_steps=2, eval_every=2)
    assert run_cli("finetune", config, cwd=tmp_path)[0] == 0
    code, _, err = run_cli("finetune", config, "model.hidden_size=64", cwd=tmp_path)
    assert code == 2 and "model.hidden_size: 64 differs from the run already trained in" in err


def test_inspect_reports_cost_of_a_shrunk_copy_and_saves_it(tmp_path, tokenizer_dir):
    from distilgen.models import load_model
    from tests.conftest import tiny_model_config

    load_model(tiny_model_config("bart", tokenizer_dir, encoder_layers=2, decoder_layers=3)).save(tmp_path / "teacher")
    result = _cli(
        "inspect",
        str(tmp_path / "teacher"),
        "shrink=2:2",
        f"save={tmp_path / 'student'}",
        "input_length=16",
        "output_length=4",
        "batch_size=4",
        "latency_runs=2",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["latency_median_s"] > 0 and report["throughput"]["tokens_per_s"] > 0
    assert report["flops"]["per_generated_token"] > 0
    assert report["layers"] == {"encoder": 2, "decoder": 2} and report["vocabulary"] == 300
    assert "layers: 2 encoder, 2 decoder; vocabulary 300 tokens; chat template: no" in result.stdout
    saved = json.loads((tmp_path / "student" / "config.json").read_text())
    assert (saved["encoder_layers"], saved["decoder_layers"]) == (2, 2)
    from transformers import OPTConfig, OPTForCausalLM

    opt = OPTForCausalLM(
        OPTConfig(vocab_size=300, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2)
    )
    opt.save_pretrained(tmp_path / "opt")
    load_model(tiny_model_config("gpt2", tokenizer_dir)).tokenizer.save_pretrained(tmp_path / "opt")
    other = _cli("inspect", str(tmp_path / "opt"), "input_length=8", "output_length=2", "latency_runs=1")
    assert other.returncode == 0 and "layers: not known for this family" in other.stdout, other.stderr  # no shrink
    bad = _cli("inspect", str(tmp_path / "teacher"), "shrink=2:5")
    assert bad.returncode == 2 and "error: shrink: cannot keep 5 of 3 layers" in bad.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["evaluate", "data.task.test_size=0", "--model", "{teacher}"], "data.task.test_size: no test examples"),
        (["evaluate", "--model", "{tmp}/nowhere"], "models[0]: directory not found"),
        (["evaluate", "--model", "{tmp}", "data.task.test_size=2"], "models[0].path: cannot load a model from"),
        (["inspect", "{tmp}"], "error: path: cannot load a model from"),
    ],
)
def test_user_errors_of_evaluate_and_inspect_are_one_line_and_exit_2(tmp_path, teacher_dir, capsys, args, expected):
    args = [a.format(teacher=teacher_dir, tmp=tmp_path) for a in args]
    assert main([*args, f"--output-dir={tmp_path / 'out'}"] if args[0] == "evaluate" else args) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err


@pytest.fixture(params=["size=2m"])
def tiny_disk(tmp_path, request):
    """A 2 MiB tmpfs mounted at tmp_path/disk: a real full disk (needs root and mount; skipped elsewhere);
    parametrize with "size=2m,ro" for a read-only one."""
    disk = tmp_path / "disk"
    disk.mkdir()
    options = ["-o", request.param]
    mounted = subprocess.run(["mount", "-t", "tmpfs", *options, "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip() or mounted.returncode}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_stops_finetune_with_one_line_naming_the_path(tmp_path, tokenizer_dir, tiny_disk):
    config = _finetune_yaml(tmp_path, tokenizer_dir, max_steps=8, checkpoint_every=4, eval_every=8)
    config.write_text(config.read_text().replace(str(tmp_path / "run"), str(tiny_disk / "run")))
    (tiny_disk / "filler").write_bytes(b"\0" * (2**21 - 300_000))  # leave room for the config, not a checkpoint
    result = _cli("finetune", str(config), cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if "error" in line]
    assert line.endswith(f"error: no space left on device: {tiny_disk / 'run' / 'checkpoint.tmp'}")
    assert not (tiny_disk / "run" / "checkpoint.tmp").exists()


def test_a_refused_write_is_one_line_with_the_path_and_exit_1(monkeypatch, capsys, tmp_path):
    import errno

    def full(cfg, args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(COMMANDS["data"], "run", full)
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({"data": {"task": {"train_size": 2}}}))
    assert main(["data", str(tmp_path / "d.yaml")]) == 1
    assert capsys.readouterr().err == f"distilgen data: error: no space left on device: {tmp_path / 'x'}\n"


@pytest.mark.parametrize("tiny_disk", ["size=2m,ro"], indirect=True)
def test_a_read_only_output_dir_is_a_config_error_before_anything_starts(tmp_path, tokenizer_dir, tiny_disk, run_cli):
    config = _finetune_yaml(tmp_path, tokenizer_dir)
    code, _, err = run_cli("finetune", config, f"output_dir={tiny_disk / 'run'}", cwd=tmp_path)
    assert code == 2 and err.strip() == (
        f"distilgen finetune: error: output_dir: cannot write in {tiny_disk / 'run'} (read-only file system)"
    )
