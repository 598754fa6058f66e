"""ccl_ops: fused ops and losses for CNN-Transformer collaborative learning (ICCV 2023), METHOD.md §1-3.

``pixel_selective_kl`` and ``region_direction_mask`` run as ``torch.ops.ccl`` custom ops with fused C++ (CPU)
and CUDA kernels when the compiled extension is present, and fall back to the pure-PyTorch implementations in
:mod:`ccl_ops.reference` (with one warning) when it is not; :func:`backend` says which serves a device.
Their option values and result types are in :mod:`ccl_ops.types`; :mod:`ccl_ops.resize` brings logits to the
label grid, which the ops expect.
"""
from . import reference
from .losses import PixelBSDLoss, RegionBSDLoss, RegionBSDOutput, direction_on_grid
from .ops import KERNEL_DEVICES, backend, pixel_selective_kl, region_direction_mask
from .resize import resize_bilinear, to_label_size
from .types import LEARNERS, NORMALIZATIONS, RULES, SCORES, RegionMask, SelectiveKL

__all__ = [
    "KERNEL_DEVICES",
    "LEARNERS",
    "NORMALIZATIONS",
    "PixelBSDLoss",
    "RULES",
    "RegionBSDLoss",
    "RegionBSDOutput",
    "RegionMask",
    "SCORES",
    "SelectiveKL",
    "backend",
    "direction_on_grid",
    "pixel_selective_kl",
    "reference",
    "region_direction_mask",
    "resize_bilinear",
    "to_label_size",
]
