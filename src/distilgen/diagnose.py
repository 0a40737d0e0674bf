"""The exposure-bias diagnostic: how much do the student's own prefixes hurt?

    distilgen diagnose configs/diagnose/match_reports.yaml

Joint-Teaching's premise (the study, section 6): a student trained only on teacher-written prefixes meets
its own, imperfect prefixes at inference (exposure bias). For X in 0, 25, ..., 100 %, the student writes
the first X % of each output (greedy) and the teacher completes it; the score per X shows where quality is
lost. A student whose prefixes the teacher can still complete well (a flat curve) has little to gain.
Passing several checkpoints of one run shows how training changes the curve.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from distilgen.config import DiagnoseConfig, ModelConfig, save_config, writable_dir
from distilgen.data import Example, scored_split
from distilgen.generation import Generated
from distilgen.metrics import compute_metrics
from distilgen.models import TextModel, load_model
from distilgen.progress import progress_bar
from distilgen.students import require_same_vocab
from distilgen.teachers import Teacher, load_teacher


def student_outputs(tm: TextModel, examples: Sequence[Example], cfg: DiagnoseConfig) -> list[list[int]]:
    """The student's text tokens for each example (its own decoding, `cfg.decoding`)."""
    generator = tm.generator(cfg.data.max_source_length, cfg.decoding.batch_size)
    outputs = generator.generate([e.source for e in examples], cfg.decoding.settings(), desc="student")
    return [written[0].tokens for written in outputs]


def teacher_completions(
    teacher: Teacher, examples: Sequence[Example], prefixes: Sequence[list[int]], cfg: DiagnoseConfig
) -> list[Generated]:
    """The teacher's output continuing each prefix (teacher tokens, kept at the start of its output)."""
    generator = teacher.generator(cfg.data.max_source_length, cfg.decoding.batch_size, own_rules=True)
    settings = cfg.decoding.settings()
    outputs = generator.generate([e.source for e in examples], settings, prefixes=prefixes, desc="teacher")
    return [written[0] for written in outputs]


def prefix_scores(
    teacher: TextModel, student: TextModel, examples: Sequence[Example], cfg: DiagnoseConfig
) -> dict[float, float]:
    """{X: score} where the student writes the first X of each output and the teacher the rest."""
    references = [list(e.references) for e in examples]
    outputs = student_outputs(student, examples, cfg)
    scores = {}
    for fraction in cfg.fractions:
        if fraction == 1.0:  # the student alone: nothing left for the teacher
            texts = [student.tokenizer.decode(tokens).strip() for tokens in outputs]
        else:
            prefixes = [tokens[: round(fraction * len(tokens))] for tokens in outputs]
            texts = [written.text for written in teacher_completions(teacher, examples, prefixes, cfg)]
        scores[fraction] = compute_metrics([cfg.metric], texts, references)[cfg.metric]
    return scores


def diagnose(cfg: DiagnoseConfig) -> dict[str, Any]:
    """`distilgen diagnose`: the score per student-written share, for each student; table, JSON and plot."""
    out = writable_dir(cfg.output_dir)
    save_config(cfg, out / "config.yaml")
    examples = scored_split(cfg.data, cfg.split, cfg.limit)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = load_teacher(cfg.teacher, "fp32", device, cfg.data)
    results = {}
    for index, path in enumerate(progress_bar(cfg.students, desc="students", disable=len(cfg.students) < 2)):
        student = load_model(ModelConfig(path=path), key=f"students[{index}]", data=cfg.data)
        require_same_vocab(student.tokenizer, teacher.tokenizer, "diagnose", key="students")
        student.model.to(device)
        results[path] = prefix_scores(teacher, student, examples, cfg)
    report = {"metric": cfg.metric, "split": cfg.split, "examples": len(examples), "students": results}
    (out / "diagnose.json").write_text(json.dumps(report, indent=2))
    table = markdown(results, cfg.metric)
    (out / "diagnose.md").write_text(f"# Exposure bias on {cfg.split} ({len(examples)} examples)\n\n{table}")
    plot(results, cfg.metric, out / "diagnose.png")
    return {"table": table, **report, "output_dir": str(out)}


def markdown(results: dict[str, dict[float, float]], metric: str) -> str:
    fractions = sorted(next(iter(results.values())))
    header = ["student", *(f"{metric} @ {f:.0%} student" for f in fractions)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for path, scores in results.items():
        lines.append("| " + " | ".join([path, *(f"{scores[f]:.2f}" for f in fractions)]) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict[float, float]], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, scores in results.items():
        fractions = sorted(scores)
        ax.plot([100 * f for f in fractions], [scores[f] for f in fractions], marker="o", label=name)
    ax.set_xlabel("share of the output written by the student (%)")
    ax.set_ylabel(metric)
    ax.set_title("student prefix, teacher completion")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
