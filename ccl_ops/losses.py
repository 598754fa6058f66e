"""Thin ``nn.Module`` wrappers over the ops: pixel-wise BSD (METHOD.md §1) and region-wise BSD (§3).

The ops never resize; these modules bring logits to the label grid (bilinear), as METHOD.md asks callers.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._validate import check_region, check_region_grid
from .ops import pixel_selective_kl, region_direction_mask
from .resize import to_label_size
from .types import SelectiveKL


class PixelBSDLoss(nn.Module):
    """Pixel-wise bidirectional selective distillation. ``forward`` returns :class:`SelectiveKL`; use ``.total``."""

    def __init__(self, temperature: float = 1.0, rule: str = "correct", normalize: str = "valid",
                 ignore_index: int = 255):
        super().__init__()
        self.temperature, self.rule, self.normalize, self.ignore_index = temperature, rule, normalize, ignore_index

    def forward(self, za: torch.Tensor, zb: torch.Tensor, y: torch.Tensor) -> SelectiveKL:
        return pixel_selective_kl(
            to_label_size(za, y), to_label_size(zb, y), y, temperature=self.temperature, rule=self.rule,
            normalize=self.normalize, ignore_index=self.ignore_index,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, rule={self.rule!r}, normalize={self.normalize!r}"


@torch.no_grad()
def direction_on_grid(za: torch.Tensor, zb: torch.Tensor, y: torch.Tensor, grid: tuple[int, int], *,
                      region=(16, 16), score: str = "ce", ignore_index: int = 255) -> torch.Tensor:
    """The region direction mask as region-wise BSD uses it (METHOD.md §3): computed on the label grid, then
    resized to the common feature ``grid`` by nearest neighbour; float ``(N, h, w)`` of -1, 0, +1. A region grid
    finer than ``grid`` is an error."""
    region = check_region(region)
    check_region_grid(region, tuple(y.shape[-2:]), tuple(grid))
    mask = region_direction_mask(to_label_size(za.detach(), y), to_label_size(zb.detach(), y), y, region=region,
                                 score=score, ignore_index=ignore_index).direction
    return F.interpolate(mask[:, None].float(), size=tuple(grid), mode="nearest")[:, 0]


class RegionBSDOutput(NamedTuple):
    loss: torch.Tensor  # scalar
    direction: torch.Tensor  # int8 (N, h, w): the region mask on the feature grid (+1 A teaches B, -1 B teaches A)
    norm_a: torch.Tensor  # detached mean L2 norm of A's projected feature over the cells (a collapse shows here)
    norm_b: torch.Tensor


class RegionBSDLoss(nn.Module):
    """Region-wise BSD (METHOD.md §3): masked feature MSE between projected last encoder features.

    Each student's feature goes through its own 1x1 projection to ``dim`` channels and is resized (bilinear) to a
    common grid: ``grid`` if given, else the finer of the two feature grids. The direction mask of
    :func:`region_direction_mask` (computed on the label grid) is resized to that grid by nearest neighbour
    (:meth:`direction_on_grid`); a region grid finer than the common grid is an error, since the resize would drop
    decisions. The learner's projection gets the gradient; the teacher side is detached.
    """

    def __init__(self, channels_a: int, channels_b: int, dim: int = 128, grid: tuple[int, int] | None = None,
                 region=(16, 16), score: str = "ce", ignore_index: int = 255):
        super().__init__()
        self.proj_a = nn.Conv2d(channels_a, dim, kernel_size=1)
        self.proj_b = nn.Conv2d(channels_b, dim, kernel_size=1)
        self.dim, self.grid = dim, grid
        self.region, self.score, self.ignore_index = check_region(region), score, ignore_index

    def common_grid(self, ga: torch.Tensor, gb: torch.Tensor) -> tuple[int, int]:
        return tuple(self.grid or max(ga.shape[-2:], gb.shape[-2:], key=lambda s: s[0] * s[1]))

    def forward(self, ga: torch.Tensor, gb: torch.Tensor, za: torch.Tensor, zb: torch.Tensor,
                y: torch.Tensor) -> RegionBSDOutput:
        grid = self.common_grid(ga, gb)
        d = direction_on_grid(za, zb, y, grid, region=self.region, score=self.score, ignore_index=self.ignore_index)
        fa = F.interpolate(self.proj_a(ga), size=grid, mode="bilinear", align_corners=False)
        fb = F.interpolate(self.proj_b(gb), size=grid, mode="bilinear", align_corners=False)
        a_teaches = (d > 0).to(fa.dtype)
        b_teaches = (d < 0).to(fa.dtype)
        per_cell_b = (fb - fa.detach()).pow(2).sum(1) / self.dim  # B learns where A teaches
        per_cell_a = (fa - fb.detach()).pow(2).sum(1) / self.dim
        cells = (a_teaches + b_teaches).sum().clamp(min=1)
        loss = (a_teaches * per_cell_b + b_teaches * per_cell_a).sum() / cells
        norm_a, norm_b = (f.detach().float().norm(dim=1).mean() for f in (fa, fb))
        return RegionBSDOutput(loss, d.to(torch.int8), norm_a, norm_b)


class RegionBSDPeersOutput(NamedTuple):
    loss: torch.Tensor  # scalar: the sum of the students' terms (METHOD.md §9 on §3)
    target: torch.Tensor  # int64 (N, h, w): the teaching student of each cell of the feature grid, -1: none
    norms: torch.Tensor  # detached (K,): mean L2 norm of each student's projected feature over the cells


class RegionBSDPeersLoss(nn.Module):
    """Region-wise BSD among K >= 2 students (METHOD.md §9): each student's last feature through its own 1x1
    projection to ``dim`` channels, resized to the common grid (the finest of the students' feature grids unless
    ``grid``); in each region the best-scoring student (:func:`ccl_ops.peers.region_targets`, resized by nearest
    neighbour) is the target of every other student (:func:`ccl_ops.peers.region_feature_losses`).
    With two students use :class:`RegionBSDLoss` (the same loss, reduced in one sum)."""

    def __init__(self, channels: Sequence[int], dim: int = 128, grid: tuple[int, int] | None = None,
                 region=(16, 16), score: str = "ce", ignore_index: int = 255):
        super().__init__()
        self.projs = nn.ModuleList(nn.Conv2d(c, dim, kernel_size=1) for c in channels)
        self.dim, self.grid = dim, grid
        self.region, self.score, self.ignore_index = check_region(region), score, ignore_index

    def forward(self, features: Sequence[torch.Tensor], logits: Sequence[torch.Tensor],
                y: torch.Tensor) -> RegionBSDPeersOutput:
        from .peers import region_feature_losses, targets_on_grid

        grid = tuple(self.grid or max((f.shape[-2:] for f in features), key=lambda s: s[0] * s[1]))
        target = targets_on_grid(logits, y, grid, region=self.region, score=self.score, ignore_index=self.ignore_index)
        projected = [F.interpolate(p(f), size=grid, mode="bilinear", align_corners=False)
                     for p, f in zip(self.projs, features)]
        losses = region_feature_losses(projected, target)
        norms = torch.stack([f.detach().float().norm(dim=1).mean() for f in projected])
        return RegionBSDPeersOutput(sum(losses[1:], losses[0]), target, norms)
