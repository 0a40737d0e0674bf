"""Objectives: pure functions of tensors returning one loss value per target token.

Masking and normalisation happen once, in `masked_sum`; the training loop divides by the number of
valid target tokens in the whole optimizer step (all micro-batches, all processes), so gradient
accumulation and data parallelism give exactly the loss of one big batch.

[fp32 upcast note] Logits may arrive in bf16 under mixed precision; softmaxes and losses are
computed in fp32, because bf16 log-probabilities lose the small differences the losses are made of.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Token-level negative log-likelihood of `targets`.

    Args:
        logits: (B, T, V) scores predicting each target token.
        targets: (B, T) token ids; values at padded positions are ignored by the caller's mask.
        label_smoothing: mass spread uniformly over the vocabulary, as in `F.cross_entropy`.

    Returns:
        (B, T) loss per token.
    """
    return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none", label_smoothing=label_smoothing)


def masked_sum(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of (B, T) per-token values over valid positions (mask 1); the caller divides by step tokens."""
    return (per_token * mask.to(per_token.dtype)).sum()
