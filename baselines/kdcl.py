"""KDCL (Guo et al., CVPR 2020) adapted per pixel (METHOD.md §6): each student distils from a detached ensemble
teacher ``zt`` built from both students. *Per-pixel KDCL is our adaptation of a classification method.*

``L = CE_a + CE_b + l T^2 [KL(softmax(zt/T) || p_a) + KL(softmax(zt/T) || p_b)]``: :func:`kdcl_loss` is one of
the KL terms. The teachers take detached (N, C, H, W) logits at the label resolution and return teacher logits
of the same shape:

* naive: the student with the lower cross-entropy at each pixel (ties go to A);
* linear: ``alpha za + (1 - alpha) zb``, ``alpha`` minimising the batch cross-entropy;
* min-logit: ``zt^j = min_s (z_s^j - z_s^y)``;
* general: the probability ensemble weighted by the inverse error covariance of the students, projected onto
  the simplex (:func:`prediction_errors` -> :func:`error_covariance` -> :func:`ensemble_weights`).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

import ccl_ops
from ccl_ops.reference import selection_masks


def kdcl_loss(z: torch.Tensor, zt: torch.Tensor, y: torch.Tensor, *, temperature: float,
              ignore_index: int = 255) -> torch.Tensor:
    """``T^2 KL(softmax(zt/T) || softmax(z/T))`` averaged over the valid pixels; the teacher ``zt`` is a constant
    (the op stops its gradient), so only ``z`` learns: the op computes that one direction (``learners="a"``)."""
    return ccl_ops.pixel_selective_kl(z, zt.to(z.dtype), y, temperature=temperature, rule="all",
                                      ignore_index=ignore_index, learners="a").loss_a


def naive_teacher(za: torch.Tensor, zb: torch.Tensor, y: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """B's logits where B's cross-entropy is strictly lower (the "confidence" selection of ccl_ops), A's elsewhere."""
    _, b_better, _ = selection_masks(za, zb, y, "confidence", ignore_index)
    return torch.where(b_better[:, None], zb, za)


def linear_alpha(za: torch.Tensor, zb: torch.Tensor, y: torch.Tensor, ignore_index: int = 255,
                 tol: float = 1e-3) -> float:
    """``alpha`` in [0, 1] minimising the batch CE of ``alpha za + (1 - alpha) zb`` to ``tol`` (the CE is convex in
    alpha: bisection on the sign of its derivative)."""
    valid = y != ignore_index
    if not valid.any():
        return 0.5
    za_v = za.float().permute(0, 2, 3, 1)[valid]  # (P, C)
    zb_v = zb.float().permute(0, 2, 3, 1)[valid]
    onehot = F.one_hot(y[valid], za.shape[1]).float()
    diff = za_v - zb_v
    lo, hi = 0.0, 1.0

    def slope(alpha: float) -> float:
        p = torch.softmax(zb_v + alpha * diff, dim=1)
        return float(((p - onehot) * diff).sum(1).mean())

    if slope(0.0) >= 0:
        return 0.0
    if slope(1.0) <= 0:
        return 1.0
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if slope(mid) > 0:
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)


def linear_teacher(za: torch.Tensor, zb: torch.Tensor, y: torch.Tensor,
                   ignore_index: int = 255) -> tuple[torch.Tensor, float]:
    """The linear ensemble and its ``alpha`` (:func:`linear_alpha`, one per batch)."""
    alpha = linear_alpha(za, zb, y, ignore_index)
    return alpha * za + (1 - alpha) * zb, alpha


def min_logit_teacher(za: torch.Tensor, zb: torch.Tensor, y: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """``zt^j = min_s (z_s^j - z_s^y)``; ignored pixels use class 0 as their target (their KL never counts)."""
    index = torch.where(y == ignore_index, 0, y)[:, None]
    return torch.minimum(za - za.gather(1, index), zb - zb.gather(1, index))


def prediction_errors(z: torch.Tensor, y: torch.Tensor, temperature: float, ignore_index: int = 255) -> torch.Tensor:
    """``softmax(z/T) - onehot(y)`` at the valid pixels, (P, C) in float32: one student's errors for KDCL-General."""
    valid = y != ignore_index
    p = torch.softmax(z.float() / temperature, 1).permute(0, 2, 3, 1)[valid]
    return p - F.one_hot(y[valid], z.shape[1]).float()


def error_covariance(errors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The (S, S) float64 sum over pixels and classes of ``e_s e_t`` for the students' errors ``errors[s]``."""
    e = torch.stack(list(errors)).double()  # (S, P, C)
    return torch.einsum("spc,tpc->st", e, e)


def project_to_simplex(w: torch.Tensor) -> torch.Tensor:
    """METHOD §6's projection of the ensemble weights: each clipped to [0, 1], then renormalised to sum 1."""
    w = w.clamp(0, 1)
    return w / w.sum()


def ensemble_weights(covariance: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """KDCL-General's weights from the mean error ``covariance`` (S, S): ``(cov + ridge I)^-1 1``, normalised to
    sum 1, then projected onto the simplex (unprojected, untrained students gave weights like 5 and -4 and
    collapsed both students)."""
    cov = covariance + ridge * torch.eye(covariance.shape[0], dtype=covariance.dtype)
    inv_one = torch.linalg.solve(cov, torch.ones(covariance.shape[0], dtype=covariance.dtype))
    return project_to_simplex(inv_one / inv_one.sum())


def general_teacher(za: torch.Tensor, zb: torch.Tensor, weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits ``zt`` with ``softmax(zt/T) = w_a softmax(za/T) + w_b softmax(zb/T)`` (float32)."""
    t = temperature
    w = weights.to(za.device, torch.float32)
    q = w[0] * torch.softmax(za.float() / t, 1) + w[1] * torch.softmax(zb.float() / t, 1)
    q = q.clamp(min=1e-8)
    q = q / q.sum(1, keepdim=True)
    return t * q.log()
