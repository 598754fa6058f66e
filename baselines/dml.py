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

    With K = 2 this is :func:`mutual_kl` (``loss_a``/``loss_b``, to the bit). With K > 2 it is the K-student
    selective KL with every peer teaching everywhere (``rule="all"``, :func:`ccl_ops.pixel_selective_kl_peers`):
    one pass over the K logits instead of a fused call per pair.
    """
    k = check_peer_logits(logits, y)
    if k == 2:
        pair = mutual_kl(logits[0], logits[1], y, temperature=temperature, ignore_index=ignore_index)
        return [pair.loss_a, pair.loss_b]
    losses = ccl_ops.pixel_selective_kl_peers(list(logits), y, temperature=temperature, rule="all",
                                              ignore_index=ignore_index).losses
    return list(losses.unbind())
