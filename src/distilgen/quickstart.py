"""Quickstart: the main job on the built-in task, offline, on a CPU, in under 10 minutes.

    distilgen quickstart                       # writes runs/quickstart/
    distilgen quickstart teacher.hidden_size=192 task.train_size=1000

Trains a teacher and a much smaller student baseline on the same labeled data, has the teacher write
pseudo-targets for the labeled and unlabeled inputs, distils a student of the baseline's size with
Joint-Teaching, then evaluates the three on the test split and prints the side-by-side table of
quality and cost. Every stage resumes: rerunning the command skips what is done.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from distilgen.config import (
    BuiltinTaskConfig,
    CostConfig,
    DataConfig,
    DecodingConfig,
    DecodingSpec,
    DistillConfig,
    EvaluateConfig,
    FinetuneConfig,
    ModelConfig,
    PTConfig,
    StudentPTConfig,
    TeacherConfig,
    TrainConfig,
    check,
    save_config,
    writable_dir,
)

log = logging.getLogger(__name__)


@dataclass
class QuickstartConfig:
    """`distilgen quickstart`: teacher and student baseline on the built-in task, then a side-by-side report."""

    output_dir: str = "runs/quickstart"
    """Run directory: teacher/, student/ and report/ go under it."""
    task: BuiltinTaskConfig = field(
        default_factory=lambda: BuiltinTaskConfig(train_size=1000, unlabeled_size=4000, dev_size=100, test_size=200)
    )
    """The built-in task and its split sizes."""
    teacher: ModelConfig = field(
        default_factory=lambda: ModelConfig(
            arch="bart",
            hidden_size=128,
            encoder_layers=3,
            decoder_layers=3,
            num_heads=4,
            ffn_size=512,
            vocab_size=2000,
            max_positions=256,
        )
    )
    """The teacher, built from scratch."""
    student: ModelConfig = field(
        default_factory=lambda: ModelConfig(
            arch="bart",
            hidden_size=32,
            encoder_layers=1,
            decoder_layers=1,
            num_heads=4,
            ffn_size=128,
            vocab_size=2000,
            max_positions=256,
        )
    )
    """The student, built from scratch with the teacher's tokenizer (same vocabulary, for word-level KD)."""
    teacher_train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=6, batch_size=32, lr=1e-3, eval_every=0, metric="bleu")
    )
    """How the teacher is trained (dev BLEU after each epoch picks the best checkpoint)."""
    student_train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=6, batch_size=32, lr=2e-3, eval_every=0, metric="bleu")
    )
    """How the student baseline is trained."""
    pts: PTConfig = field(
        default_factory=lambda: PTConfig(
            spec=DecodingSpec("sample2", "sample", num_samples=2, max_new_tokens=48), batch_size=128
        )
    )
    """Teacher pseudo-targets: 2 samples for every labeled and unlabeled input."""
    student_pts: StudentPTConfig = field(default_factory=lambda: StudentPTConfig(max_new_tokens=48))
    """Joint-Teaching: half the steps on fresh student PTs (alpha 0.5), nucleus sampling 0.95."""
    distill_train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=2, batch_size=32, lr=2e-3, eval_every=0, metric="bleu")
    )
    """How the Joint-Teaching student is trained (each epoch: the gold targets plus one PT per input)."""
    decoding: DecodingConfig = field(default_factory=lambda: DecodingConfig(max_new_tokens=48, batch_size=64))
    """Decoding for dev and test evaluation."""
    cost: CostConfig = field(default_factory=lambda: CostConfig(throughput_examples=64))
    """How cost is measured in the final report."""
    seed: int = 0
    """Seed of model initialisation, dropout and data order."""

    def __post_init__(self):
        check(
            self.student.path is not None or self.student.tokenizer is None,
            "student.tokenizer",
            "the quickstart student shares the teacher's tokenizer; leave it empty",
        )


def _data(cfg: QuickstartConfig) -> DataConfig:
    return DataConfig(task=cfg.task, max_source_length=cfg.teacher.max_positions, max_target_length=64)


def quickstart(cfg: QuickstartConfig) -> dict[str, Any]:
    """Teacher -> student baseline -> teacher PTs -> Joint-Teaching student -> side-by-side evaluation."""
    from distilgen.distill import distill
    from distilgen.evaluate import evaluate
    from distilgen.train import finetune

    out = writable_dir(cfg.output_dir)
    save_config(cfg, out / "quickstart.yaml")
    data = _data(cfg)

    print("[1/5] fine-tuning the teacher")
    teacher = FinetuneConfig(str(out / "teacher"), data, cfg.teacher, cfg.teacher_train, cfg.decoding, seed=cfg.seed)
    finetune(teacher)

    print("[2/5] fine-tuning the student baseline")
    student_model = cfg.student
    if student_model.path is None:
        student_model = dataclasses.replace(student_model, tokenizer=str(out / "teacher" / "tokenizer"))
    student = FinetuneConfig(str(out / "student"), data, student_model, cfg.student_train, cfg.decoding, seed=cfg.seed)
    finetune(student)

    print("[3/5] teacher pseudo-targets for the labeled and unlabeled inputs, then [4/5] Joint-Teaching")
    jt = DistillConfig(
        output_dir=str(out / "joint_teaching"),
        data=data,
        teacher=TeacherConfig(path=str(out / "teacher" / "model")),
        student=student_model,
        method="joint_teaching",
        pts=dataclasses.replace(cfg.pts, store=str(out / "pts")),
        student_pts=cfg.student_pts,
        train=cfg.distill_train,
        decoding=cfg.decoding,
        seed=cfg.seed,
    )
    jt_model = distill(jt)["model"]

    print("[5/5] evaluating teacher, student baseline and Joint-Teaching student on the test split")
    result = evaluate(
        EvaluateConfig(
            output_dir=str(out / "report"),
            data=data,
            models=[str(out / "teacher" / "model"), str(out / "student" / "model"), jt_model],
            decoding=cfg.decoding,
            cost=cfg.cost,
            seed=cfg.seed,
        )
    )
    print()
    print(result["table"])
    print(f"artifacts: {out}/ (teacher/model, student/model, joint_teaching/, pts/, report/report.md)")
    (out / "summary.json").write_text(json.dumps({"table": result["table"]}, indent=2))
    return result
