"""CCL with K >= 2 students (METHOD.md §9): pixel-wise and region-wise BSD between every pair of peers.

``logits = [z_1, ..., z_K]`` are the students' (N, C, H, W) logits at the label resolution, ``y`` the (N, H, W)
labels; student ``s`` is ``logits[s]``. With K = 2 every function here is its two-student op:

* :func:`pixel_bsd_peers` is :func:`ccl_ops.pixel_selective_kl` (``[loss_a, loss_b]``). It is a plain-PyTorch
  reference, in the style of :mod:`ccl_ops.reference` (every mask materialised), with that module's arithmetic:
  at K = 2 it equals the reference to the bit and the fused op to float tolerance.
* :func:`region_targets` is :func:`ccl_ops.region_direction_mask` (target 0 where ``d = +1``, 1 where ``d = -1``):
  it is built from the op's scores and compares them as the op does, so that it agrees with it exactly.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from ._validate import (check_choice, check_label_values, check_peer_logits, check_region, check_region_grid,
                        check_temperature)
from .ops import region_direction_mask
from .types import NORMALIZATIONS, RULES, SCORES


def _opmath(z: torch.Tensor) -> torch.Tensor:
    return z.double() if z.dtype == torch.float64 else z.float()


def peer_masks(logits: Sequence[torch.Tensor], y: torch.Tensor, *, rule: str = "correct",
               ignore_index: int = 255) -> list[list[torch.Tensor | None]]:
    """``m[r][s]``: bool (N, H, W), where peer ``r`` teaches student ``s`` by the two-student rule of §1 applied to
    the pair (r, s) (METHOD.md §9); ``None`` on the diagonal. Each student's argmax or CE is computed once, as
    :func:`ccl_ops.reference.selection_masks` computes it, so that ``m[0][1], m[1][0]`` are its ``m_ab, m_ba``."""
    k = check_peer_logits(logits, y)
    check_choice("rule", rule, RULES)
    valid = y != ignore_index
    target = torch.where(valid, y, 0)
    if rule == "correct":
        right = [z.argmax(1) == target for z in logits]
        teaches = lambda r, s: valid & right[r] & ~right[s]  # noqa: E731
    elif rule == "confidence":
        ce = [F.cross_entropy(_opmath(z), target, reduction="none") for z in logits]
        teaches = lambda r, s: valid & (ce[r] < ce[s])  # noqa: E731
    else:  # "all": every peer at every valid pixel (DML)
        teaches = lambda r, s: valid  # noqa: E731
    return [[None if r == s else teaches(r, s) for s in range(k)] for r in range(k)]


def learner_masks(masks: Sequence[Sequence[torch.Tensor | None]]) -> list[torch.Tensor]:
    """Per student s, bool (N, H, W): where it learns from at least one peer, from :func:`peer_masks`'s ``m``."""
    k = len(masks)
    return [torch.stack([masks[r][s] for r in range(k) if r != s]).any(0) for s in range(k)]


def pixel_bsd_peers(logits: Sequence[torch.Tensor], y: torch.Tensor, *, temperature: float = 1.0,
                    rule: str = "correct", normalize: str = "valid", ignore_index: int = 255) -> list[torch.Tensor]:
    """Pixel-wise BSD with K students (METHOD.md §9 on §1): one scalar loss per student.

    At pixel i, student s learns from the peers ``R_s,i = {r : m[r][s]_i}`` (:func:`peer_masks`); its per-pixel
    term is the mean over ``R_s,i`` of ``T^2 KL(sg p_r,i || p_s,i)`` (0 where ``R_s,i`` is empty), and its loss is
    the sum of the terms over the valid pixels divided by ``n``: ``n_valid`` (``normalize="valid"``) or
    ``max(1, number of pixels where any peer teaches any student)`` (``"selected"``: the union of all ordered
    pairs' masks, which is §1's ``m_ab | m_ba`` at K = 2, and one ``n`` for every student as there).

    Student s's loss is differentiable w.r.t. ``logits[s]`` only (the teachers' probabilities are constants).
    Arithmetic in float32 (float64 for float64 logits), as :func:`ccl_ops.reference.pixel_selective_kl`.
    """
    t = check_temperature(temperature)
    check_choice("normalize", normalize, NORMALIZATIONS)
    masks = peer_masks(logits, y, rule=rule, ignore_index=ignore_index)  # checks logits, y and rule
    if not torch.compiler.is_compiling():
        check_label_values(y, logits[0].shape[1], ignore_index)
    valid = y != ignore_index
    log_p = [torch.log_softmax(_opmath(z) / t, dim=1) for z in logits]
    k = len(logits)
    if normalize == "valid":
        n = valid.sum()
    else:
        n = torch.stack(learner_masks(masks)).any(0).sum()  # where any peer teaches any student
    n = n.clamp(min=1).to(log_p[0].dtype)
    losses = []
    for s in range(k):
        peers = [r for r in range(k) if r != s]
        # KL(p_r || p_s) with p_r a constant, written as the reference writes it (K = 2 is then bitwise equal).
        kl = [(log_p[r].exp().detach() * (log_p[r].detach() - log_p[s])).sum(1) * masks[r][s] for r in peers]
        selected = torch.stack([masks[r][s] for r in peers]).sum(0).clamp(min=1)  # |R_s,i|, 1 where empty
        per_pixel = torch.stack(kl).sum(0) / selected
        # Multiply by the masks (not select) so that a NaN logit at a valid pixel reaches the loss, as in §1's op.
        losses.append(t * t * torch.where(valid, per_pixel, 0).sum() / n)
    return losses


class RegionTargets(NamedTuple):
    """Result of :func:`region_targets`."""

    target: torch.Tensor  # int64 (N, Hr, Wr): the student every other one learns from in the region, -1 for none
    scores: torch.Tensor  # float32 (N, K, Hr, Wr): each student's score (§2), NaN without valid pixels


class RegionRole(NamedTuple):
    """One student's part in region-wise BSD (:func:`region_roles`)."""

    learns: torch.Tensor  # bool (N, Hr, Wr): the student learns in the region (it is not the region's target)
    teacher: torch.Tensor  # int64 (N, Hr, Wr): whom it learns from there, -1 where it does not learn


def region_targets(logits: Sequence[torch.Tensor], y: torch.Tensor, *, region=(16, 16), score: str = "ce",
                   ignore_index: int = 255) -> RegionTargets:
    """Region-wise BSD's selection with K students (METHOD.md §9 on §2): in each region, the student whose score
    is strictly better than every other student's is the target of all the others; a tie for the best, or a
    region without a valid pixel, gives -1 (ties teach nobody).

    Each student's scores come from :func:`ccl_ops.region_direction_mask` once (students paired up: ceil(K/2) calls,
    not one per pair; a student's score depends on its own logits only), and a region's winner is the student that
    beats every peer in the comparison the op makes between two students' float32 scores (the CUDA kernel compares
    float64 logits' scores before rounding: K > 2 may then differ at a tie within float32 rounding), so that with
    K = 2 the target is exactly the op's direction (0 where ``d = +1``, 1 where ``d = -1``, -1 where ``d = 0``).
    Not differentiable.
    """
    k = check_peer_logits(logits, y)
    check_choice("score", score, SCORES)
    rh, rw = check_region(region)
    if k == 2:  # the op's own decision
        pair = region_direction_mask(logits[0], logits[1], y, region=(rh, rw), score=score, ignore_index=ignore_index)
        target = torch.where(pair.direction > 0, 0, torch.where(pair.direction < 0, 1, -1)).to(torch.int64)
        return RegionTargets(target, pair.scores)
    scores: list[torch.Tensor | None] = [None] * k
    for s in range(0, k, 2):
        r = s + 1 if s + 1 < k else 0  # an odd K pairs the last student with the first (its score again)
        pair = region_direction_mask(logits[s], logits[r], y, region=(rh, rw), score=score, ignore_index=ignore_index)
        scores[s], scores[r] = pair.scores[:, 0], pair.scores[:, 1]
    stacked = torch.stack(scores, 1)  # (N, K, Hr, Wr)
    # As the op: "a beats b" is a < b for cross-entropy, a > b for accuracy, false with a NaN.
    better = stacked if score == "accuracy" else -stacked
    wins = [torch.stack([better[:, s] > better[:, r] for r in range(k) if r != s]).all(0) for s in range(k)]
    target = torch.full_like(wins[0], -1, dtype=torch.int64)
    for s in range(k):
        target = torch.where(wins[s], s, target)
    return RegionTargets(target, stacked)


def region_roles(target: torch.Tensor, num_students: int) -> list[RegionRole]:
    """Per student s: where it learns (a target exists and is not s) and from whom (METHOD.md §9). With K = 2,
    student 0 (A) learns where ``d = -1`` from 1, and student 1 (B) where ``d = +1`` from 0."""
    if num_students < 2:
        raise ValueError(f"num_students must be K >= 2 (METHOD.md §9), got {num_students}")
    roles = []
    for s in range(num_students):
        learns = (target >= 0) & (target != s)
        roles.append(RegionRole(learns, torch.where(learns, target, -1)))
    return roles


@torch.no_grad()
def targets_on_grid(logits: Sequence[torch.Tensor], y: torch.Tensor, grid: tuple[int, int], *, region=(16, 16),
                    score: str = "ce", ignore_index: int = 255) -> torch.Tensor:
    """:func:`region_targets` on the label grid, resized to the common feature ``grid`` by nearest neighbour
    (METHOD.md §3), int64 (N, h, w); a region grid finer than ``grid`` is an error, as in
    :func:`ccl_ops.direction_on_grid`."""
    region = check_region(region)
    check_region_grid(region, tuple(y.shape[-2:]), tuple(grid))
    target = region_targets([z.detach() for z in logits], y, region=region, score=score,
                            ignore_index=ignore_index).target
    # Small integers are exact in float32, and nearest neighbour only copies them.
    return F.interpolate(target[:, None].float(), size=tuple(grid), mode="nearest")[:, 0].to(torch.int64)


def region_feature_losses(features: Sequence[torch.Tensor], target: torch.Tensor) -> list[torch.Tensor]:
    """Region-wise BSD's transfer with K students (METHOD.md §3 and §9): one loss per student,

        loss_s = 1 / |{cells with a target}| * sum over the cells where s learns of ||f_s - sg(f_target)||^2 / D

    ``features``: the K students' projected features on the common grid, each (N, D, h, w); ``target``: int64
    (N, h, w) from :func:`targets_on_grid` (-1: no target). With K = 2, ``loss_0 + loss_1`` is §3's
    ``loss_rbsd``; 0 when no cell has a target. The target's features are constants.
    """
    k = len(features) if isinstance(features, (list, tuple)) else 0
    if k < 2:
        raise ValueError(f"features must hold K >= 2 students' (N, D, h, w) features, got {k}")
    first = features[0]
    for s, f in enumerate(features):
        if not isinstance(f, torch.Tensor) or f.dim() != 4 or f.shape != first.shape:
            shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise ValueError(f"features[{s}] must be (N, D, h, w) with the shape of features[0] "
                             f"{tuple(first.shape)}, got {shape}")
    n, d, h, w = first.shape
    if tuple(target.shape) != (n, h, w):
        raise ValueError(f"target must have shape (N, h, w) = {(n, h, w)} to match the features, got "
                         f"{tuple(target.shape)}")
    teacher = torch.zeros_like(first)
    for s, f in enumerate(features):
        teacher = torch.where((target == s)[:, None], f.detach(), teacher)
    cells = (target >= 0).sum().clamp(min=1)
    losses = []
    for s, role in enumerate(region_roles(target, k)):
        per_cell = (features[s] - teacher).pow(2).sum(1) / d
        losses.append((role.learns.to(per_cell.dtype) * per_cell).sum() / cells)
    return losses
