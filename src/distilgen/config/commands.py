"""The config of each command (`cli.COMMANDS`): what the command reads, from the concerns' configs."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from distilgen.config.base import ConfigError, _merge, check, check_path, from_dict
from distilgen.config.decoding import SPECS, DecodingConfig, DecodingSpec
from distilgen.config.sources import DataConfig, ModelConfig, TeacherConfig, as_teacher, check_model_path
from distilgen.config.training import (
    AttentionKDConfig,
    CostConfig,
    DenoiseConfig,
    KDConfig,
    NoiseConfig,
    PTConfig,
    StaticCache,
    StudentPTConfig,
    TrainConfig,
)


@dataclass
class InspectConfig:
    """`distilgen inspect MODEL`: parameters, FLOPs, latency and throughput of a model (or of a shrunk copy)."""

    model: str
    """Model directory or hub id."""
    shrink: str | int | None = None
    """Report on a copy keeping these layers (E:D or D, see model.shrink) instead of the model itself."""
    save: str | None = None
    """Write the (shrunk) model and its tokenizer to this directory."""
    input_length: int = 128
    """Source tokens of the timed inputs (random token ids)."""
    output_length: int = 32
    """Generated tokens per timed output (exactly this many: EOS is ignored)."""
    batch_size: int = 32
    """Batch size of the throughput measurement."""
    latency_runs: int = 10
    """Single-example generations whose median is the latency."""
    seed: int = 0
    """Seed of the random inputs."""

    def __post_init__(self):
        self.shrink = None if self.shrink is None else str(self.shrink)
        for key in ("input_length", "output_length", "batch_size", "latency_runs"):
            check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")


@dataclass
class FinetuneConfig:
    """`distilgen finetune`: train a model on labeled data (teachers and the student baseline)."""

    output_dir: str
    """Run directory: checkpoints, logs and the final model (`output_dir/model`)."""
    data: DataConfig
    """The splits: train (required), unlabeled (for the tokenizer), dev (early stopping)."""
    model: ModelConfig
    """The model to train."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, evaluation and checkpoints."""
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    """Decoding for dev evaluation."""
    objective: Literal["target", "denoise"] = "target"
    """target: learn source -> target on the labeled data. denoise: domain-adaptive pre-training on the task's
    text without labels (sources of train and unlabeled): rebuild windows of text from a copy with tokens
    dropped or masked, as in BART; fine-tune the result with `model.path` afterwards."""
    denoise: DenoiseConfig = field(default_factory=lambda: DenoiseConfig())
    """Settings of objective=denoise."""
    seed: int = 0
    """Seed of model initialisation, dropout and data order."""

    def __post_init__(self):
        check(
            self.objective != "denoise" or self.train.metric in ("loss", "perplexity"),
            "train.metric",
            "denoising is early-stopped on dev loss or perplexity (its outputs are text windows); set loss",
        )


@dataclass
class EvaluateConfig:
    """`distilgen evaluate`: score one or several models side by side on a split."""

    output_dir: str
    """Where report.json, report.md and generations/ go."""
    data: DataConfig
    """The split to score comes from here."""
    models: list[str]
    """Model directories (or hub ids) to compare, the first being the reference (e.g. the teacher)."""
    split: Literal["dev", "test"] = "test"
    """Which labeled split to score."""
    metrics: list[str] = field(default_factory=lambda: ["bleu", "rouge", "chrf", "exact_match", "perplexity"])
    """Text metrics (see distilgen.metrics) and `perplexity` of the gold targets."""
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    """How every model generates."""
    cost: CostConfig = field(default_factory=CostConfig)
    """How cost (latency, throughput, memory) is measured."""
    limit: int | None = None
    """Score at most this many examples."""
    seed: int = 0
    """Seed for sampling decoders."""

    def __post_init__(self):
        from distilgen.metrics import METRICS, MODEL_METRICS

        check(len(self.models) >= 1, "models", "name at least one model directory or hub id")
        for i, path in enumerate(self.models):
            check_model_path(path, f"models[{i}]")
        valid = sorted([*METRICS, *MODEL_METRICS])
        for metric in self.metrics:
            check(metric in valid, "metrics", f"unknown metric '{metric}'; choose from: {', '.join(valid)}")
        check(self.limit is None or self.limit > 0, "limit", f"must be > 0, got {self.limit}")


@dataclass
class GenerateConfig:
    """`distilgen generate`: the teacher's pseudo-targets for the labeled and unlabeled inputs, into a PT store.

    Under `accelerate launch` each process generates a disjoint share; all write into the one store.
    """

    store: str
    """Directory of the PT store (created if missing); shared by every spec and teacher."""
    data: DataConfig
    """The inputs: the splits named in `splits` (the template and max_source_length apply)."""
    teacher: TeacherConfig
    """The teacher: `path` to a trained model (its fingerprint keys the store)."""
    spec: str | DecodingSpec = "sample"
    """A built-in spec (greedy, beam4, sample, sample_t15) or a mapping of spec fields
    ({name: mine, kind: sample, num_samples: 8, top_p: 0.95})."""
    splits: list[Literal["train", "unlabeled", "dev", "test"]] = field(default_factory=lambda: ["train", "unlabeled"])
    """Splits whose inputs get PTs (the study: labeled + unlabeled)."""
    batch_size: int = 64
    """Sequences generated together (a sampled input's K samples are K sequences)."""
    topk: int = 0
    """Also store the teacher's top-k token ids and log-probs at every PT token (for sparse Logits KD without
    the teacher); 0 stores texts and tokens only. Taken from the decoding steps where a PT is what was decoded,
    else from a teacher-forced pass (beams, outputs cut at max_new_tokens)."""
    shard_size: int = 2048
    """PTs per store shard at most..."""
    flush_seconds: float = 60.0
    """...or fewer, written this long after the last shard (a slow teacher): together, the most a crash loses."""
    static_cache: StaticCache = "auto"
    """Decode with a static KV cache (greedy and sampling specs): on a GPU the decoder step is then compiled
    into CUDA graphs (transformers' compiled call), about 2x faster per batch after a compile of ~10 s per
    source-length bucket (sources are padded to multiples of 64 tokens), and the seeded sampler is compiled
    with it. auto: on when the teacher is on a GPU with Triton; off suits short jobs."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Teacher weights during generation; auto is bf16 on a GPU that supports it, fp32 elsewhere. Part of the
    teacher fingerprint (bf16 and fp32 PTs are stored apart)."""
    limit: int | None = None
    """Use at most this many inputs per split."""
    batch: Literal["off", "write", "read"] = "off"
    """An api teacher through the OpenAI Batch API (cheaper, answered within a day): write the requests of the PTs
    the store lacks to `batch_file` (the Batch API's input JSONL), or read the Batch API's output JSONL from it into
    the store. off: ask the endpoint now."""
    batch_file: str | None = None
    """The JSONL file `batch` writes or reads."""

    def __post_init__(self):
        if isinstance(self.spec, str):
            check(self.spec in SPECS, "spec", f"unknown spec '{self.spec}'; built-in: {', '.join(SPECS)}, or a mapping")
        self.teacher = as_teacher(self.teacher)
        self.teacher.require_trained()
        self.teacher.require(frozenset({"text", "topk"} if self.topk else {"text"}), "generate")
        check(len(self.splits) >= 1, "splits", "name at least one split")
        check(self.flush_seconds >= 0, "flush_seconds", f"must be >= 0, got {self.flush_seconds}")
        for key in ("batch_size", "shard_size"):
            check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        check(self.topk >= 0, "topk", f"must be >= 0, got {self.topk}")
        check(self.limit is None or self.limit > 0, "limit", f"must be > 0, got {self.limit}")
        check(self.batch in ("off", "write", "read"), "batch", f"must be off, write or read, got {self.batch!r}")
        check(self.batch != "off" or self.batch_file is None, "batch_file", "is read or written with batch: write|read")
        if self.batch != "off":
            check(not self.teacher.local, "batch", "Batch API files are for an api teacher (teacher.kind: api)")
            check(self.batch_file is not None, "batch_file", f"batch: {self.batch} needs the JSONL file")
        if self.batch == "read":
            check_path(os.path.isfile(self.batch_file), "batch_file", f"file not found: {self.batch_file}")


@dataclass
class DistillConfig:
    """`distilgen distill`: train a student from a teacher with one method of the study."""

    output_dir: str
    """Run directory: the method's stage (distill/), the final fine-tuning stage (finetune/), summary.json."""
    data: DataConfig
    """train (labeled), unlabeled, dev (early stopping)."""
    teacher: TeacherConfig
    """The trained teacher (`path`); never updated."""
    student: ModelConfig
    """The student: a shrunk teacher (path + shrink), another checkpoint, or built from `arch`."""
    method: str = "joint_teaching"
    """finetune, logits_kd, noisy_kd, attention_kd, seq_kd, logits_kd_pt, student_pt or joint_teaching."""
    kd: KDConfig = field(default_factory=KDConfig)
    """Word-level KD settings."""
    pts: PTConfig = field(default_factory=PTConfig)
    """Teacher PTs (PT methods)."""
    student_pts: StudentPTConfig = field(default_factory=StudentPTConfig)
    """Student PTs and Joint-Teaching's mixing."""
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    """Noisy KD settings."""
    attention: AttentionKDConfig = field(default_factory=AttentionKDConfig)
    """Attention-relation KD settings."""
    final_finetune_epochs: float = 1.0
    """Epochs of plain fine-tuning on the labeled data after the method (the study's final stage); 0 skips."""
    equal_budget: bool = False
    """The `finetune` method runs the final fine-tuning stage too (a second one, on the same gold data), so that it
    trains for as many steps as the other methods: a baseline that is not behind only for training less."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, dev evaluation and checkpoints (both stages)."""
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    """Decoding for dev evaluation."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Teacher weights (generation and KD passes); auto: bf16 on a GPU that supports it."""
    seed: int = 0
    """Seed of student initialisation, dropout, data order and student PT sampling."""

    def __post_init__(self):
        # What depends on the method (its name, what it needs of the teacher) is checked by `distill.check_method`
        # when the command starts, before anything loads: methods live with their code, and configs import none.
        self.teacher = as_teacher(self.teacher)
        self.teacher.require_trained()
        check(self.final_finetune_epochs >= 0, "final_finetune_epochs", "must be >= 0")


@dataclass
class StudyVariant:
    """One extra run of a study: a method with some settings changed."""

    name: str
    """Its name in the report, e.g. logits_kd_pt_labeled_only."""
    method: str
    """The distillation method."""
    set: dict[str, Any] = field(default_factory=dict)
    """Settings of this run only, as in a distill config, e.g. {pts: {unlabeled: false}}."""


@dataclass
class StudyConfig:
    """`distilgen study`: several methods (and seeds) on one task with a shared teacher, student init and PT
    store; a report of test scores, the fraction of the teacher-student gap closed, cost and a plot."""

    output_dir: str
    """Study directory: one run directory per seed and method, pts/, report.md, report.json, study.png."""
    data: DataConfig
    """The task's splits."""
    teacher: TeacherConfig
    """The trained teacher (`path`)."""
    student: ModelConfig
    """The student every method starts from (same init for the same seed)."""
    methods: list[str] = field(
        default_factory=lambda: ["finetune", "logits_kd", "seq_kd", "logits_kd_pt", "joint_teaching"]
    )
    """Methods run with the common settings; `finetune` is the baseline the gap is measured from."""
    variants: list[StudyVariant] = field(default_factory=list)
    """Extra runs with their own settings (e.g. PTs for labeled inputs only)."""
    common: dict[str, Any] = field(default_factory=dict)
    """Settings of every run, as in a distill config: train, kd, pts, student_pts, final_finetune_epochs..."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Every run is repeated per seed; the report gives mean and standard deviation."""
    split: Literal["dev", "test"] = "test"
    """Split of the final scores."""
    metrics: list[str] = field(default_factory=lambda: ["bleu", "rouge", "chrf", "exact_match"])
    """Text metrics of the report; the gap closed is reported for each."""
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    """How every model generates for the report."""
    cost: CostConfig = field(default_factory=CostConfig)
    """How cost is measured (once per model of seed 0)."""

    def __post_init__(self):
        check(len(self.seeds) >= 1, "seeds", "give at least one seed")
        names = [*self.methods, *(v.name for v in self.variants)]
        check(len(set(names)) == len(names), "variants", f"run names must be unique, got {names}")
        for key in ("output_dir", "data", "teacher", "student", "method", "seed"):
            check(key not in self.common, f"common.{key}", "set by the study itself; remove it")
        self.teacher = as_teacher(self.teacher)
        check(
            self.teacher.local or "perplexity" not in self.metrics,
            "metrics",
            "perplexity needs the teacher's distributions; an api teacher gives its answers only",
        )
        self.run_configs()  # every run's settings are checked now, before anything trains

    def run_configs(self) -> list[tuple[str, int, DistillConfig]]:
        """(run name, seed, its distill config) for every run of the study."""
        runs = [(m, m, {}) for m in self.methods] + [(v.name, v.method, v.set) for v in self.variants]
        out = []
        for seed in self.seeds:
            for name, method, own in runs:
                shared = _merge({"pts": {"store": str(Path(self.output_dir) / "pts")}}, self.common)
                data = _merge(
                    shared,
                    {
                        **own,
                        "output_dir": str(Path(self.output_dir) / f"seed{seed}" / name),
                        "data": dataclasses.asdict(self.data),
                        "teacher": dataclasses.asdict(self.teacher),
                        "student": dataclasses.asdict(self.student),
                        "method": method,
                        "seed": seed,
                    },
                )
                where = "common" if not own else f"variants.{name}"
                try:
                    out.append((name, seed, from_dict(DistillConfig, data)))
                except ConfigError as err:
                    raise err.under(where) from None
        return out


@dataclass
class DiagnoseConfig:
    """`distilgen diagnose`: the exposure-bias check. The student writes the first X% of each output and the
    teacher completes it; the score per X shows how much the student's own prefixes hurt."""

    output_dir: str
    """Where diagnose.json, diagnose.md and diagnose.png go."""
    data: DataConfig
    """The split to score comes from here."""
    teacher: TeacherConfig
    """The teacher that completes the outputs (`path`)."""
    students: list[str]
    """Student model directories (e.g. checkpoints of one run, in training order)."""
    fractions: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """Shares of the student's output kept as the prefix (0: the teacher alone; 1: the student alone)."""
    split: Literal["dev", "test"] = "test"
    """Which labeled split to score."""
    metric: str = "bleu"
    """Text metric of the table."""
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    """Greedy or beam settings of both models."""
    limit: int | None = None
    """Score at most this many examples."""

    def __post_init__(self):
        from distilgen.metrics import METRICS

        self.teacher = as_teacher(self.teacher)
        self.teacher.require_trained()
        self.teacher.require(frozenset({"logits"}), "diagnose (the teacher completes the student's prefixes)")
        check(len(self.students) >= 1, "students", "name at least one student directory")
        for i, path in enumerate(self.students):
            check_model_path(path, f"students[{i}]")
        check(all(0.0 <= f <= 1.0 for f in self.fractions), "fractions", "every fraction must be in [0, 1]")
        check(self.metric in METRICS, "metric", f"choose one of: {', '.join(sorted(METRICS))}")
        check(self.limit is None or self.limit > 0, "limit", f"must be > 0, got {self.limit}")
