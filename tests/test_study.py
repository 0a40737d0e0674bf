"""The study runner and the exposure-bias diagnostic, end to end on tiny models."""

from __future__ import annotations

import dataclasses
import json
import subprocess

import pytest
import torch
import yaml

from distilgen.config import ConfigError, DecodingConfig, DiagnoseConfig, ModelConfig, StudyConfig, from_dict
from distilgen.data import load_splits
from distilgen.diagnose import diagnose, student_outputs, teacher_completions
from distilgen.evaluate import generate
from distilgen.metrics import compute_metrics, gap_closed
from distilgen.models import load_model
from distilgen.study import markdown, run_line, run_steps, study, summarize
from distilgen.teachers import load_teacher
from tests.conftest import TINY, cli_env, launch_two_processes

TASK = {"train_size": 16, "unlabeled_size": 8, "dev_size": 4, "test_size": 6}
STUDENT = {"arch": "bart", **TINY, "hidden_size": 16, "encoder_layers": 1, "decoder_layers": 1}


def _study_cfg(tmp_path, teacher_dir, **extra) -> StudyConfig:
    return from_dict(
        StudyConfig,
        {
            "output_dir": str(tmp_path / "study"),
            "data": {"task": TASK, "max_source_length": 256, "max_target_length": 32},
            "teacher": {"path": str(teacher_dir)},
            "student": STUDENT,
            "methods": ["finetune", "logits_kd"],
            "variants": [{"name": "seq_kd_labeled", "method": "seq_kd", "set": {"pts": {"unlabeled": False}}}],
            "common": {
                "train": {"max_steps": 4, "batch_size": 8, "eval_every": 0, "metric": "loss"},
                "pts": {"spec": {"name": "s2", "kind": "sample", "num_samples": 2, "max_new_tokens": 16}},
                "decoding": {"max_new_tokens": 16},
                "final_finetune_epochs": 0,
            },
            "seeds": [0, 1],
            "decoding": {"max_new_tokens": 16},
            "cost": {"latency_runs": 2, "throughput_examples": 4, "throughput_batch": 2},
            **extra,
        },
    )


def test_gap_closed_is_zero_at_the_student_and_one_at_the_teacher():
    assert gap_closed(20.0, 20.0, 30.0) == 0.0 and gap_closed(30.0, 20.0, 30.0) == 1.0
    assert gap_closed(26.0, 20.0, 30.0) == pytest.approx(0.6) and gap_closed(1.0, 2.0, 2.0) is None


def _fake_results(finetune: list[float], kd: list[float]) -> dict:
    cost = {"parameters": {"total": 1e6}, "latency_s": 0.01, "latency_per_token_ms": 1.0, "output_tokens_mean": 10.0,
            "latency_examples": 32, "throughput": {"examples_per_s": 5.0}}  # fmt: skip
    results = {}
    for seed, (f, k) in enumerate(zip(finetune, kd, strict=True)):
        results[("finetune", seed)] = {"scores": {"bleu": f}, "cost": cost}
        results[("seq_kd", seed)] = {"scores": {"bleu": k}, "cost": cost}
    return results


def test_a_gap_within_the_seed_spread_is_called_noise_and_a_clear_one_is_not(tmp_path, teacher_dir):
    cfg = _study_cfg(tmp_path, teacher_dir, seeds=[0, 1], metrics=["bleu"], methods=["finetune", "seq_kd"])
    cfg.variants = []
    cost = _fake_results([0], [0])[("finetune", 0)]["cost"]
    # teacher 20.5 against students 19.8 and 20.2 (mean 20.0): a 0.5 gap; KD runs 20.6 and 19.4: a spread of ~0.6
    noisy = summarize(cfg, {"scores": {"bleu": 20.5}, "cost": cost}, _fake_results([19.8, 20.2], [20.6, 19.4]), {})
    assert noisy["gaps"]["bleu"]["gap"] == pytest.approx(0.5)
    assert noisy["gaps"]["bleu"]["spread"] == pytest.approx(((0.08 + 0.72) / 2) ** 0.5)
    assert noisy["gaps"]["bleu"]["meaningful"] is False
    table = markdown(noisy)
    assert "| seq_kd | noise |" in table and "gap closed is not meaningful (noise)" in table
    clear = summarize(cfg, {"scores": {"bleu": 30.0}, "cost": cost}, _fake_results([20, 20], [26, 24]), {})
    assert clear["gaps"]["bleu"]["meaningful"] is True
    assert clear["gaps"]["bleu"]["spread"] == pytest.approx(1.0)  # pooled: variances 0 and 2
    assert "| seq_kd | 50.0% ± 14.1 |" in markdown(clear)  # per seed 60% and 40%
    one_seed = summarize(
        dataclasses.replace(cfg, seeds=[0]), {"scores": {"bleu": 30.0}, "cost": cost}, _fake_results([20], [25]), {}
    )
    assert one_seed["gaps"]["bleu"]["meaningful"] is None and "| seq_kd | 50.0% |" in markdown(one_seed)
    assert "spread is unknown" in markdown(one_seed)
    worse = summarize(cfg, {"scores": {"bleu": 19.0}, "cost": cost}, _fake_results([19.8, 20.2], [20.6, 19.4]), {})
    assert worse["gaps"]["bleu"]["meaningful"] is None and "| seq_kd | - |" in markdown(worse)  # no gap, not noise
    assert "the teacher is no better, so there is no gap to close" in markdown(worse)


def test_each_finished_run_says_its_best_dev_score_and_steps():
    summary = {
        "distill": {"steps": 300, "best_step": 200, "best_dev_bleu": 12.345},
        "finetune": {"steps": 250, "best_step": 250, "best_dev_bleu": None},
    }
    assert run_steps(summary) == 550
    assert run_line(summary, "bleu") == (
        "distill: best dev bleu 12.35 at step 200 of 300; finetune: no dev score of 250 (550 steps)"
    )


def test_study_settings_are_checked_per_run_before_anything_trains(tmp_path, teacher_dir):
    with pytest.raises(ConfigError) as err:
        _study_cfg(tmp_path, teacher_dir, common={"train": {"lr": -1}})
    assert err.value.key == "common.train.lr"
    with pytest.raises(ConfigError) as err:
        _study_cfg(tmp_path, teacher_dir, variants=[{"name": "x", "method": "seq_kd", "set": {"pts": {"k": 0}}}])
    assert err.value.key == "variants.x.pts.k"
    with pytest.raises(ConfigError, match="set by the study"):
        _study_cfg(tmp_path, teacher_dir, common={"seed": 3})


def test_study_trains_every_run_shares_pts_and_reports_gap_cost_and_a_plot(tmp_path, teacher_dir):
    cfg = _study_cfg(tmp_path, teacher_dir)
    report = study(cfg)
    out = tmp_path / "study"
    assert [row["name"] for row in report["runs"]] == ["finetune", "logits_kd", "seq_kd_labeled"]
    for seed in (0, 1):
        for name in ("finetune", "logits_kd", "seq_kd_labeled"):
            assert json.loads((out / f"seed{seed}" / name / "summary.json").read_text())["distill"]["steps"] == 4
    assert (out / "pts" / "manifest.json").exists() and not (out / "seed0" / "seq_kd_labeled" / "pts").exists()

    def score(name: str) -> float:
        return json.loads((out / "eval" / f"{name}.json").read_text())["scores"]["chrf"]

    per_seed = [gap_closed(score(f"logits_kd-seed{s}"), score(f"finetune-seed{s}"), score("teacher")) for s in (0, 1)]
    logits_kd = report["runs"][1]
    assert logits_kd["chrf"][0] == pytest.approx((score("logits_kd-seed0") + score("logits_kd-seed1")) / 2)
    table = (out / "report.md").read_text()
    if None in per_seed:  # these tiny random models: the teacher may score below a fine-tuned student
        assert logits_kd["chrf_gap_closed"] is None and report["runs"][0]["chrf_gap_closed"] is None
        assert "- chrf: the teacher's advantage over the fine-tuned student" in table and "no gap to close" in table
        gap_table = table.split("## Gap closed")[1].split("##")[0]
        finetune_row = next(x for x in gap_table.splitlines() if x.startswith("| finetune"))
        assert finetune_row.split(" | ")[report["scores"].index("chrf") + 1] == "-"  # said, not a ratio, not noise
    else:
        assert logits_kd["chrf_gap_closed"][0] == pytest.approx(sum(per_seed) / 2)
        assert report["runs"][0]["chrf_gap_closed"][0] == 0.0
    # every score the metrics give has its row cell and its gap closed: ROUGE's parts too, 2 decimals everywhere
    assert report["scores"] == ["bleu", "rouge", "rouge1", "rouge2", "rougeL", "chrf", "exact_match"]
    assert set(report["gaps"]) == set(report["scores"]) and "rougeL_gap_closed" in logits_kd
    scores_table = table.split("## Scores")[1].split("##")[0]
    assert (
        "| model | bleu | rouge | rouge1 | rouge2 | rougeL | chrf | exact_match | steps | train (s) |" in scores_table
    )
    teacher_row = next(line for line in scores_table.splitlines() if line.startswith("| teacher"))
    assert teacher_row.split(" | ")[1] == f"{report['teacher']['scores']['bleu']:.2f}"
    mean, std = logits_kd["bleu"]
    assert (f"| {mean:.2f} ± {std:.2f} |" if std else f"| {mean:.2f} |") in table
    assert "| finetune | 4 | 4 | 4 |" not in table and "| 4 |" in scores_table  # steps of each run
    assert [row["steps"] for row in report["runs"]] == [[4, 0.0]] * 3  # mean and std over seeds, from JSON
    assert logits_kd["cost"]["parameters"]["total"] < report["teacher"]["cost"]["parameters"]["total"]
    assert "| teacher |" in table and "| seq_kd_labeled |" in table and "## Gap closed" in table
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    times = (out / "train_seconds.json").read_text()
    study(cfg)  # a rerun trains and evaluates nothing again
    assert (out / "train_seconds.json").read_text() == times

    # a run trained outside the study has no time: its row says so instead of failing the report
    (out / "train_seconds.json").write_text(
        json.dumps({k: v for k, v in json.loads(times).items() if k != "seq_kd_labeled/seed1"})
    )
    report = study(cfg)
    assert [row["train_seconds"] is None for row in report["runs"]] == [False, False, True]
    assert json.loads((out / "report.json").read_text())["runs"][2]["train_seconds"] is None
    seq_row = next(x for x in (out / "report.md").read_text().splitlines() if x.startswith("| seq_kd_labeled |"))
    assert seq_row.endswith("| 4 | - |")  # steps known, no time


def test_a_study_under_accelerate_launch_trains_in_both_processes_and_reports_once(tmp_path, teacher_dir):
    from distilgen.config import to_dict

    cfg = _study_cfg(tmp_path, teacher_dir, seeds=[0])
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    command = [*launch_two_processes(), "-m", "distilgen.cli", "study", str(path)]
    result = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("[1/3] finetune, seed 0") == 1 and result.stdout.count("## Scores") == 1
    report = json.loads((tmp_path / "study" / "report.json").read_text())
    assert [row["name"] for row in report["runs"]] == ["finetune", "logits_kd", "seq_kd_labeled"]


# ---------------------------------------------------------------------------------------------
# diagnose
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, teacher_dir):
    path = tmp_path_factory.mktemp("student") / "model"
    torch.manual_seed(1)
    load_model(ModelConfig(**{**STUDENT, "tokenizer": str(teacher_dir)})).save(path)
    return path


def test_diagnose_ends_are_the_teacher_and_the_student_alone(tmp_path, teacher_dir, student_dir):
    cfg = from_dict(
        DiagnoseConfig,
        {
            "output_dir": str(tmp_path / "diag"),
            "data": {"task": TASK, "max_source_length": 256},
            "teacher": {"path": str(teacher_dir)},
            "students": [str(student_dir)],
            "decoding": {"max_new_tokens": 12, "batch_size": 4},
            "metric": "chrf",
        },
    )
    result = diagnose(cfg)
    scores = result["students"][str(student_dir)]
    examples = load_splits(cfg.data, ("test",))["test"]
    references = [list(e.references) for e in examples]
    teacher, student = load_model(ModelConfig(path=str(teacher_dir))), load_model(ModelConfig(path=str(student_dir)))
    alone = {
        name: compute_metrics(["chrf"], generate(tm, examples, DecodingConfig(max_new_tokens=12), 256), references)
        for name, tm in (("teacher", teacher), ("student", student))
    }
    assert scores[0.0] == pytest.approx(alone["teacher"]["chrf"])
    assert scores[1.0] == pytest.approx(alone["student"]["chrf"])
    assert sorted(scores) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert (tmp_path / "diag" / "diagnose.png").exists() and "chrf @ 50% student" in result["table"]


def test_teacher_completions_keep_the_student_prefix(teacher_dir, student_dir):
    cfg = from_dict(
        DiagnoseConfig,
        {
            "output_dir": "unused",
            "data": {"task": TASK, "max_source_length": 256},
            "teacher": {"path": str(teacher_dir)},
            "students": [str(student_dir)],
            "decoding": {"max_new_tokens": 12, "batch_size": 4},
        },
    )
    examples = load_splits(cfg.data, ("test",))["test"]
    teacher = load_teacher(cfg.teacher, "fp32", torch.device("cpu"))
    student = load_model(ModelConfig(path=str(student_dir)))
    outputs = student_outputs(student, examples, cfg)
    prefixes = [tokens[: len(tokens) // 2] for tokens in outputs]
    completed = teacher_completions(teacher, examples, prefixes, cfg)
    for prefix, written in zip(prefixes, completed, strict=True):
        assert written.tokens[: len(prefix)] == prefix and len(written.tokens) > len(prefix)
        assert written.text == teacher.tokenizer.decode(written.tokens, skip_special_tokens=True).strip()


def test_a_bad_run_setting_is_one_error_keyed_where_the_study_sets_it(tmp_path, teacher_dir):
    hot = {"kd": {"temperature": 2.0}, "pts": {"topk": 8}}  # a temperature that stored top-k cannot give
    common = {"train": {"max_steps": 4}}
    cases = [
        ({"methods": ["finetune", "bogus"]}, r"^methods: unknown method 'bogus'"),
        ({"methods": ["logits_kd_pt"], "variants": [], "common": {**common, **hot}}, r"^common\.kd\.temperature: 2.0"),
        (
            {"methods": ["finetune"], "variants": [{"name": "hot", "method": "logits_kd_pt", "set": hot}]},
            r"^variants\.hot\.set\.kd\.temperature: 2.0",
        ),
        ({"variants": [{"name": "v", "method": "nope"}]}, r"^variants\.v\.method: unknown method 'nope'"),
    ]
    for extra, expected in cases:
        with pytest.raises(ConfigError, match=expected):
            study(_study_cfg(tmp_path, teacher_dir, **extra))
    assert not (tmp_path / "study").exists()  # found before anything was written


def test_a_command_config_built_with_a_plain_model_config_gets_an_hf_teacher(teacher_dir):
    from distilgen.config import BuiltinTaskConfig, DataConfig, GenerateConfig, TeacherConfig

    data = DataConfig(task=BuiltinTaskConfig(**TASK))
    for cfg in (
        GenerateConfig(store="pts", data=data, teacher=ModelConfig(path=str(teacher_dir))),
        DiagnoseConfig(output_dir="d", data=data, teacher=ModelConfig(path=str(teacher_dir)), students=["s"]),
    ):
        assert isinstance(cfg.teacher, TeacherConfig) and cfg.teacher.kind == "hf"
