"""The ops' vocabulary: the option values they accept and the results they return.

Shared by the fused ops (:mod:`ccl_ops.ops`), the reference (:mod:`ccl_ops.reference`), the argument checks and
the callers that offer these options (the ``ccl`` method's ``rule``, ``normalize`` and ``score``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

RULES = ("correct", "confidence", "all")  # who teaches where in pixel_selective_kl
NORMALIZATIONS = ("valid", "selected")  # what pixel_selective_kl divides by
LEARNERS = ("both", "a", "b")  # whose loss pixel_selective_kl computes (the other comes back as 0)
SCORES = ("ce", "accuracy")  # how region_direction_mask ranks the two students in a region


class SelectiveKL(NamedTuple):
    """Result of :func:`ccl_ops.pixel_selective_kl`."""

    loss_a: torch.Tensor  # A learns from B where B teaches A; scalar, differentiable w.r.t. za only
    loss_b: torch.Tensor  # B learns from A where A teaches B; scalar, differentiable w.r.t. zb only
    count_ab: torch.Tensor  # int64 scalar: pixels where A teaches B
    count_ba: torch.Tensor  # int64 scalar: pixels where B teaches A

    @property
    def total(self) -> torch.Tensor:
        return self.loss_a + self.loss_b


class SelectiveKLPeers(NamedTuple):
    """Result of :func:`ccl_ops.pixel_selective_kl_peers` (K students)."""

    losses: torch.Tensor  # (K,): losses[s] is student s's loss, differentiable w.r.t. logits[s] only
    counts: torch.Tensor  # int64 (K,): pixels where student s learns from at least one peer


class RegionMask(NamedTuple):
    """Result of :func:`ccl_ops.region_direction_mask`."""

    direction: torch.Tensor  # int8 (N, Hr, Wr): +1 A teaches B, -1 B teaches A, 0 neither
    scores: torch.Tensor  # float32 (N, 2, Hr, Wr): score of A and of B per region, NaN without valid pixels
