"""Bilinear resizing of logits and features, the one way every caller brings them to a common grid.

The ops never resize (METHOD.md asks callers to bring logits to the label grid first); the loss modules, the
methods and the engine all do it through these helpers, so that they agree to the bit.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def resize_bilinear(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``x`` (N, C, H, W) resized to ``size`` = (H', W') (bilinear, corners not aligned); ``x`` itself when it
    already has that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def to_label_size(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Logits ``z`` (N, C, h, w) on the grid of the labels ``y`` (N, H, W)."""
    return resize_bilinear(z, y.shape[-2:])
