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

With K students (METHOD.md §9) the teacher is built from all of them: :func:`naive_teacher_k`,
:func:`linear_teacher_k` (:func:`linear_weights`), :func:`min_logit_teacher_k`, :func:`general_teacher_k` (the
covariance and weight functions above already take K students), and :func:`kdcl_losses` distils every student.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

import ccl_ops
from ccl_ops._validate import check_peer_logits
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


# K students (METHOD.md §9): one teacher built from all K students' detached logits, ``logits = [z_1, ..., z_K]``
# (each (N, C, H, W) at the label resolution); every student learns from it (:func:`kdcl_losses`). With K = 2
# each function below returns what its two-student counterpart above returns, to the bit.


def kdcl_losses(logits: Sequence[torch.Tensor], zt: torch.Tensor, y: torch.Tensor, *, temperature: float,
                ignore_index: int = 255) -> list[torch.Tensor]:
    """:func:`kdcl_loss` of every student against the one teacher ``zt`` (METHOD.md §9: every student learns from
    that one teacher); student ``s``'s loss is differentiable w.r.t. ``logits[s]`` only."""
    check_peer_logits(logits, y)
    return [kdcl_loss(z, zt, y, temperature=temperature, ignore_index=ignore_index) for z in logits]


def naive_teacher_k(logits: Sequence[torch.Tensor], y: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """At each valid pixel, the logits of the student with the lowest cross-entropy (§9); ties go to the lowest
    index, as :func:`naive_teacher`'s go to A, and ignored pixels take ``logits[0]``.

    A scan with a strict ``<`` keeps the first of equal CEs; with K = 2 it is :func:`naive_teacher`'s one
    ``torch.where`` on the same float32 (float64 for float64 logits) cross-entropies.
    """
    check_peer_logits(logits, y)
    valid = y != ignore_index
    target = torch.where(valid, y, 0)
    best, best_ce = logits[0], _pixel_ce(logits[0], target)
    for z in logits[1:]:
        ce = _pixel_ce(z, target)
        better = valid & (ce < best_ce)
        best, best_ce = torch.where(better[:, None], z, best), torch.where(better, ce, best_ce)
    return best


def _pixel_ce(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel CE as :func:`ccl_ops.reference.selection_masks` computes it (so the naive teachers agree)."""
    return F.cross_entropy(z.double() if z.dtype == torch.float64 else z.float(), target, reduction="none")


def min_logit_teacher_k(logits: Sequence[torch.Tensor], y: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """``zt^j = min_s (z_s^j - z_s^y)`` over all K students (§9), taken left to right (K = 2: one
    ``torch.minimum``, as :func:`min_logit_teacher`); ignored pixels use class 0 as their target."""
    check_peer_logits(logits, y)
    index = torch.where(y == ignore_index, 0, y)[:, None]
    zt = logits[0] - logits[0].gather(1, index)
    for z in logits[1:]:
        zt = torch.minimum(zt, z - z.gather(1, index))
    return zt


def linear_weights(logits: Sequence[torch.Tensor], y: torch.Tensor, ignore_index: int = 255, tol: float = 1e-3,
                   max_iter: int = 10_000) -> torch.Tensor:
    """Weights ``w`` (float64, (K,)) on the simplex minimising the batch CE of ``sum_s w_s z_s`` (§9), to ``tol``.

    K = 2: ``(alpha, 1 - alpha)`` with :func:`linear_alpha`'s ``alpha`` (bisection to ``tol``). K > 2: projected
    gradient descent in float64 from the simplex's centre, with the Euclidean projection onto the simplex and an
    Armijo backtracking step (the step doubles after each accepted one, so it follows the CE's local curvature),
    until no weight moves by more than ``tol / 10`` in a step. The CE is convex in ``w`` (convex in the logits,
    which are linear in ``w``), so this is its minimum; the minimiser is unique where the students' logits are
    not collinear. Holds the valid pixels' logits as one (K, P, C) float64 tensor. No valid pixel: equal weights.
    """
    k = check_peer_logits(logits, y)
    if k == 2:
        alpha = linear_alpha(logits[0], logits[1], y, ignore_index, tol)
        return torch.tensor([alpha, 1 - alpha], dtype=torch.float64)
    valid = y != ignore_index
    w = torch.full((k,), 1 / k, dtype=torch.float64)
    if not valid.any():
        return w
    z = torch.stack([zs.double().permute(0, 2, 3, 1)[valid] for zs in logits])  # (K, P, C)
    return _projected_gradient(z, y[valid], w, tol / 10, max_iter)


def _batch_ce(z: torch.Tensor, target: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean CE of ``sum_s w_s z_s`` over the P pixels of ``z`` (K, P, C) and its gradient in ``w``."""
    zt = torch.einsum("k,kpc->pc", w, z)
    log_p = torch.log_softmax(zt, 1)
    ce = -log_p.gather(1, target[:, None]).mean()
    residual = log_p.exp()
    residual[torch.arange(len(target)), target] -= 1  # softmax - onehot: d CE / d zt per pixel
    return ce, torch.einsum("pc,kpc->k", residual, z) / len(target)


def _projected_gradient(z, target, w, step_tol: float, max_iter: int) -> torch.Tensor:
    """Projected gradient descent with Armijo backtracking on the mean CE (see :func:`linear_weights`)."""
    step = 1.0
    f, g = _batch_ce(z, target, w)
    for _ in range(max_iter):
        while True:
            candidate = euclidean_simplex_projection(w - step * g)
            move = candidate - w
            f_new, g_new = _batch_ce(z, target, candidate)
            # Sufficient decrease for a step of this size (the quadratic upper bound at curvature 1 / step).
            if f_new <= f + g @ move + move @ move / (2 * step) or step < 1e-12:
                break
            step /= 2
        w, f, g = candidate, f_new, g_new
        if move.abs().max() <= step_tol:
            break
        step *= 2
    return w


def euclidean_simplex_projection(v: torch.Tensor) -> torch.Tensor:
    """The point of the probability simplex closest to ``v`` (1-D) in the Euclidean norm (sort and threshold).

    This is the projection the linear teacher's solver needs to converge; METHOD §6's :func:`project_to_simplex`
    (clip, then renormalise) is KDCL-General's rule for its weights, and a different map.
    """
    u = torch.sort(v, descending=True).values
    excess = torch.cumsum(u, 0) - 1
    k = torch.arange(1, len(v) + 1, dtype=v.dtype)
    support = int((u - excess / k > 0).nonzero().max())  # the largest k with u_k > (sum_{j<=k} u_j - 1) / k
    return (v - excess[support] / (support + 1)).clamp(min=0)


def linear_teacher_k(logits: Sequence[torch.Tensor], y: torch.Tensor,
                     ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear ensemble ``sum_s w_s z_s`` and its weights (:func:`linear_weights`, one set per batch); summed
    left to right with Python-float weights, so that K = 2 is :func:`linear_teacher`'s arithmetic."""
    weights = linear_weights(logits, y, ignore_index)
    w = weights.tolist()
    zt = w[0] * logits[0]
    for ws, z in zip(w[1:], logits[1:]):
        zt = zt + ws * z
    return zt, weights


def general_teacher_k(logits: Sequence[torch.Tensor], weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits ``zt`` with ``softmax(zt/T) = sum_s w_s softmax(z_s/T)`` (float32), K students (§9).

    The weights come from :func:`prediction_errors` -> :func:`error_covariance` -> :func:`ensemble_weights`,
    which already work for any number of students (K-by-K covariance, K weights); :func:`general_teacher` is
    this with K = 2, to the bit (the same products, summed in the same order).
    """
    check_peer_logits(logits, None)
    if tuple(weights.shape) != (len(logits),):
        raise ValueError(f"weights must have shape (K,) = ({len(logits)},), one per student, got "
                         f"{tuple(weights.shape)}")
    t = temperature
    w = weights.to(logits[0].device, torch.float32)
    q = w[0] * torch.softmax(logits[0].float() / t, 1)
    for ws, z in zip(w[1:], logits[1:]):
        q = q + ws * torch.softmax(z.float() / t, 1)
    q = q.clamp(min=1e-8)
    q = q / q.sum(1, keepdim=True)
    return t * q.log()
