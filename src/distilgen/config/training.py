"""Configs of training: optimisation, checkpoints, the KD objectives, PTs and student PTs, cost measurement."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from distilgen.config.base import check
from distilgen.config.decoding import SPECS, DecodingSpec, GenerationSettings, get_spec

Precision = Literal["auto", "no", "bf16", "fp16"]
StaticCache = Literal["auto", "on", "off"]
"""Decoding with a static KV cache (compiled decoder step on a GPU); auto: on when the model is on a GPU where
the step compiles (Triton installed)."""


@dataclass
class TrainConfig:
    """Optimisation, evaluation during training, early stopping and checkpoints."""

    epochs: float = 10.0
    """Passes over the training data (fractions allowed); `max_steps` wins when set."""
    max_steps: int | None = None
    """Optimizer steps to train for; overrides epochs."""
    batch_size: int = 32
    """Examples per micro-batch on each process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 5e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and norms)."""
    warmup_ratio: float = 0.05
    """Fraction of the steps with a linear warm-up."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate decay after warm-up."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global norm."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""
    precision: Precision = "auto"
    """Mixed precision: auto = bf16 on a GPU that supports it, else full fp32."""
    eval_every: int = 200
    """Steps between dev evaluations (and checkpoints); 0 evaluates only at the end of each epoch."""
    metric: str = "bleu"
    """Dev metric for early stopping and the best checkpoint ('loss' avoids generation)."""
    patience: int = 5
    """Dev evaluations without improvement before stopping; 0 never stops early."""
    dev_limit: int | None = None
    """Evaluate on at most this many dev examples (faster evaluation)."""
    checkpoint_every: int = 0
    """Extra checkpoints between evaluations (steps); 0 checkpoints only at evaluations."""
    log_every: int = 10
    """Steps between loss lines in metrics.jsonl and the progress bar."""
    trackers: list[str] = field(default_factory=list)
    """Accelerate trackers to log to besides the JSONL log (e.g. tensorboard, wandb)."""
    max_bad_steps: int = 3
    """Consecutive steps with a non-finite loss or gradient that are skipped before training stops."""

    def __post_init__(self):
        check(self.epochs > 0, "epochs", f"must be > 0, got {self.epochs}")
        check(self.max_steps is None or self.max_steps > 0, "max_steps", f"must be > 0, got {self.max_steps}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.grad_accum >= 1, "grad_accum", f"must be >= 1, got {self.grad_accum}")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(0 <= self.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        check(self.max_grad_norm > 0, "max_grad_norm", f"must be > 0, got {self.max_grad_norm}")
        check(0 <= self.label_smoothing < 1, "label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        check(self.eval_every >= 0, "eval_every", f"must be >= 0, got {self.eval_every}")
        from distilgen.metrics import METRICS, MODEL_METRICS

        valid = sorted([*METRICS, *MODEL_METRICS, "loss"])
        check(self.metric in valid, "metric", f"unknown metric '{self.metric}'; choose one of: {', '.join(valid)}")
        check(self.patience >= 0, "patience", f"must be >= 0, got {self.patience}")
        check(self.dev_limit is None or self.dev_limit > 0, "dev_limit", f"must be > 0, got {self.dev_limit}")
        check(self.checkpoint_every >= 0, "checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        check(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        check(self.max_bad_steps >= 1, "max_bad_steps", f"must be >= 1, got {self.max_bad_steps}")


@dataclass
class CostConfig:
    """How the cost of a model is measured (latency at batch 1, throughput at batch N)."""

    enabled: bool = True
    """Measure cost at all (it takes extra generations)."""
    latency_examples: int = 32
    """The first N inputs of the split, each generated alone: the latency is their mean (outputs of the model's
    own lengths), and per token."""
    latency_runs: int = 3
    """Timed passes over those inputs; each input's time is its median over the passes."""
    throughput_batch: int = 32
    """Batch size of the throughput measurement."""
    throughput_examples: int = 128
    """Examples generated to measure throughput."""

    def __post_init__(self):
        check(self.latency_runs >= 1, "latency_runs", f"must be >= 1, got {self.latency_runs}")
        check(self.latency_examples >= 1, "latency_examples", f"must be >= 1, got {self.latency_examples}")
        check(self.throughput_batch >= 1, "throughput_batch", f"must be >= 1, got {self.throughput_batch}")
        check(self.throughput_examples >= 1, "throughput_examples", "must be >= 1")


@dataclass
class DenoiseConfig:
    """Denoising pre-training: each window of text is rebuilt from a noised copy (fresh noise every step)."""

    window: int = 64
    """Tokens per window (texts are cut into consecutive windows)."""
    rate: float = 0.3
    """Share of the source's tokens hit by noise (permute: share of tokens that start a new span)."""
    kind: Literal["mask", "drop", "permute"] = "drop"
    """drop: hit tokens are removed; mask: replaced by the mask (else unknown) token; permute: the source is
    cut into spans (mean length 1/rate) put in random order, so the model must find each next span by content."""
    source: Literal["window", "text"] = "window"
    """window: the model reads the noised window; text: it reads the whole noised text and writes one of its
    windows, so every source position is trained and the window must be found in a long input."""

    def __post_init__(self):
        check(self.window >= 4, "window", f"must be >= 4, got {self.window}")
        check(0.0 < self.rate < 1.0, "rate", f"must be in (0, 1), got {self.rate}")


@dataclass
class KDConfig:
    """Word-level KD: how student and teacher next-token distributions are compared."""

    divergence: str = "forward_kl"
    """forward_kl, reverse_kl, jsd, skew_kl, skew_reverse_kl or total_variation (see distilgen.objectives)."""
    temperature: float = 1.0
    """Softens both distributions; losses are scaled by temperature^2. Stored top-k holds the teacher at
    temperature 1 only: with PTs that carry it, another temperature needs use_stored_topk false."""
    beta: float = 0.5
    """jsd: m = beta p_T + (1 - beta) p_S, loss (1 - beta) KL(p_T||m) + beta KL(p_S||m); 0 is forward KL, 1 reverse
    KL. TRL's generalized_jsd_loss weights the two KLs the other way round: the same at 0, 0.5 and 1 only."""
    alpha: float = 0.1
    """skew_kl / skew_reverse_kl: share of the first distribution mixed into the second; 0 is the plain KL."""
    use_stored_topk: bool = True
    """On teacher PTs whose top-k log-probs are stored, use them (sparse KD over the top-k plus a tail bucket,
    with `divergence`; no teacher pass) instead of the live teacher. Student PTs always need the live teacher."""

    def __post_init__(self):
        from distilgen.objectives import DIVERGENCES

        check(self.divergence in DIVERGENCES, "divergence", f"choose one of: {', '.join(DIVERGENCES)}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(0 <= self.beta <= 1, "beta", f"must be in [0, 1], got {self.beta}")
        check(0 <= self.alpha <= 1, "alpha", f"must be in [0, 1], got {self.alpha}")


@dataclass
class PTConfig:
    """Teacher pseudo-targets for PT methods (seq_kd, logits_kd_pt, joint_teaching)."""

    store: str | None = None
    """PT store directory, shared across runs; default: output_dir/pts."""
    spec: str | DecodingSpec = "sample"
    """How the teacher generates them: a built-in spec (greedy, beam4, sample, sample_t15) or a mapping."""
    unlabeled: bool = True
    """PTs for the unlabeled inputs too (the study's best); false: labeled inputs only."""
    k: int | None = None
    """PTs cycled per input, a different one each epoch; default: all the spec generates (e.g. 4)."""
    include_gold: bool = True
    """Also train on the gold target of each labeled input, every epoch."""
    topk: int = 0
    """Store the teacher's top-k log-probs with new PTs (then kd.use_stored_topk skips the teacher pass)."""
    batch_size: int = 64
    """Sequences per teacher generate call."""
    static_cache: StaticCache = "auto"
    """Teacher decoding with a static KV cache, as `GenerateConfig.static_cache`."""

    def __post_init__(self):
        if isinstance(self.spec, str):
            check(self.spec in SPECS, "spec", f"unknown spec '{self.spec}'; built-in: {', '.join(SPECS)}, or a mapping")
        check(self.k is None or self.k >= 1, "k", f"must be >= 1, got {self.k}")
        if self.k is not None:
            spec = get_spec(self.spec) if isinstance(self.spec, str) else self.spec
            field = "num_samples" if spec.kind == "sample" else "num_return"
            check(
                self.k <= spec.num_per_input,
                "k",
                f"the spec makes {spec.num_per_input} PTs per input, fewer than k={self.k}; raise its {field} or "
                "lower k",
            )
        check(self.topk >= 0, "topk", f"must be >= 0, got {self.topk}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass
class StudentPTConfig:
    """Student PTs, sampled online by the current student (student_pt, joint_teaching)."""

    alpha: float = 0.5
    """Joint-Teaching: weight of teacher PTs; 1 - alpha goes to fresh student PTs (student_pt is alpha 0)."""
    mixing: Literal["steps", "batch"] = "steps"
    """steps: a fraction 1 - alpha of the optimizer steps train on student PTs, interleaved exactly (the
    study); batch: every step trains on both, weighted alpha and 1 - alpha."""
    top_p: float = 0.95
    """Nucleus sampling of the student."""
    temperature: float = 1.0
    """Sampling temperature of the student."""
    max_new_tokens: int = 64
    """Longest student PT."""
    refresh_every: int = 1
    """Staleness knob: sample the student PTs of this many student-PT steps at once, in one batched `decode`,
    by the student of the first of them (1: fresh every step, as in the study). Larger values keep a GPU busier
    during generation; the PTs of a window's later steps are up to refresh_every - 1 student steps old. A
    window stops at the end of an epoch, and a resumed run starts a new one."""
    static_cache: StaticCache = "auto"
    """Sample student PTs with a static KV cache, which on a GPU compiles the student's decoder step (sources
    padded to multiples of 64 tokens; ~19 s of compile per source bucket, once per run) and the seeded
    sampler: on an H100, Joint-Teaching trained 1.26x more samples/s with the compiled step alone (in
    `generate`'s loop). auto: on a GPU with Triton."""

    def __post_init__(self):
        check(0.0 <= self.alpha <= 1.0, "alpha", f"must be in [0, 1], got {self.alpha}")
        check(self.refresh_every >= 1, "refresh_every", f"must be >= 1, got {self.refresh_every}")
        self.settings()  # the range checks of the sampling settings, under the same keys

    def settings(self) -> GenerationSettings:
        """How the student samples its PTs (one per row; `distill.sample_student_pts` gives each row its seed)."""
        return GenerationSettings(
            "sample", max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p
        )


@dataclass
class NoiseConfig:
    """Noisy KD: noise in the teacher (dropout) and in the student's input (token masking or dropping)."""

    teacher_dropout: float = 0.1
    """Dropout rate the teacher runs with."""
    token_rate: float = 0.1
    """Share of the student's source tokens hit."""
    token_kind: Literal["mask", "drop"] = "drop"
    """mask: replace hit tokens by the tokenizer's mask (or unk) token; drop: remove them."""

    def __post_init__(self):
        check(0.0 <= self.teacher_dropout < 1.0, "teacher_dropout", f"must be in [0, 1), got {self.teacher_dropout}")
        check(0.0 <= self.token_rate < 1.0, "token_rate", f"must be in [0, 1), got {self.token_rate}")


@dataclass
class AttentionKDConfig:
    """Attention-relation KD (MiniLMv2) added to Logits KD."""

    weight: float = 1.0
    """Weight of the relation loss per token, next to the Logits KD term."""
    relation_heads: int = 4
    """Heads the q/k/v projections are re-split into (must divide both models' widths)."""
    which: Literal["encoder", "decoder"] = "encoder"
    """Which stack's last self-attention layer is matched (decoder-only models: decoder)."""

    def __post_init__(self):
        check(self.weight >= 0, "weight", f"must be >= 0, got {self.weight}")
        check(self.relation_heads >= 1, "relation_heads", f"must be >= 1, got {self.relation_heads}")
