"""The README's first command, end to end: `distilgen quickstart` (several minutes on a CPU: marked slow, run
with `pytest -m slow`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import cli_env


@pytest.mark.slow
def test_the_quickstart_trains_teacher_student_and_joint_teaching_and_reports_them(tmp_path):
    out = tmp_path / "quickstart"
    command = [sys.executable, "-m", "distilgen.cli", "quickstart", f"output_dir={out}"]
    result = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report" / "report.json").read_text())
    scores = {model["name"]: model["scores"] for model in report["models"]}
    assert list(scores) == ["teacher", "student", "joint_teaching"]
    assert scores["teacher"]["bleu"] > scores["student"]["bleu"]  # there is a gap to close
    assert scores["teacher"]["perplexity"] < scores["joint_teaching"]["perplexity"] < scores["student"]["perplexity"]
    for model in ("teacher/model", "student/model"):
        assert (out / model / "model.safetensors").exists()
    assert "| joint_teaching |" in result.stdout
    rerun = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=1800)
    assert rerun.returncode == 0 and rerun.stdout.count("| joint_teaching |") == 1  # every stage resumes, done
