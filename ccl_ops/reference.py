"""Pure-PyTorch reference implementations of the ccl ops (METHOD.md §1-2).

They are the ground truth of the property tests, the fallback when the compiled extension is missing, and the
"eager" and "torch.compile" peers of the kernel benchmark. They favour clarity over speed: every intermediate is
materialised. Arithmetic runs in float32 (float64 for float64 inputs), as the fused kernels do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validate import check_kl_call, check_label_values, check_region_call
from .types import RegionMask, SelectiveKL


def _opmath(z: torch.Tensor) -> torch.Tensor:
    return z.double() if z.dtype == torch.float64 else z.float()


def selection_masks(za, zb, y, rule: str, ignore_index: int):
    """Boolean masks (m_ab, m_ba, valid) of METHOD.md §1 for (N, C, H, W) logits and (N, H, W) labels."""
    valid = y != ignore_index
    if rule == "all":
        return valid, valid, valid
    target = torch.where(valid, y, 0)
    if rule == "correct":
        right_a = za.argmax(1) == target
        right_b = zb.argmax(1) == target
        return valid & right_a & ~right_b, valid & right_b & ~right_a, valid
    ce_a = F.cross_entropy(_opmath(za), target, reduction="none")
    ce_b = F.cross_entropy(_opmath(zb), target, reduction="none")
    return valid & (ce_a < ce_b), valid & (ce_b < ce_a), valid


def pixel_selective_kl_math(za, zb, y, temperature: float, rule: str, normalize: str, ignore_index: int,
                            learners: str = "both"):
    """The arithmetic of :func:`pixel_selective_kl` without argument checks (this is what gets compiled)."""
    m_ab, m_ba, valid = selection_masks(za, zb, y, rule, ignore_index)
    t = temperature
    log_pa = torch.log_softmax(_opmath(za) / t, dim=1)
    log_pb = torch.log_softmax(_opmath(zb) / t, dim=1)
    # The teacher side of each KL is a constant (stop-gradient is part of the op).
    kl_ab = (log_pa.exp().detach() * (log_pa.detach() - log_pb)).sum(1)  # KL(p_a || p_b): B learns
    kl_ba = (log_pb.exp().detach() * (log_pb.detach() - log_pa)).sum(1)  # KL(p_b || p_a): A learns
    if normalize == "valid":
        n = valid.sum()
    else:
        n = (m_ab | m_ba).sum()
    n = n.clamp(min=1).to(log_pa.dtype)
    # Multiply (not select) so that a NaN logit at any valid pixel reaches the loss; ignored pixels never count.
    loss_b = t * t * torch.where(valid, kl_ab * m_ab, 0).sum() / n
    loss_a = t * t * torch.where(valid, kl_ba * m_ba, 0).sum() / n
    # A loss that is not asked for is 0 (and carries no gradient); counts and n do not depend on learners.
    zero = n.new_zeros(())
    return SelectiveKL(loss_a if learners != "b" else zero, loss_b if learners != "a" else zero,
                       m_ab.sum(), m_ba.sum())


def pixel_selective_kl(
    za: torch.Tensor,
    zb: torch.Tensor,
    y: torch.Tensor,
    *,
    temperature: float = 1.0,
    rule: str = "correct",
    normalize: str = "valid",
    ignore_index: int = 255,
    learners: str = "both",
) -> SelectiveKL:
    """Pixel-wise selective KL (METHOD.md §1): each student learns from the other only where the other is reliable.

    ``rule`` picks who teaches where: ``"correct"`` (the teacher's argmax is right and the learner's is wrong),
    ``"confidence"`` (the teacher's cross-entropy is strictly lower) or ``"all"`` (both directions at every valid
    pixel: DML). ``normalize`` divides by the number of valid (``"valid"``) or selected (``"selected"``) pixels.
    ``learners`` (``"both"``, ``"a"`` or ``"b"``) names the losses computed; the other comes back as 0 (KDCL
    needs only the student's loss against its teacher). Counts and the normaliser do not depend on it.
    """
    t = check_kl_call(za, zb, y, temperature, rule, normalize, learners)
    if not torch.compiler.is_compiling():
        check_label_values(y, za.shape[1], ignore_index)
    return pixel_selective_kl_math(za, zb, y, t, rule, normalize, int(ignore_index), learners)


def region_direction_mask_math(za, zb, y, region_h: int, region_w: int, score: str, ignore_index: int):
    """The arithmetic of :func:`region_direction_mask` without argument checks."""
    n, c, h, w = za.shape
    valid = y != ignore_index
    target = torch.where(valid, y, 0)
    if score == "ce":
        per_pixel = [F.cross_entropy(_opmath(z), target, reduction="none") for z in (za, zb)]
    else:
        per_pixel = [(z.argmax(1) == target).to(torch.float64 if z.dtype == torch.float64 else torch.float32)
                     for z in (za, zb)]
    stacked = torch.stack([torch.where(valid, s, 0) for s in per_pixel], 1)  # (N, 2, H, W)
    counts = valid.unsqueeze(1).to(stacked.dtype)
    hr, wr = -(-h // region_h), -(-w // region_w)
    pad = (0, wr * region_w - w, 0, hr * region_h - h)

    def region_sum(t):
        t = F.pad(t, pad).reshape(n, t.shape[1], hr, region_h, wr, region_w)
        return t.sum((3, 5))

    scores = region_sum(stacked) / region_sum(counts)  # 0 / 0 = NaN where a region has no valid pixel
    a_better = scores[:, 0] < scores[:, 1] if score == "ce" else scores[:, 0] > scores[:, 1]
    b_better = scores[:, 1] < scores[:, 0] if score == "ce" else scores[:, 1] > scores[:, 0]
    direction = a_better.to(torch.int8) - b_better.to(torch.int8)
    return RegionMask(direction, scores.float())


def region_direction_mask(
    za: torch.Tensor,
    zb: torch.Tensor,
    y: torch.Tensor,
    *,
    region=(16, 16),
    score: str = "ce",
    ignore_index: int = 255,
) -> RegionMask:
    """Region direction masks (METHOD.md §2): which student teaches each ``rh x rw`` region of the label grid."""
    rh, rw = check_region_call(za, zb, y, region, score)
    if not torch.compiler.is_compiling():
        check_label_values(y, za.shape[1], ignore_index)
    return region_direction_mask_math(za, zb, y, rh, rw, score, int(ignore_index))
