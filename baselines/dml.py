"""Deep mutual learning (Zhang et al., CVPR 2018), METHOD.md §6: each student distils from the other everywhere."""
from __future__ import annotations

import torch

import ccl_ops


def mutual_kl(za: torch.Tensor, zb: torch.Tensor, y: torch.Tensor, *, temperature: float = 1.0,
              ignore_index: int = 255) -> ccl_ops.SelectiveKL:
    """``loss_a`` = T^2 KL(sg p_b || p_a) and ``loss_b`` = T^2 KL(sg p_a || p_b), averaged over the valid pixels.

    This is the selective KL with all-ones masks over the valid pixels (``rule="all"``).
    """
    return ccl_ops.pixel_selective_kl(za, zb, y, temperature=temperature, rule="all", ignore_index=ignore_index)
