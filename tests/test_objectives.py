"""Objectives as properties: zero for identical inputs, agreement with `F.kl_div`, exact endpoints, masking,
chunking, vocabulary padding, precision, gradients, and the hooks that feed Attention-Relation KD."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    T5Config,
    T5ForConditionalGeneration,
)

from distilgen.objectives import (
    DIVERGENCES,
    OBJECTIVES,
    attention_relation_kd,
    capture_qkv,
    cross_entropy,
    get_objective,
    logits_kd,
    masked_sum,
    noise_tokens,
    permute_spans,
    sparse_logits_kd,
)

B, T, V = 3, 5, 11


def logits(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    return logits(B, T, V, seed=0) * 2, logits(B, T, V, seed=1) * 2  # student, teacher


@pytest.fixture
def mask() -> torch.Tensor:
    return torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])


def reference_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position, by `F.kl_div` (whose input is log q and target log p)."""
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)


def probs_logits(*rows: list[float]) -> torch.Tensor:
    """(1, len(rows), V) logits whose softmax is exactly the given probability rows."""
    return torch.tensor(rows, dtype=torch.float64).log()[None]


# --- registry -----------------------------------------------------------------------------------------


def test_every_objective_is_registered_by_name():
    assert {"cross_entropy", "logits_kd", "sparse_logits_kd", "attention_relation_kd"} <= set(OBJECTIVES)
    assert get_objective("logits_kd") is logits_kd and get_objective("cross_entropy") is cross_entropy


def test_unknown_objective_or_divergence_names_the_valid_ones(pair, mask):
    with pytest.raises(ValueError, match="unknown objective 'kd'; choose one of: .*logits_kd"):
        get_objective("kd")
    with pytest.raises(ValueError, match="unknown divergence 'kl'; choose one of: .*forward_kl.*jsd"):
        logits_kd(*pair, mask, divergence="kl")


# --- logits KD: the divergences -----------------------------------------------------------------------


@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
def test_every_divergence_is_zero_for_identical_logits(divergence, pair, mask):
    student, _ = pair
    per_token = logits_kd(student, student.clone(), mask, divergence, beta=0.3, alpha=0.2, temperature=1.5)
    torch.testing.assert_close(per_token, torch.zeros(B, T, dtype=torch.float64), atol=1e-12, rtol=0)


def test_forward_kl_is_kl_of_teacher_to_student_as_torch_computes_it(pair, mask):
    student, teacher = pair
    expected = reference_kl(F.log_softmax(teacher, -1), F.log_softmax(student, -1)) * mask
    torch.testing.assert_close(logits_kd(student, teacher, mask), expected, atol=1e-10, rtol=1e-10)


def test_reverse_kl_is_kl_of_student_to_teacher(pair, mask):
    student, teacher = pair
    expected = reference_kl(F.log_softmax(student, -1), F.log_softmax(teacher, -1)) * mask
    torch.testing.assert_close(logits_kd(student, teacher, mask, "reverse_kl"), expected, atol=1e-10, rtol=1e-10)


def test_jsd_at_beta_zero_is_forward_kl_and_at_beta_one_reverse_kl(pair, mask):
    student, teacher = pair
    for beta, direction in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        torch.testing.assert_close(
            logits_kd(student, teacher, mask, "jsd", beta=beta), logits_kd(student, teacher, mask, direction)
        )


def test_jsd_at_beta_half_is_the_ordinary_jensen_shannon_divergence(pair, mask):
    student, teacher = pair
    p, q = teacher.softmax(-1), student.softmax(-1)
    m = (p + q) / 2
    expected = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    torch.testing.assert_close(logits_kd(student, teacher, mask, "jsd", beta=0.5), expected * mask)


def test_jsd_for_interior_beta_is_positive_and_bounded_unlike_the_kls(pair, mask):
    student, teacher = 4 * pair[0], 4 * pair[1]  # far apart: the KLs are large
    valid = mask.bool()
    for beta in (0.1, 0.5, 0.9):
        value = logits_kd(student, teacher, mask, "jsd", beta=beta)[valid]
        bound = (1 - beta) * math.log(1 / beta) + beta * math.log(1 / (1 - beta))  # m >= beta p_T, m >= (1-beta) p_S
        assert (value > 0).all() and (value <= bound + 1e-12).all()
    assert (logits_kd(student, teacher, mask, "forward_kl")[valid] > math.log(10)).any()


def test_skew_divergences_at_alpha_zero_are_the_plain_kls(pair, mask):
    student, teacher = pair
    torch.testing.assert_close(
        logits_kd(student, teacher, mask, "skew_kl", alpha=0.0), logits_kd(student, teacher, mask, "forward_kl")
    )
    torch.testing.assert_close(
        logits_kd(student, teacher, mask, "skew_reverse_kl", alpha=0.0), logits_kd(student, teacher, mask, "reverse_kl")
    )


def test_skew_kl_matches_its_mixture_formula(pair, mask):
    student, teacher = pair
    p, q = teacher.softmax(-1), student.softmax(-1)
    mix = 0.1 * p + 0.9 * q
    expected = (p * (p / mix).log()).sum(-1) * mask
    torch.testing.assert_close(logits_kd(student, teacher, mask, "skew_kl", alpha=0.1), expected)


def test_skew_kl_matches_a_hand_computed_value():
    student, teacher = probs_logits([0.5, 0.3, 0.2]), probs_logits([0.1, 0.6, 0.3])
    # mixture 0.2 * p_T + 0.8 * p_S = (0.02 + 0.40, 0.12 + 0.24, 0.06 + 0.16), in probability space
    expected = 0.1 * math.log(0.1 / 0.42) + 0.6 * math.log(0.6 / 0.36) + 0.3 * math.log(0.3 / 0.22)
    per_token = logits_kd(student, teacher, torch.ones(1, 1), "skew_kl", alpha=0.2)
    torch.testing.assert_close(per_token, torch.tensor([[expected]], dtype=torch.float64))


def test_skew_reverse_kl_matches_a_hand_computed_value():
    student, teacher = probs_logits([0.5, 0.3, 0.2]), probs_logits([0.1, 0.6, 0.3])
    # mixture 0.2 * p_S + 0.8 * p_T = (0.10 + 0.08, 0.06 + 0.48, 0.04 + 0.24), in probability space
    expected = 0.5 * math.log(0.5 / 0.18) + 0.3 * math.log(0.3 / 0.54) + 0.2 * math.log(0.2 / 0.28)
    per_token = logits_kd(student, teacher, torch.ones(1, 1), "skew_reverse_kl", alpha=0.2)
    torch.testing.assert_close(per_token, torch.tensor([[expected]], dtype=torch.float64))


def test_jsd_weights_each_kl_by_the_other_distributions_share_of_the_mixture():
    student, teacher = probs_logits([0.5, 0.3, 0.2]), probs_logits([0.1, 0.6, 0.3])
    # m = 0.3 * p_T + 0.7 * p_S = (0.03 + 0.35, 0.18 + 0.21, 0.09 + 0.14)
    kl_teacher = 0.1 * math.log(0.1 / 0.38) + 0.6 * math.log(0.6 / 0.39) + 0.3 * math.log(0.3 / 0.23)
    kl_student = 0.5 * math.log(0.5 / 0.38) + 0.3 * math.log(0.3 / 0.39) + 0.2 * math.log(0.2 / 0.23)
    expected = 0.7 * kl_teacher + 0.3 * kl_student  # 0.152; TRL's 0.3 * kl_teacher + 0.7 * kl_student is 0.083
    per_token = logits_kd(student, teacher, torch.ones(1, 1), "jsd", beta=0.3)
    torch.testing.assert_close(per_token, torch.tensor([[expected]], dtype=torch.float64))


def test_total_variation_matches_a_hand_computed_value():
    student, teacher = probs_logits([0.5, 0.3, 0.2]), probs_logits([0.2, 0.3, 0.5])
    per_token = logits_kd(student, teacher, torch.ones(1, 1), "total_variation")
    torch.testing.assert_close(per_token, torch.tensor([[0.3]], dtype=torch.float64))  # 0.5 * (0.3 + 0 + 0.3)


def test_temperature_softens_both_sides_and_scales_by_its_square():
    student = torch.tensor([[[0.0, 0.0]]], dtype=torch.float64)  # softmax(s / 2) = (1/2, 1/2)
    teacher = torch.tensor([[[2 * math.log(3), 0.0]]], dtype=torch.float64)  # softmax(t / 2) = (3/4, 1/4)
    expected = 4 * (0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5))
    per_token = logits_kd(student, teacher, torch.ones(1, 1), temperature=2.0)
    torch.testing.assert_close(per_token, torch.tensor([[expected]], dtype=torch.float64))


# --- logits KD: masking, chunking, vocabulary, precision, gradients -----------------------------------


def test_masked_positions_contribute_exactly_zero_whatever_their_logits(pair, mask):
    student, teacher = pair
    noisy = student.masked_fill(~mask.bool()[..., None], 1e4)  # garbage at padding
    per_token = logits_kd(noisy, teacher, mask)
    assert (per_token[~mask.bool()] == 0).all()
    torch.testing.assert_close(per_token, logits_kd(student, teacher, mask))


def test_all_masked_batch_gives_zero_loss_and_zero_gradient_without_nan(pair):
    student, teacher = pair
    student.requires_grad_(True)
    empty = torch.zeros(B, T, dtype=torch.long)
    loss = masked_sum(logits_kd(student, teacher, empty, "jsd"), empty) / empty.sum().clamp_min(1)
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(student.grad).all() and (student.grad == 0).all()


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 1000])
def test_chunked_equals_unchunked_in_value_and_gradient(chunk_size, pair, mask):
    student, teacher = pair

    def run(size):
        s = student.clone().requires_grad_(True)
        per_token = logits_kd(s, teacher, mask, "jsd", temperature=2.0, chunk_size=size)
        masked_sum(per_token, mask).backward()
        return per_token.detach(), s.grad

    for got, expected in zip(run(chunk_size), run(None), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


def test_evaluation_without_grad_gives_the_same_values(pair, mask):
    student, teacher = pair
    student.requires_grad_(True)
    with_grad = logits_kd(student, teacher, mask, "jsd")
    with torch.no_grad():
        without = logits_kd(student, teacher, mask, "jsd")
    assert not without.requires_grad
    torch.testing.assert_close(without, with_grad.detach())


def test_teacher_vocabulary_padded_larger_gives_the_same_loss_as_unpadded(pair, mask):
    student, teacher = pair
    padded = torch.cat([teacher, torch.full((B, T, 5), 3.0, dtype=teacher.dtype)], -1)  # 5 padding rows
    torch.testing.assert_close(logits_kd(student, padded, mask), logits_kd(student, teacher, mask))


def test_student_vocabulary_larger_than_the_teachers_is_an_error(pair, mask):
    student, teacher = pair
    with pytest.raises(ValueError, match="teacher's vocabulary must be at least the student's"):
        logits_kd(student, teacher[..., :-1], mask)


def test_bf16_logits_are_computed_in_fp32(pair, mask):
    student, teacher = (x.to(torch.bfloat16) for x in pair)
    student.requires_grad_(True)
    per_token = logits_kd(student, teacher, mask, temperature=2.0)
    assert per_token.dtype == torch.float32
    expected = logits_kd(student.detach().float(), teacher.float(), mask, temperature=2.0)
    torch.testing.assert_close(per_token, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(per_token.double(), logits_kd(*pair, mask, temperature=2.0), atol=0.05, rtol=0.05)
    per_token.sum().backward()
    assert student.grad.dtype == torch.bfloat16 and torch.isfinite(student.grad).all()


def fp16_scaled_gradient(student: torch.Tensor, teacher: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The student's gradient of the mean per-token forward KL times 65536, GradScaler's initial scale."""
    s = student.to(dtype).clone().requires_grad_(True)
    mask = torch.ones(student.shape[:2])
    (masked_sum(logits_kd(s, teacher.to(dtype), mask), mask) / mask.sum() * 65536).backward()
    return s.grad


def test_fp16_gradients_are_scaled_before_being_rounded_to_fp16():
    # fp16-representable logits, so the fp64 reference sees exactly what the fp16 student sees
    student, teacher = ((4 * logits(2, 4, 1000, seed=seed)).half() for seed in (11, 12))
    fp16 = fp16_scaled_gradient(student, teacher, torch.float16)
    reference = fp16_scaled_gradient(student, teacher, torch.float64).half()
    assert fp16.dtype == torch.float16
    assert (fp16 == 0).sum() == (reference == 0).sum()  # rounding before scaling flushed 413 entries to 0
    torch.testing.assert_close(fp16.double(), reference.double(), rtol=1e-2, atol=1e-7)


def test_fp16_gradients_stay_finite_when_the_scaled_upstream_gradient_exceeds_fp16_range():
    # one token: the per-token upstream gradient is 65536, beyond fp16's largest value 65504
    student, teacher = ((2 * logits(1, 1, 50, seed=seed)).half() for seed in (13, 14))
    fp16 = fp16_scaled_gradient(student, teacher, torch.float16)
    reference = fp16_scaled_gradient(student, teacher, torch.float64).half()
    assert torch.isfinite(reference).all()
    torch.testing.assert_close(fp16.double(), reference.double(), rtol=1e-2, atol=1e-7)


@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
def test_logits_kd_gradient_passes_gradcheck(divergence):
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    student = logits(2, 3, 4, seed=2).requires_grad_(True)
    teacher = logits(2, 3, 6, seed=3)  # padded teacher vocabulary on the way
    assert torch.autograd.gradcheck(
        lambda s: logits_kd(s, teacher, mask, divergence, temperature=1.7, beta=0.3, alpha=0.2, chunk_size=2),
        (student,),
        fast_mode=True,
    )


def test_gradient_matches_plain_autograd_through_the_naive_loss(pair, mask):
    student, teacher = pair
    s1, s2 = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    masked_sum(logits_kd(s1, teacher, mask, temperature=2.0, chunk_size=3), mask).backward()
    naive = 4 * reference_kl(F.log_softmax(teacher / 2, -1), F.log_softmax(s2 / 2, -1))
    masked_sum(naive, mask).backward()
    torch.testing.assert_close(s1.grad, s2.grad)


def test_a_batch_split_in_two_gives_the_same_step_loss_and_gradient():
    student, teacher = logits(4, T, V, seed=4), logits(4, T, V, seed=5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    step_tokens = mask.sum()

    def step(parts):
        s = student.clone().requires_grad_(True)
        loss = sum(masked_sum(logits_kd(s[p], teacher[p], mask[p], "jsd"), mask[p]) for p in parts) / step_tokens
        loss.backward()
        return loss.detach(), s.grad

    whole, halves = step([slice(0, 4)]), step([slice(0, 2), slice(2, 4)])
    for a, b in zip(whole, halves, strict=True):
        torch.testing.assert_close(a, b)


# --- sparse (top-k) logits KD -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tail", "divergence"), [("renormalize", "forward_kl")] + [("bucket", name) for name in sorted(DIVERGENCES)]
)
def test_sparse_kd_over_the_full_vocabulary_equals_dense_kd_with_the_same_divergence(tail, divergence, pair, mask):
    student, teacher = pair
    ids = logits(B, T, V, seed=6).argsort(-1)  # every id, in a shuffled order
    logprobs = F.log_softmax(teacher, -1).gather(-1, ids)
    settings = {"divergence": divergence, "beta": 0.3, "alpha": 0.2}
    torch.testing.assert_close(
        sparse_logits_kd(student, ids, logprobs, mask, tail=tail, **settings),
        logits_kd(student, teacher, mask, **settings),
        atol=1e-8,
        rtol=1e-8,
    )


def test_sparse_bucket_matches_a_hand_computed_example():
    student = probs_logits([0.5, 0.3, 0.2])
    ids, logprobs = torch.tensor([[[0, 1]]]), torch.tensor([[[0.6, 0.3]]], dtype=torch.float64).log()
    # top-k terms, then the tail: teacher 1 - 0.9 = 0.1 against student 0.2 outside ids {0, 1}
    expected = 0.6 * math.log(0.6 / 0.5) + 0.3 * math.log(0.3 / 0.3) + 0.1 * math.log(0.1 / 0.2)
    per_token = sparse_logits_kd(student, ids, logprobs, torch.ones(1, 1), tail="bucket")
    torch.testing.assert_close(per_token, torch.tensor([[expected]], dtype=torch.float64))


def test_sparse_bucket_reverse_kl_matches_a_hand_computed_example():
    student = probs_logits([0.5, 0.3, 0.2])
    ids, logprobs = torch.tensor([[[0, 1]]]), torch.tensor([[[0.6, 0.3]]], dtype=torch.float64).log()
    # coarsened to (id 0, id 1, the rest): student (0.5, 0.3, 0.2) against teacher (0.6, 0.3, 0.1)
    expected = 0.5 * math.log(0.5 / 0.6) + 0.3 * math.log(0.3 / 0.3) + 0.2 * math.log(0.2 / 0.1)
    per_token = sparse_logits_kd(student, ids, logprobs, torch.ones(1, 1), tail="bucket", divergence="reverse_kl")
    torch.testing.assert_close(per_token, torch.tensor([[expected]], dtype=torch.float64))


def test_sparse_renormalize_matches_a_hand_computed_example():
    student = probs_logits([0.5, 0.3, 0.2])
    ids, logprobs = torch.tensor([[[0, 1]]]), torch.tensor([[[0.6, 0.3]]], dtype=torch.float64).log()
    expected = 2 / 3 * math.log((2 / 3) / 0.5) + 1 / 3 * math.log((1 / 3) / 0.3)  # teacher renormalised to (2/3, 1/3)
    per_token = sparse_logits_kd(student, ids, logprobs, torch.ones(1, 1), tail="renormalize")
    torch.testing.assert_close(per_token, torch.tensor([[expected]], dtype=torch.float64))


def test_sparse_bucket_penalises_student_mass_outside_the_teachers_top_k():
    ids, logprobs = torch.tensor([[[0, 1]]]), torch.tensor([[[0.6, 0.3]]], dtype=torch.float64).log()
    matched = probs_logits([0.6, 0.3, 0.1])  # the same top-k and tail as the teacher
    spread = probs_logits([0.3, 0.15, 0.55])  # same ratio inside the top-k, too much outside
    one = torch.ones(1, 1)
    assert sparse_logits_kd(matched, ids, logprobs, one).item() == pytest.approx(0, abs=1e-12)
    assert sparse_logits_kd(spread, ids, logprobs, one).item() > 0.1


@pytest.mark.parametrize(
    ("tail", "divergence"), [("bucket", "forward_kl"), ("bucket", "jsd"), ("renormalize", "forward_kl")]
)
def test_sparse_kd_gradient_passes_gradcheck(tail, divergence):
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    student = logits(2, 3, 6, seed=7).requires_grad_(True)
    ids = logits(2, 3, 6, seed=8).topk(3, -1).indices
    logprobs = F.log_softmax(logits(2, 3, 6, seed=9), -1).gather(-1, ids)
    temperature = 1.0 if tail == "bucket" else 2.0
    assert torch.autograd.gradcheck(
        lambda s: sparse_logits_kd(
            s, ids, logprobs, mask, tail=tail, divergence=divergence, temperature=temperature, beta=0.3, chunk_size=2
        ),
        (student,),
        fast_mode=True,
    )


def test_sparse_renormalize_refuses_divergences_other_than_forward_kl(pair, mask):
    ids = torch.zeros(B, T, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="tail='renormalize' supports only divergence 'forward_kl', got 'jsd'"):
        sparse_logits_kd(pair[0], ids, torch.zeros(B, T, 2), mask, tail="renormalize", divergence="jsd")


def test_sparse_bucket_refuses_a_temperature_it_cannot_apply(pair, mask):
    ids = torch.zeros(B, T, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="1.0 with tail='bucket'"):
        sparse_logits_kd(pair[0], ids, torch.zeros(B, T, 2), mask, tail="bucket", temperature=2.0)


# --- noisy KD: input noise ----------------------------------------------------------------------------

PAD, BOS, EOS, MASK = 0, 1, 2, 3


def test_noise_at_rate_one_masks_every_real_token_but_not_padding_or_special_tokens():
    ids = torch.tensor([[BOS, 10, 11, 12, EOS, PAD], [BOS, 13, EOS, PAD, PAD, PAD]])
    mask = (ids != PAD).long()
    noised, noised_mask = noise_tokens(ids, mask, 1.0, mask_token_id=MASK, keep_ids=[BOS, EOS])
    assert noised.tolist() == [[BOS, MASK, MASK, MASK, EOS, PAD], [BOS, MASK, EOS, PAD, PAD, PAD]]
    assert noised_mask is mask


def test_noise_at_rate_zero_changes_nothing():
    ids = torch.tensor([[BOS, 10, 11, EOS]])
    for token in (MASK, None):
        noised, noised_mask = noise_tokens(ids, torch.ones_like(ids), 0.0, mask_token_id=token)
        assert noised.tolist() == ids.tolist() and noised_mask.tolist() == [[1, 1, 1, 1]]


def test_dropping_closes_up_kept_tokens_in_order_toward_the_content_side():
    generator = torch.Generator().manual_seed(0)
    ids = torch.arange(10, 30).view(1, 20)
    dropped, dropped_mask = noise_tokens(ids, torch.ones_like(ids), 0.5, generator=generator)
    kept = dropped[dropped_mask.bool()].tolist()
    n = len(kept)
    assert 0 < n < 20 and kept == sorted(kept) and dropped_mask[0, :n].all() and not dropped_mask[0, n:].any()

    left_padded = torch.tensor([[PAD, PAD, 10, 11, 12, 13]])
    dropped, dropped_mask = noise_tokens(left_padded, (left_padded != PAD).long(), 1.0, padding_side="left")
    assert not dropped_mask.any()  # everything dropped: an all-padding row
    dropped, dropped_mask = noise_tokens(
        left_padded, (left_padded != PAD).long(), 1.0, keep_ids=[10, 13], padding_side="left"
    )
    assert dropped_mask.tolist() == [[0, 0, 0, 0, 1, 1]] and dropped[0, 4:].tolist() == [10, 13]


def test_noise_is_reproducible_with_a_seeded_generator():
    ids = torch.arange(100, 164).view(2, 32)
    runs = [
        noise_tokens(ids, torch.ones_like(ids), 0.3, MASK, generator=torch.Generator().manual_seed(7))[0] for _ in "ab"
    ]
    assert torch.equal(*runs) and (runs[0] == MASK).any()


def test_span_permutation_shuffles_whole_spans_and_leaves_padding_and_special_tokens():
    ids = torch.tensor([[BOS, *range(10, 40), EOS, PAD, PAD], [BOS, 50, 51, 52, EOS, *[PAD] * 29]])
    mask = (ids != PAD).long()
    generator = torch.Generator().manual_seed(3)
    shuffled = [permute_spans(ids, mask, 0.2, generator, keep_ids=[BOS, EOS]) for _ in range(20)]
    for out in shuffled:
        assert out[:, 0].tolist() == [BOS, BOS] and out[0, 31:].tolist() == [EOS, PAD, PAD] and out[1, 4] == EOS
        assert sorted(out[0, 1:31].tolist()) == list(range(10, 40))  # a permutation of the content
        assert torch.equal(out[1, 5:], ids[1, 5:])
        steps = (out[0, 2:31] - out[0, 1:30]).tolist()
        assert sum(step == 1 for step in steps) >= 15  # mostly runs of consecutive tokens: spans, not tokens
    assert sum(not torch.equal(out, ids) for out in shuffled) >= 18
    assert torch.equal(permute_spans(ids, mask, 0.0, keep_ids=[BOS, EOS]), ids)
    everywhere = permute_spans(ids, mask, 1.0, torch.Generator().manual_seed(0), keep_ids=[BOS, EOS])
    assert sorted(everywhere[0, 1:31].tolist()) == list(range(10, 40)) and not torch.equal(everywhere, ids)


# --- attention-relation KD ----------------------------------------------------------------------------


def qkv(batch: int, length: int, hidden: int, seed: int) -> list[torch.Tensor]:
    return [logits(batch, length, hidden, seed=seed + i) for i in range(3)]


def test_attention_relation_loss_is_zero_for_identical_projections():
    q, k, v = qkv(2, 6, 16, seed=10)
    per_position = attention_relation_kd(q, k, v, q, k, v, torch.ones(2, 6), relation_heads=4)
    torch.testing.assert_close(per_position, torch.zeros(2, 6, dtype=torch.float64))


def test_attention_relation_works_across_hidden_sizes_and_head_counts_and_reaches_the_student():
    student = [x.requires_grad_(True) for x in qkv(2, 6, 16, seed=20)]
    teacher = qkv(2, 6, 48, seed=30)
    per_position = attention_relation_kd(*student, *teacher, torch.ones(2, 6), relation_heads=4)
    assert per_position.shape == (2, 6) and (per_position > 0).all()
    per_position.sum().backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in student)


def test_attention_distribution_variant_uses_query_key_relations():
    q, k, v = qkv(1, 5, 8, seed=40)
    other_q = logits(1, 5, 8, seed=50)
    mask = torch.ones(1, 5)
    assert attention_relation_kd(q, k, v, q, k, v, mask, 2, relations=("qk", "vv")).abs().max() < 1e-12
    assert attention_relation_kd(other_q, k, v, q, k, v, mask, 2, relations=("qk",)).sum() > 0
    assert attention_relation_kd(other_q, k, v, q, k, v, mask, 2, relations=("kk", "vv")).abs().max() < 1e-12


def test_padded_positions_neither_receive_relation_mass_nor_count_as_queries():
    student, teacher = qkv(2, 6, 16, seed=60), qkv(2, 6, 32, seed=70)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    per_position = attention_relation_kd(*student, *teacher, mask, relation_heads=2)
    garbage = [x.clone() for x in student]
    for x in garbage:
        x[1, 4:] = 100.0
    torch.testing.assert_close(attention_relation_kd(*garbage, *teacher, mask, relation_heads=2), per_position)
    assert (per_position[1, 4:] == 0).all()
    all_masked = attention_relation_kd(*student, *teacher, torch.zeros(2, 6), relation_heads=2)
    assert torch.isfinite(all_masked).all() and (all_masked == 0).all()


def test_causal_relations_ignore_later_positions():
    student, teacher = qkv(1, 6, 16, seed=80), qkv(1, 6, 16, seed=90)
    changed = [x.clone() for x in student]
    for x in changed:
        x[0, 3:] = logits(3, 16, seed=99)
    one = torch.ones(1, 6)
    before = attention_relation_kd(*student, *teacher, one, relation_heads=2, causal=True)
    after = attention_relation_kd(*changed, *teacher, one, relation_heads=2, causal=True)
    torch.testing.assert_close(after[0, :3], before[0, :3])


def naive_relation_kd(student: list, teacher: list, mask: torch.Tensor, heads: int, causal: bool) -> torch.Tensor:
    """MiniLMv2 written out: per query position, relation and head, KL(teacher || student) of
    softmax(x_i . y_j / sqrt(d_head)) over the visible keys j; the mean over relations and heads."""
    student, teacher = dict(zip("qkv", student, strict=True)), dict(zip("qkv", teacher, strict=True))
    batch, length = mask.shape
    out = torch.zeros(batch, length, dtype=torch.float64)
    for b in range(batch):
        for i in range(length):
            if not mask[b, i]:
                continue  # padded queries: loss 0
            keys = [j for j in range(length) if mask[b, j] and (j <= i or not causal)]
            kls = []
            for x, y in ("qq", "kk", "vv"):
                for a in range(heads):
                    rows = []
                    for side in (teacher, student):
                        d = side[x].shape[-1] // heads  # head dim, not hidden size
                        head = slice(a * d, (a + 1) * d)
                        scores = [side[x][b, i, head] @ side[y][b, j, head] / math.sqrt(d) for j in keys]
                        rows.append(torch.stack(scores).softmax(0))
                    p_teacher, p_student = rows
                    kls.append((p_teacher * (p_teacher / p_student).log()).sum())
            out[b, i] = sum(kls) / len(kls)
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_attention_relation_kd_matches_a_naive_loop_over_positions_relations_and_heads(causal):
    student, teacher = qkv(2, 6, 16, seed=110), qkv(2, 6, 48, seed=120)  # head dims 4 and 12
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    expected = naive_relation_kd(student, teacher, mask, heads=4, causal=causal)
    got = attention_relation_kd(*student, *teacher, mask, relation_heads=4, causal=causal)
    torch.testing.assert_close(got, expected)


def test_hidden_size_not_divisible_by_relation_heads_is_an_error():
    q, k, v = qkv(1, 4, 10, seed=100)
    with pytest.raises(ValueError, match="hidden size 10 is not divisible by relation_heads=4"):
        attention_relation_kd(q, k, v, q, k, v, torch.ones(1, 4), relation_heads=4)


# --- capturing q, k, v from transformers models -------------------------------------------------------


def tiny(arch: str, hidden: int = 16) -> torch.nn.Module:
    torch.manual_seed(0)
    common = {"vocab_size": 100, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if arch == "bart":
        config = BartConfig(
            d_model=hidden,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            max_position_embeddings=32,
            decoder_start_token_id=1,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            **common,
        )
        return BartForConditionalGeneration(config).eval()
    if arch == "t5":
        config = T5Config(
            d_model=hidden,
            d_kv=8,
            d_ff=32,
            num_layers=2,
            num_heads=2,
            dropout_rate=0.0,
            decoder_start_token_id=0,
            **common,
        )
        return T5ForConditionalGeneration(config).eval()
    config = GPT2Config(
        n_embd=hidden, n_layer=2, n_head=2, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common
    )
    return GPT2LMHeadModel(config).eval()


def run(model: torch.nn.Module, which: str = "decoder") -> tuple[torch.Tensor, ...]:
    """Run `model` on a fixed batch; return the hidden states of its `which` stack (the inputs to each layer,
    then the stack's output)."""
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    if model.config.is_encoder_decoder:
        out = model(
            input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=ids[:, :5], output_hidden_states=True
        )
        return out.encoder_hidden_states if which == "encoder" else out.decoder_hidden_states
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states


def last_layer_qkv_by_hand(model: torch.nn.Module, which: str, hidden_states: tuple) -> list[torch.Tensor]:
    """q, k, v of the last self-attention layer from that layer's input, hidden_states[-2]: its pre-attention
    norm written out (GPT-2 LayerNorm, T5 RMSNorm; BART is post-LN, so none), then its projection weights."""
    x = hidden_states[-2]  # (B, S, H)
    if model.config.model_type == "gpt2":
        block = model.transformer.h[-1]
        mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        x = (x - mean) / torch.sqrt(var + block.ln_1.eps) * block.ln_1.weight + block.ln_1.bias
        return list((x @ block.attn.c_attn.weight + block.attn.c_attn.bias).split(x.shape[-1], dim=-1))  # Conv1D
    if model.config.model_type == "t5":
        layer = getattr(model, which).block[-1].layer[0]
        norm, attention = layer.layer_norm, layer.SelfAttention
        x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight  # no mean, no bias
        return [x @ p.weight.T for p in (attention.q, attention.k, attention.v)]
    attention = getattr(model.model, which).layers[-1].self_attn
    return [x @ p.weight.T + p.bias for p in (attention.q_proj, attention.k_proj, attention.v_proj)]


@pytest.mark.parametrize(
    ("arch", "which", "length"),
    [
        ("bart", "encoder", 7),
        ("bart", "decoder", 5),
        ("t5", "encoder", 7),
        ("t5", "decoder", 5),
        ("gpt2", "decoder", 7),
    ],
)
def test_capture_qkv_returns_the_last_layers_projections(arch, which, length):
    model = tiny(arch)
    with torch.no_grad(), capture_qkv(model, which) as captured:
        hidden_states = run(model, which)
    assert set(captured) == {"q", "k", "v"}
    assert all(x.shape == (2, length, 16) for x in captured.values())
    expected = last_layer_qkv_by_hand(model, which, hidden_states)
    for name, by_hand in zip("qkv", expected, strict=True):
        torch.testing.assert_close(captured[name], by_hand, msg=lambda m, name=name: f"{name}: {m}")


def test_capture_qkv_removes_its_hooks_on_exit():
    model = tiny("bart")
    with capture_qkv(model, "encoder") as captured:
        pass
    run(model)
    assert captured == {}


def test_captured_projections_train_a_smaller_student_against_a_larger_teacher():
    student, teacher = tiny("bart", hidden=16), tiny("bart", hidden=32)
    with capture_qkv(student, "encoder") as s, capture_qkv(teacher, "encoder") as t:
        run(student)
        with torch.no_grad():
            run(teacher)
    mask = torch.ones(2, 7)
    loss = masked_sum(attention_relation_kd(s["q"], s["k"], s["v"], t["q"], t["k"], t["v"], mask, 4), mask)
    loss.backward()
    layer = student.model.encoder.layers[-1].self_attn
    assert torch.isfinite(loss) and loss > 0 and layer.q_proj.weight.grad.abs().sum() > 0


def test_capture_qkv_on_an_unsupported_model_names_the_supported_ones():
    bert = BertModel(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2))
    with (
        pytest.raises(ValueError, match="model_type 'bert'.*supported: bart and t5.*gpt2"),
        capture_qkv(bert, "encoder"),
    ):
        pass
    gpt2 = tiny("gpt2")
    with pytest.raises(ValueError, match="model_type 'gpt2' with which='encoder'"), capture_qkv(gpt2, "encoder"):
        pass


def test_dropout_at_noises_the_teacher_then_restores_it():
    from transformers import BartConfig, BartForConditionalGeneration

    from distilgen.objectives import dropout_at

    torch.manual_seed(0)
    model = BartForConditionalGeneration(
        BartConfig(
            vocab_size=50,
            d_model=16,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            dropout=0.0,
        )
    ).eval()
    ids = torch.randint(4, 50, (2, 7))
    clean = model(input_ids=ids, decoder_input_ids=ids).logits
    with dropout_at(model, 0.5):
        noisy = model(input_ids=ids, decoder_input_ids=ids).logits
        again = model(input_ids=ids, decoder_input_ids=ids).logits
    assert not torch.allclose(noisy, clean) and not torch.allclose(noisy, again)
    assert not model.training and model.model.encoder.layers[0].dropout == 0.0
    torch.testing.assert_close(model(input_ids=ids, decoder_input_ids=ids).logits, clean)
    with dropout_at(model, 0.0):
        torch.testing.assert_close(model(input_ids=ids, decoder_input_ids=ids).logits, clean)
