"""ccl_ops: fused ops and losses for CNN-Transformer collaborative learning (ICCV 2023), METHOD.md §1-3.

``pixel_selective_kl`` and ``region_direction_mask`` run as ``torch.ops.ccl`` custom ops with fused C++ (CPU)
and CUDA kernels when the compiled extension is present, and fall back to the pure-PyTorch implementations in
:mod:`ccl_ops.reference` (with one warning) when it is not; :func:`backend` says which serves a device.
Their option values and result types are in :mod:`ccl_ops.types`; :mod:`ccl_ops.resize` brings logits to the
label grid, which the ops expect. :mod:`ccl_ops.peers` holds the K-student forms of pixel- and region-wise BSD
(METHOD.md §9), the reference of the fused ``pixel_selective_kl_peers``.
"""
from . import reference
from .losses import (PixelBSDLoss, RegionBSDLoss, RegionBSDOutput, RegionBSDPeersLoss, RegionBSDPeersOutput,
                     direction_on_grid)
from .ops import KERNEL_DEVICES, MAX_PEERS, backend, pixel_selective_kl, pixel_selective_kl_peers, region_direction_mask
from .peers import (RegionRole, RegionTargets, learner_masks, peer_masks, pixel_bsd_peers, region_feature_losses,
                    region_roles, region_targets, targets_on_grid)
from .resize import resize_bilinear, to_label_size
from .types import LEARNERS, NORMALIZATIONS, RULES, SCORES, RegionMask, SelectiveKL, SelectiveKLPeers

__all__ = [
    "KERNEL_DEVICES",
    "LEARNERS",
    "MAX_PEERS",
    "NORMALIZATIONS",
    "PixelBSDLoss",
    "RULES",
    "RegionBSDLoss",
    "RegionBSDPeersLoss",
    "RegionBSDPeersOutput",
    "RegionBSDOutput",
    "RegionMask",
    "RegionRole",
    "RegionTargets",
    "SCORES",
    "SelectiveKL",
    "SelectiveKLPeers",
    "backend",
    "direction_on_grid",
    "learner_masks",
    "peer_masks",
    "pixel_bsd_peers",
    "pixel_selective_kl",
    "pixel_selective_kl_peers",
    "reference",
    "region_direction_mask",
    "region_feature_losses",
    "region_roles",
    "region_targets",
    "resize_bilinear",
    "targets_on_grid",
    "to_label_size",
]
