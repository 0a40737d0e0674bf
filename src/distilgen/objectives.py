"""Objectives: pure functions of tensors returning one loss value per target token.

Masking and normalisation happen once, in `masked_sum`; the training loop divides by the number of
valid target tokens in the whole optimizer step (all micro-batches, all processes), so gradient
accumulation and data parallelism give exactly the loss of one big batch:

    per_token = logits_kd(student_logits, teacher_logits, mask, divergence="jsd", beta=0.5)  # (B, T)
    loss = masked_sum(per_token, mask) / step_tokens

Methods select objectives by name (`get_objective("logits_kd")`); `logits_kd` and `sparse_logits_kd`
select their divergence by name from `DIVERGENCES`.

[fp32 upcast note] Logits may arrive in bf16 under mixed precision; softmaxes and losses are
computed in fp32, because bf16 log-probabilities lose the small differences the losses are made of.
Float64 inputs (used by the tests' gradchecks) stay float64.

[chunked KD note] A (B, T, V) batch of 32k-vocabulary logits at 4k tokens is 512 MiB per fp32 copy,
and a naive KL keeps several alive until backward (both log-softmaxes, the elementwise terms, their
gradients). `logits_kd` and `sparse_logits_kd` instead visit only the valid (mask 1) positions,
`chunk_size` at a time, inside one autograd Function: each chunk's loss *and* its gradient with
respect to the student logits are computed in forward (a small autograd graph per chunk, freed at
once), and only the gradient is kept, in one (B, T, V) buffer of the student's dtype (fp32 for an
fp16 student, see [fp16 gradient note]) that backward scales by the incoming per-token gradient.
The student logits are not saved for backward. So the extra memory is that one buffer plus a few
(chunk_size, V) fp32 ones (backward's scaled copy is the student's gradient, which any
implementation returns), padding costs nothing, and the divergences stay plain functions of
log-probabilities with no hand-written gradients. Teacher inputs are constants: no gradient flows
to them. The per-token result is exactly 0 at masked positions.

[fp16 gradient note] Under fp16 mixed precision the loss is multiplied by a large scale (GradScaler)
so that small gradients survive fp16; the scale arrives with backward's incoming gradient. The
buffer above is computed in forward, before the scale, so in fp16 its small entries (1e-8 is common
for improbable tokens) would underflow to 0 and stay 0 once scaled. For an fp16 student it is
therefore computed and kept in fp32, and cast to fp16 only after scaling, as plain autograd does.
bf16 has fp32's exponent range and keeps the student's dtype.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from distilgen.registry import lookup, registrar

Objective = Callable[..., torch.Tensor]
OBJECTIVES: dict[str, Objective] = {}


register_objective = registrar(OBJECTIVES, "objective")
"""`@register_objective(name)` makes an objective selectable by `name` (see `get_objective`)."""


def get_objective(name: str) -> Objective:
    """The objective registered as `name`; an unknown name is an error listing the valid ones."""
    return lookup(OBJECTIVES, name, "objective")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32, or wider if `x` already is. See [fp32 upcast note]."""
    return torch.promote_types(x.dtype, torch.float32)


def _log_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    logits = logits.to(_compute_dtype(logits))
    return F.log_softmax(logits / temperature if temperature != 1 else logits, dim=-1)


@register_objective("cross_entropy")
def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Token-level negative log-likelihood of `targets`: -log softmax(logits)[target].

    Args:
        logits: (B, T, V) scores predicting each target token.
        targets: (B, T) token ids; values at padded positions are ignored by the caller's mask.
        label_smoothing: mass spread uniformly over the vocabulary, as in `F.cross_entropy`.

    Returns:
        (B, T) loss per token.
    """
    logits = logits.to(_compute_dtype(logits)).transpose(1, 2)  # (B, V, T)
    return F.cross_entropy(logits, targets, reduction="none", label_smoothing=label_smoothing)


def masked_sum(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of (B, T) per-token values over valid positions (mask 1); the caller divides by step tokens."""
    return (per_token * mask.to(per_token.dtype)).sum()


# ---------------------------------------------------------------------------------------------------
# Divergences: functions of (N, V) student and teacher log-probabilities -> (N,), p_S and p_T below.


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) over the last dim; terms with p_v = 0 count 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


def _log_mix(log_p: torch.Tensor, log_q: torch.Tensor, weight: float) -> torch.Tensor:
    """log(weight * p + (1 - weight) * q), in log space; exactly log q at weight 0 and log p at 1."""
    log_w = math.log(weight) if weight > 0 else -math.inf
    log_1mw = math.log1p(-weight) if weight < 1 else -math.inf
    return torch.logaddexp(log_p + log_w, log_q + log_1mw)


def forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(p_T || p_S) = sum p_T (log p_T - log p_S): mean-seeking, the classic word-level KD."""
    return _kl(teacher_logp, student_logp)


def reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(p_S || p_T) = sum p_S (log p_S - log p_T): mode-seeking."""
    return _kl(student_logp, teacher_logp)


def jsd(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence, interpolating forward KL (beta 0) and reverse KL (beta 1).

        m = beta * p_T + (1 - beta) * p_S
        JSD_beta = (1 - beta) * KL(p_T || m) + beta * KL(p_S || m)

    At beta = 0, m = p_S and JSD = KL(p_T || p_S) exactly; at beta = 1, m = p_T and JSD = KL(p_S || p_T);
    at beta = 0.5 it is the ordinary JSD. For 0 < beta < 1 it is finite however far apart the two are:
    m >= beta p_T and m >= (1 - beta) p_S bound it by (1 - beta) ln(1 / beta) + beta ln(1 / (1 - beta)).

    Note each KL's weight is the *other* distribution's weight in m; with equal weights (TRL's form,
    beta * KL(p_T || m) + (1 - beta) * KL(p_S || m)) both endpoints would be 0 and need special-casing.
    """
    log_m = _log_mix(teacher_logp, student_logp, beta)
    return (1 - beta) * _kl(teacher_logp, log_m) + beta * _kl(student_logp, log_m)


def skew_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """Skew KL: KL(p_T || alpha * p_T + (1 - alpha) * p_S); alpha = 0 is forward KL, and it stays finite."""
    return _kl(teacher_logp, _log_mix(teacher_logp, student_logp, alpha))


def skew_reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """Skew reverse KL: KL(p_S || alpha * p_S + (1 - alpha) * p_T); alpha = 0 is reverse KL."""
    return _kl(student_logp, _log_mix(student_logp, teacher_logp, alpha))


def total_variation(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Total variation distance: 0.5 * sum |p_T - p_S|, in [0, 1]."""
    return 0.5 * (teacher_logp.exp() - student_logp.exp()).abs().sum(-1)


DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "total_variation": total_variation,
}


def _divergence(name: str, beta: float, alpha: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`DIVERGENCES[name]` with its setting bound (beta for `jsd`, alpha for the skew KLs), as
    `(student_logp, teacher_logp) -> (N,)`; an unknown name lists the valid ones."""
    fn = lookup(DIVERGENCES, name, "divergence")
    if not 0 <= beta <= 1 or not 0 <= alpha <= 1:
        raise ValueError(f"need beta and alpha in [0, 1], got {beta}, {alpha}")
    settings = {"jsd": {"beta": beta}, "skew_kl": {"alpha": alpha}, "skew_reverse_kl": {"alpha": alpha}}
    return functools.partial(fn, **settings.get(name, {}))


# ---------------------------------------------------------------------------------------------------
# Word-level KD over the vocabulary, chunked. See [chunked KD note].


class _ChunkedPerToken(torch.autograd.Function):
    """per_token[b, t] = loss_fn(student_logits[b, t], *teacher[b, t]) at mask 1, else 0. See [chunked KD note]."""

    @staticmethod
    def forward(ctx, grad_enabled, loss_fn, chunk_size, mask, student_logits, *teacher):
        # needs_input_grad stays True under no_grad (e.g. dev loss); the caller's grad mode says whether to bother.
        needs_grad = grad_enabled and ctx.needs_input_grad[4]
        positions = mask.nonzero()  # (N, 2) valid (b, t); one host sync, so padding is never computed
        per_token = student_logits.new_zeros(mask.shape, dtype=_compute_dtype(student_logits))  # (B, T)
        grad_dtype = torch.float32 if student_logits.dtype == torch.float16 else student_logits.dtype
        grad = torch.zeros_like(student_logits, dtype=grad_dtype) if needs_grad else None  # (B, T, V)
        for chunk in positions.split(chunk_size or max(len(positions), 1)):  # (c, 2) each
            b, t = chunk.unbind(1)  # (c,), (c,)
            student = student_logits[b, t].to(grad_dtype).requires_grad_(needs_grad)  # (c, V); [fp16 gradient note]
            with torch.set_grad_enabled(needs_grad):
                loss = loss_fn(student, *(x[b, t] for x in teacher))  # (c,)
                if needs_grad:
                    grad[b, t] = torch.autograd.grad(loss.sum(), student)[0]  # rows are independent
            per_token[b, t] = loss.detach()
        ctx.num_teacher = len(teacher)
        ctx.student_dtype = student_logits.dtype
        ctx.save_for_backward(grad)
        return per_token

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_per_token):  # (B, T)
        (grad,) = ctx.saved_tensors  # (B, T, V); not scaled in place, so retain_graph / gradcheck work
        grad_student = (grad * grad_per_token.unsqueeze(-1).to(grad.dtype)).to(ctx.student_dtype)  # (B, T, V)
        return None, None, None, None, grad_student, *([None] * ctx.num_teacher)


def _check_positions(student_logits: torch.Tensor, mask: torch.Tensor, chunk_size: int | None) -> None:
    if student_logits.dim() != 3 or mask.shape != student_logits.shape[:2]:
        raise ValueError(
            f"expected (B, T, V) logits and a (B, T) mask, got {tuple(student_logits.shape)} and {tuple(mask.shape)}"
        )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of positions or None, got {chunk_size}")


@register_objective("logits_kd")
def logits_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    chunk_size: int | None = 128,
) -> torch.Tensor:
    """Logits KD: a divergence between teacher and student next-token distributions at every position.

        per_token[b, t] = temperature^2 * D(softmax(teacher[b, t] / temperature), softmax(student[b, t] / temperature))

    with D one of `DIVERGENCES` (forward KL by default). The temperature^2 factor keeps gradient
    magnitudes comparable across temperatures (Hinton et al., 2015).

    [padded vocabulary note] Checkpoints pad their embedding matrix to a multiple of 8-128 rows for
    fast matrix multiplies (T5: 32128 rows for a 32100-token tokenizer). With the same tokenizer, the
    teacher's extra rows are padding that no token maps to, so the teacher is sliced to the student's
    vocabulary. A student with *more* rows than the teacher cannot be matched that way (its extra ids
    have no teacher probability, or the tokenizers differ), and is an error.

    Args:
        student_logits: (B, T, V) student scores, any float dtype (bf16 is upcast, see [fp32 upcast note]).
        teacher_logits: (B, T, V_t) teacher scores for the same positions, V_t >= V; no gradient flows to them.
        mask: (B, T) 1 at valid target positions; only those are computed.
        divergence: a name in `DIVERGENCES`.
        temperature: softens both distributions (> 0).
        beta: `jsd` interpolation, 0 = forward KL, 1 = reverse KL.
        alpha: skew of `skew_kl` / `skew_reverse_kl`, 0 = the plain KL.
        chunk_size: valid positions computed at once (None: all); a chunk holds about 8 (chunk_size, V)
            fp32 temporaries, 128 MiB at 128 x 32k. See [chunked KD note].

    Returns:
        (B, T) loss per token (fp32, or float64 for float64 inputs), 0 at masked positions.
    """
    fn = _divergence(divergence, beta, alpha)
    _check_positions(student_logits, mask, chunk_size)
    vocab, teacher_vocab = student_logits.shape[-1], teacher_logits.shape[-1]
    if teacher_logits.shape[:2] != student_logits.shape[:2] or teacher_vocab < vocab:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} do not cover student logits {tuple(student_logits.shape)}: "
            "positions must match and the teacher's vocabulary must be at least the student's (same tokenizer; "
            "for different tokenizers use sparse_logits_kd on aligned tokens)"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    def per_token(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:  # (c, V), (c, V) -> (c,)
        return temperature**2 * fn(_log_softmax(student, temperature), _log_softmax(teacher, temperature))

    teacher_logits = teacher_logits[..., :vocab]  # (B, T, V) view; see [padded vocabulary note]
    grad_enabled = torch.is_grad_enabled()
    return _ChunkedPerToken.apply(grad_enabled, per_token, chunk_size, mask, student_logits, teacher_logits.detach())


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler, 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@register_objective("sparse_logits_kd")
def sparse_logits_kd(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    mask: torch.Tensor,
    tail: str = "bucket",
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    chunk_size: int | None = 128,
) -> torch.Tensor:
    """Logits KD against a teacher known only by its top-k tokens (a top-k cache, or an API's logprobs).

    With p_T the teacher's top-k probabilities and p_S the student's (at `temperature`):

    - "bucket" (default): the teacher mass outside the top-k, tail_T = 1 - sum p_T, becomes a (k+1)-th
      outcome matched against the student's mass outside those ids, tail_S. The divergence D (one of
      `DIVERGENCES`, as in `logits_kd`) is taken between the two distributions coarsened to these k + 1
      outcomes, (p_T, tail_T) and (p_S, tail_S); forward KL, the default, is
          sum_i p_T,i log(p_T,i / p_S,i) + tail_T log(tail_T / tail_S).
      So it stays a proper divergence and penalises a student that puts more mass outside the
      teacher's top-k than the teacher does. tail_S is summed over the non-top-k ids (no 1 - sum
      cancellation), plus k * tiny, and tail_T is at least tiny, so every divergence stays finite
      when the top-k covers the whole vocabulary (both tails then 0 up to rounding). Needs
      temperature 1: the teacher's tail mass at another temperature cannot be known from its top-k.
    - "renormalize": the teacher's top-k renormalised to sum to 1 (softmax of logprobs / temperature,
      exact for any temperature), against the student's log-probs gathered at those ids (not
      renormalised): sum_i q_i log(q_i / p_S,i) >= 0, which also pushes the student's other mass to 0.
      Only forward KL: the student's gathered log-probs are not a distribution, so the others are undefined.

    Both equal dense `logits_kd` with the same divergence when k = V. Scaled by temperature^2 like `logits_kd`.

    Args:
        student_logits: (B, T, V) student scores.
        teacher_topk_ids: (B, T, k) token ids in the student's vocabulary.
        teacher_topk_logprobs: (B, T, k) the teacher's log-probabilities of those ids over its full vocabulary;
            -inf marks an empty slot (a position with fewer than k candidates), which counts for nothing.
        mask: (B, T) 1 at valid target positions.
        tail: "bucket" or "renormalize".
        divergence: a name in `DIVERGENCES`; only "forward_kl" with tail="renormalize".
        temperature: > 0; only 1.0 with tail="bucket".
        beta: `jsd` interpolation, 0 = forward KL, 1 = reverse KL.
        alpha: skew of `skew_kl` / `skew_reverse_kl`, 0 = the plain KL.
        chunk_size: valid positions computed at once; see [chunked KD note].

    Returns:
        (B, T) loss per token, 0 at masked positions.
    """
    fn = _divergence(divergence, beta, alpha)
    _check_positions(student_logits, mask, chunk_size)
    if tail not in ("bucket", "renormalize"):
        raise ValueError(f"unknown tail {tail!r}; valid: bucket, renormalize")
    if tail == "renormalize" and divergence != "forward_kl":
        raise ValueError(f"tail='renormalize' supports only divergence 'forward_kl', got {divergence!r}")
    if temperature <= 0 or (tail == "bucket" and temperature != 1.0):
        raise ValueError(f"temperature must be > 0, and 1.0 with tail='bucket' (got {temperature})")
    if teacher_topk_ids.shape != teacher_topk_logprobs.shape or teacher_topk_ids.shape[:2] != mask.shape:
        raise ValueError(
            f"teacher top-k ids {tuple(teacher_topk_ids.shape)} and logprobs {tuple(teacher_topk_logprobs.shape)} "
            f"must both be (B, T, k) with (B, T) = {tuple(mask.shape)}"
        )

    def per_token(student: torch.Tensor, ids: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
        student_logp = _log_softmax(student, temperature)  # (c, V)
        student_top = student_logp.gather(-1, ids)  # (c, k)
        teacher_logp = teacher_logp.to(student_logp.dtype)  # (c, k)
        if tail == "renormalize":
            return temperature**2 * _kl(F.log_softmax(teacher_logp / temperature, dim=-1), student_top)
        floor = math.log(torch.finfo(student_logp.dtype).tiny)
        teacher_tail = _log1mexp(torch.logsumexp(teacher_logp, dim=-1).clamp_max(0))  # (c,) log(1 - sum p_T)
        student_tail = torch.logsumexp(student_logp.scatter(-1, ids, floor), dim=-1)  # (c,) log mass outside ids
        empty = teacher_logp == -math.inf  # slots that pad a position with fewer candidates: no mass on either side
        student_top, teacher_logp = student_top.masked_fill(empty, floor), teacher_logp.clamp_min(floor)
        return fn(
            torch.cat([student_top, student_tail[:, None]], -1),  # (c, k + 1)
            torch.cat([teacher_logp, teacher_tail.clamp_min(floor)[:, None]], -1),  # (c, k + 1)
        )

    ids, logprobs = teacher_topk_ids.long(), teacher_topk_logprobs.detach()
    return _ChunkedPerToken.apply(torch.is_grad_enabled(), per_token, chunk_size, mask, student_logits, ids, logprobs)


# ---------------------------------------------------------------------------------------------------
# Noisy KD: the student reads a noised input; the teacher reads the clean one with dropout on.


def _noisable(input_ids: torch.Tensor, mask: torch.Tensor, keep_ids: Sequence[int]) -> torch.Tensor:
    """(B, S) True at the tokens noise may touch: real tokens (mask 1) other than `keep_ids`."""
    special = torch.isin(input_ids, torch.as_tensor(list(keep_ids), dtype=input_ids.dtype, device=input_ids.device))
    return mask.bool() & ~special


def noise_tokens(
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    rate: float,
    mask_token_id: int | None = None,
    generator: torch.Generator | None = None,
    keep_ids: Sequence[int] = (),
    padding_side: str = "right",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise the student's input for Noisy KD: each valid token is hit with probability `rate`.

    Padding (mask 0) and the special tokens in `keep_ids` (BOS, EOS, separators) are never hit.
    With `mask_token_id`, hit tokens are replaced by it and the mask is unchanged. With None, hit
    tokens are dropped: removed, and the kept tokens closed up toward the row's content side
    (leftward for right padding; rightward for left padding, so a decoder-only prompt still ends
    where its target begins). The freed slots get mask 0, like padding; their ids are the dropped
    tokens, which a model never sees through the mask.

    The other half of Noisy KD is the teacher: the method runs it on the clean input with dropout on
    (issue 5). The loss is `logits_kd` between the two.

    Args:
        input_ids: (B, S) token ids.
        mask: (B, S) 1 at real tokens, 0 at padding.
        rate: probability in [0, 1] that a valid token is hit.
        mask_token_id: the replacement token, or None to drop.
        generator: for reproducible noise (on the ids' device).
        keep_ids: token ids never noised.
        padding_side: "right" or "left", as the tokenizer padded the batch.

    Returns:
        (input_ids, mask), both (B, S).
    """
    if not 0 <= rate <= 1 or padding_side not in ("right", "left"):
        raise ValueError(f"need rate in [0, 1] and padding_side 'right' or 'left', got {rate}, {padding_side!r}")
    valid = mask.bool()  # (B, S)
    noise = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)  # (B, S)
    hit = _noisable(input_ids, mask, keep_ids) & (noise < rate)
    if mask_token_id is not None:
        return input_ids.masked_fill(hit, mask_token_id), mask
    kept = valid & ~hit
    # A stable sort on "is freed" (right padding) or "is kept" (left padding) closes up the kept tokens in order.
    key = (~kept if padding_side == "right" else kept).to(torch.uint8)
    order = torch.sort(key, dim=1, stable=True).indices  # (B, S)
    return input_ids.gather(1, order), kept.gather(1, order).to(mask.dtype)


def permute_spans(
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    rate: float,
    generator: torch.Generator | None = None,
    keep_ids: Sequence[int] = (),
) -> torch.Tensor:
    """Cut each row's valid tokens into spans and shuffle the spans (BART's permutation noise, at span level).

    A new span starts before each valid token with probability `rate` (mean span length 1/rate); the
    spans then take a random order, each keeping its tokens in order. Padding and `keep_ids` stay
    where they are. Rebuilding the text from such a source cannot be done by reading it position by
    position: the model has to find where the text goes on by content, the skill that copying names
    out of a long input needs.

    Returns:
        (B, S) token ids; the mask is unchanged.
    """
    if not 0 <= rate <= 1:
        raise ValueError(f"need rate in [0, 1], got {rate}")
    content = _noisable(input_ids, mask, keep_ids)  # (B, S)
    starts = content & (torch.rand(input_ids.shape, generator=generator, device=input_ids.device) < rate)
    span = starts.long().cumsum(1)  # (B, S) span number of each position
    span_key = torch.rand(input_ids.shape[0], input_ids.shape[1] + 1, generator=generator, device=input_ids.device)
    key = torch.where(content, span_key.gather(1, span), 2.0)  # other positions sort last, in order
    taken = torch.sort(key, dim=1, stable=True).indices  # content positions in shuffled span order, then the rest
    slots = torch.sort((~content).to(torch.uint8), dim=1, stable=True).indices  # content positions in order, then rest
    return input_ids.scatter(1, slots, input_ids.gather(1, taken))


DROPOUT_ATTRIBUTES = ("dropout", "attention_dropout", "activation_dropout", "dropout_rate")
"""Float attributes through which `transformers` layers apply functional dropout (BART-style)."""


@contextlib.contextmanager
def dropout_at(model: torch.nn.Module, rate: float) -> Iterator[torch.nn.Module]:
    """Run `model` in train mode with every dropout at `rate`, then restore its rates and mode.

    Noisy KD's teacher side: the teacher's output distribution under dropout noise. Covers both
    `nn.Dropout` modules (GPT-2, T5) and the float rates of functional dropout (BART).
    """
    if not 0 <= rate < 1:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    saved = []
    for module in model.modules():
        names = ("p",) if isinstance(module, torch.nn.Dropout) else DROPOUT_ATTRIBUTES
        for name in names:
            value = getattr(module, name, None)
            if isinstance(value, float):
                saved.append((module, name, value))
                setattr(module, name, rate)
    was_training = model.training
    model.train()
    try:
        yield model
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
        model.train(was_training)


# ---------------------------------------------------------------------------------------------------
# Attention-Relation KD (MiniLM / MiniLMv2).

RELATIONS = ("qq", "kk", "vv")  # MiniLMv2's self-relations; "qk" is the attention distribution (MiniLM)


def _log_relation(
    x: torch.Tensor, y: torch.Tensor, heads: int, key_mask: torch.Tensor
) -> torch.Tensor:  # (B, S, H) x2 -> (B, R, S, S)
    """log softmax(X Y^T / sqrt(d)) per relation head, X and Y re-split into `heads` heads of size d."""
    batch, length, hidden = x.shape
    if hidden % heads:
        raise ValueError(f"hidden size {hidden} is not divisible by relation_heads={heads}")
    d = hidden // heads
    x, y = (z.to(_compute_dtype(z)).unflatten(-1, (heads, d)).transpose(1, 2) for z in (x, y))  # (B, R, S, d)
    scores = x @ y.transpose(-1, -2) / math.sqrt(d)  # (B, R, S, S)
    # finfo.min rather than -inf: a row with no valid key becomes uniform (then KL 0), not NaN.
    return F.log_softmax(scores.masked_fill(~key_mask, torch.finfo(scores.dtype).min), dim=-1)


@register_objective("attention_relation_kd")
def attention_relation_kd(
    student_q: torch.Tensor,
    student_k: torch.Tensor,
    student_v: torch.Tensor,
    teacher_q: torch.Tensor,
    teacher_k: torch.Tensor,
    teacher_v: torch.Tensor,
    mask: torch.Tensor,
    relation_heads: int,
    relations: Sequence[str] = RELATIONS,
    causal: bool = False,
) -> torch.Tensor:
    """Attention-Relation KD: match the teacher's last-layer self-relations (MiniLMv2, Wang et al., 2021).

    For each relation "xy" (x, y in q, k, v) and relation head a, with the (B, S, H) projections
    re-split into `relation_heads` heads of size d = H / relation_heads:

        R_xy,a = softmax(X_a Y_a^T / sqrt(d))                                   (B, S, S)
        per_token[b, s] = mean over relations and heads of KL(R^T_xy,a[b, s] || R^S_xy,a[b, s])

    Re-splitting into a shared number of relation heads lets teacher and student differ in hidden
    size and head count. The default is MiniLMv2's Q-Q, K-K, V-V; ("qk", "vv") is MiniLM's attention
    distribution plus value relation. MiniLMv2 sums the relation kinds; the mean here only rescales
    (the method's loss weight absorbs it). Capture the inputs with `capture_qkv`.

    Args:
        student_q, student_k, student_v: (B, S, H_s) the student's last-layer query/key/value projections.
        teacher_q, teacher_k, teacher_v: (B, S, H_t) the teacher's, same positions; no gradient is needed.
        mask: (B, S) 1 at real tokens; padded keys get no relation mass, padded queries loss 0.
        relation_heads: number of heads both sides are re-split into; divides H_s and H_t.
        relations: relation kinds among "qq", "kk", "vv", "qk", ...
        causal: also hide keys after the query (decoder self-attention).

    Returns:
        (B, S) loss per position.
    """
    if not relations or any(len(r) != 2 or set(r) - set("qkv") for r in relations):
        raise ValueError(f"relations must be pairs of q, k, v such as 'qq' or 'qk', got {relations!r}")
    student = {"q": student_q, "k": student_k, "v": student_v}
    teacher = {"q": teacher_q, "k": teacher_k, "v": teacher_v}
    length = mask.shape[1]
    key_mask = mask.bool()[:, None, None, :]  # (B, 1, 1, S)
    if causal:
        key_mask = key_mask & torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    total = 0.0
    for x, y in relations:
        teacher_rel = _log_relation(teacher[x].detach(), teacher[y].detach(), relation_heads, key_mask)
        student_rel = _log_relation(student[x], student[y], relation_heads, key_mask)
        total = total + _kl(teacher_rel, student_rel).mean(1)  # (B, S), mean over relation heads
    return total / len(relations) * mask.to(total.dtype)


def _last_self_attention_projections(model: torch.nn.Module, which: str) -> dict[str, torch.nn.Module] | None:
    """The q, k, v projection modules of the last self-attention layer of `which` stack (GPT-2: the fused
    "qkv" one), or None for an unsupported model."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    base = getattr(model, "base_model", model)
    stack = getattr(base, which, None) if which in ("encoder", "decoder") else None
    if model_type == "bart" and stack is not None:
        attention = stack.layers[-1].self_attn
        return {"q": attention.q_proj, "k": attention.k_proj, "v": attention.v_proj}
    if model_type == "t5" and stack is not None:
        attention = stack.block[-1].layer[0].SelfAttention
        return {"q": attention.q, "k": attention.k, "v": attention.v}
    if model_type == "gpt2" and which == "decoder":
        return {"qkv": base.h[-1].attn.c_attn}
    layers = getattr(base, "layers", None)  # the modern decoder-only families: Llama, Qwen, Mistral, Gemma, Phi-3
    if which == "decoder" and isinstance(layers, torch.nn.ModuleList) and hasattr(layers[-1], "self_attn"):
        attention = layers[-1].self_attn
        if hasattr(attention, "qkv_proj"):  # Phi-3's fused projection: q, then k and v of the key/value heads
            return {"qkv": attention.qkv_proj}
        if all(hasattr(attention, f"{x}_proj") for x in "qkv"):
            return {"q": attention.q_proj, "k": attention.k_proj, "v": attention.v_proj}
    return None


@contextlib.contextmanager
def capture_qkv(model: torch.nn.Module, which: str = "decoder") -> Iterator[dict[str, torch.Tensor]]:
    """Capture the last self-attention layer's q, k, v projections (each (B, S, H)) on every forward.

        with capture_qkv(student, "encoder") as s, capture_qkv(teacher, "encoder") as t:
            student(**batch); teacher(**batch)
        per_token = attention_relation_kd(s["q"], s["k"], s["v"], t["q"], t["k"], t["v"], mask, 8)

    For a decoder, pass `causal=True` to `attention_relation_kd`, so relations match what it attends to.

    The dict holds the latest forward's outputs, graph included (so the student's loss backpropagates).
    Use it on full teacher-forced passes: during cached generation a decoder sees one new token per call.

    Args:
        model: a `transformers` BART, T5, GPT-2 or modern decoder-only (Llama, Qwen, Mistral, Gemma, Phi-3) model
            (the LM-head class or the base model); with grouped-query attention k and v are narrower than q.
        which: "encoder" or "decoder" (decoder-only models have only "decoder").
    """
    modules = _last_self_attention_projections(model, which)
    if modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(
            f"capture_qkv does not support model_type {model_type!r} with which={which!r}; supported: "
            "bart and t5 (encoder, decoder); gpt2, llama, qwen2/3, mistral, gemma2/3, phi3 (decoder)"
        )
    captured: dict[str, torch.Tensor] = {}
    config = getattr(model, "config", None)
    heads, kv_heads = getattr(config, "num_attention_heads", 1), getattr(config, "num_key_value_heads", None)

    def hook(name: str):
        def store(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            if name == "qkv":  # a fused projection: GPT-2's (B, S, 3H); Phi-3's q (H) then k and v (H * kv / heads)
                width = output.shape[-1]
                kv = width // 3 if kv_heads is None else width * kv_heads // (heads + 2 * kv_heads)
                captured.update(zip("qkv", output.split([width - 2 * kv, kv, kv], dim=-1), strict=True))
            else:
                captured[name] = output

        return store

    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
