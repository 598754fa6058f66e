"""Deep mutual learning (Zhang et al., CVPR 2018), METHOD.md §6: each student distils from the other everywhere;
with K students (§9), each distils from the mean of its K - 1 peers' KL terms."""
from __future__ import annotations

from typing import Sequence

import torch

import ccl_ops
from ccl_ops._validate import check_peer_logits


def mutual_kl(za: torch.Tensor, zb: torch.Tensor, y: torch.Tensor, *, temperature: float = 1.0,
              ignore_index: int = 255) -> ccl_ops.SelectiveKL:
    """``loss_a`` = T^2 KL(sg p_b || p_a) and ``loss_b`` = T^2 KL(sg p_a || p_b), averaged over the valid pixels.

    This is the selective KL with all-ones masks over the valid pixels (``rule="all"``).
    """
    return ccl_ops.pixel_selective_kl(za, zb, y, temperature=temperature, rule="all", ignore_index=ignore_index)


def peer_kl(logits: Sequence[torch.Tensor], y: torch.Tensor, *, temperature: float = 1.0,
            ignore_index: int = 255) -> list[torch.Tensor]:
    """DML's K-peer form (METHOD.md §9): student ``s`` gets ``T^2 mean_{r != s} KL(sg p_r || p_s)``, averaged over
    the valid pixels; one float32 scalar per student, differentiable w.r.t. its own logits only.

    Every unordered pair goes once through :func:`mutual_kl` (the fused op computes both directions in one pass);
    the mean over peers of the pair losses is exact because every pair divides by the same ``n_valid``. With
    K = 2 the single peer's loss is returned as is, so it is :func:`mutual_kl`'s ``loss_a``/``loss_b`` to the bit.
    """
    k = check_peer_logits(logits, y)
    from_peers: list[list[torch.Tensor]] = [[] for _ in range(k)]
    for s in range(k):
        for r in range(s + 1, k):  # appended in increasing peer index for every student
            pair = mutual_kl(logits[s], logits[r], y, temperature=temperature, ignore_index=ignore_index)
            from_peers[s].append(pair.loss_a)  # s learns from r
            from_peers[r].append(pair.loss_b)  # r learns from s
    return [mean_of_terms(terms) for terms in from_peers]


def mean_of_terms(terms: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean of scalar loss terms; a single term comes back untouched (no arithmetic: K = 2 stays bitwise)."""
    if len(terms) == 1:
        return terms[0]
    return torch.stack(list(terms)).sum() / len(terms)
