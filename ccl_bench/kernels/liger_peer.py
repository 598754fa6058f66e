"""Liger-Kernel peer of the pixel-wise selective KL (METHOD.md §1), for the kernel benchmark.

Same signature and result as :func:`ccl_ops.reference.pixel_selective_kl_math`: the masks come from
:func:`ccl_ops.reference.selection_masks` and the two KL terms from Liger-Kernel's Triton KL-div loss
(``LigerKLDivLossFunction``, the autograd function behind ``liger_kernel.transformers.LigerKLDIVLoss``), applied
to the pixels flattened to ``(P, C)`` rows with log-space targets and the fused ``reduction="sum"``.

Masking without leaving the device (no boolean indexing, so no host synchronisation) and with the reference's NaN
semantics: for the loss of learner B (teacher A), the rows are

    target = log p_a (detached)                    at valid pixels, 0 at ignored ones
    input  = m_ab * log p_b + (1 - m_ab) * target  at valid pixels, 0 at ignored ones

so an unselected valid row contributes KL(p_a || p_a) = 0 (NaN if its logits hold a NaN, as in the reference), an
ignored row contributes exactly 0, and the gradient reaches log p_b only through the selected rows. Liger computes
in float32 whatever the input dtype (float64 inputs are not exact here: this is a benchmark peer).

Liger-Kernel is Triton-only (CUDA/ROCm/XPU): :func:`available` says whether it imports; the benchmark calls the
peer only on CUDA.
"""
from __future__ import annotations

import functools

import torch

from ccl_ops import SelectiveKL
from ccl_ops.reference import selection_masks


@functools.lru_cache(maxsize=None)
def _kl_function():
    from liger_kernel.ops.kl_div import LigerKLDivLossFunction  # imports triton

    return LigerKLDivLossFunction


def available() -> bool:
    """True when Liger-Kernel (and Triton) import in this environment."""
    try:
        _kl_function()
    except Exception:  # ImportError, or Triton failing to initialise without a GPU backend
        return False
    return True


def _rows(z: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H*W, C) in float32 (float64 inputs keep float64 until Liger reads them)."""
    z = z.double() if z.dtype == torch.float64 else z.float()
    return z.movedim(1, -1).reshape(-1, z.shape[1])


def _masked_kl_sum(log_student: torch.Tensor, log_teacher: torch.Tensor, mask: torch.Tensor,
                   valid: torch.Tensor) -> torch.Tensor:
    """sum over valid rows of mask * KL(exp(log_teacher) || exp(log_student)), with Liger's fused row sums."""
    m = mask[:, None].to(log_student.dtype)
    v = valid[:, None]
    target = torch.where(v, log_teacher.detach(), 0.0)
    inp = torch.where(v, log_student * m + target * (1 - m), 0.0)
    kl = _kl_function()
    return kl.apply(inp.contiguous(), target.contiguous(), "sum", True, 1e-10)


def pixel_selective_kl_math(za, zb, y, temperature: float, rule: str, normalize: str, ignore_index: int):
    """:func:`ccl_ops.reference.pixel_selective_kl_math` with the KL terms computed by Liger-Kernel."""
    m_ab, m_ba, valid = selection_masks(za, zb, y, rule, ignore_index)
    t = temperature
    log_pa = torch.log_softmax(_rows(za) / t, dim=1)
    log_pb = torch.log_softmax(_rows(zb) / t, dim=1)
    m_ab_r, m_ba_r, valid_r = m_ab.reshape(-1), m_ba.reshape(-1), valid.reshape(-1)
    if normalize == "valid":
        n = valid.sum()
    else:
        n = (m_ab | m_ba).sum()
    acc = torch.float64 if za.dtype == torch.float64 else torch.float32
    n = n.clamp(min=1).to(acc)
    loss_b = t * t * _masked_kl_sum(log_pb, log_pa, m_ab_r, valid_r).to(acc) / n  # B learns from A
    loss_a = t * t * _masked_kl_sum(log_pa, log_pb, m_ba_r, valid_r).to(acc) / n  # A learns from B
    return SelectiveKL(loss_a, loss_b, m_ab.sum(), m_ba.sum())
