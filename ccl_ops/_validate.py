"""Argument checks shared by the fused ops and the reference (same messages everywhere).

Only metadata is checked here (shapes, dtypes, devices, option values), so the checks cost nothing and trace
under ``torch.compile``. Label values are data: the fused kernels check them while they read them, and the
reference checks them in eager mode (:func:`check_label_values`).
"""
from __future__ import annotations

import math

import torch

from .types import LEARNERS, NORMALIZATIONS, RULES, SCORES

LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_logits(name: str, z) -> None:
    """One student's logits: a 4-D float tensor."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
    if z.dim() != 4:
        raise ValueError(f"{name} must be 4-D (N, C, H, W), got shape {tuple(z.shape)}")
    if z.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {z.dtype}")


def check_inputs(za: torch.Tensor, zb: torch.Tensor, y: torch.Tensor) -> None:
    for name, z in (("za", za), ("zb", zb)):
        _check_logits(name, z)
    if zb.shape != za.shape:
        raise ValueError(f"zb must have the shape of za {tuple(za.shape)}, got {tuple(zb.shape)}")
    if zb.dtype != za.dtype:
        raise TypeError(f"zb must have the dtype of za ({za.dtype}), got {zb.dtype}")
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
    if y.dtype != torch.int64:
        raise TypeError(f"y must be int64 labels, got {y.dtype}")
    n, c, h, w = za.shape
    if tuple(y.shape) != (n, h, w):
        raise ValueError(f"y must have shape (N, H, W) = {(n, h, w)} to match the logits, got {tuple(y.shape)}")
    if c < 1:
        raise ValueError(f"za must have at least one channel, got C = {c}")
    if zb.device != za.device or y.device != za.device:
        raise ValueError(f"za, zb and y must be on one device, got {za.device}, {zb.device}, {y.device}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is unknown; expected one of {', '.join(map(repr, choices))}")


def check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def check_region(region) -> tuple[int, int]:
    pair = (region, region) if isinstance(region, int) else tuple(region)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"region must be an int or a pair of ints (rh, rw), got {region!r}")
    if min(pair) < 1:
        raise ValueError(f"region sizes must be >= 1, got {region!r}")
    return pair


def check_region_grid(region: tuple[int, int], label_size: tuple[int, int], grid: tuple[int, int]) -> None:
    """METHOD.md §3: regions of ``region`` pixels on a ``label_size`` label grid must not be finer than the
    common feature ``grid`` (``rh >= H/h`` and ``rw >= W/w``), else the nearest-neighbour resize of the direction
    mask drops regions' decisions."""
    (rh, rw), (H, W), (h, w) = region, label_size, grid
    if rh * h < H or rw * w < W:
        raise ValueError(
            f"region={list(region)}: regions of {rh}x{rw} px on the {H}x{W} label grid form a "
            f"{-(-H // rh)}x{-(-W // rw)} region grid, finer than the {h}x{w} feature grid of region-wise BSD, so "
            f"resizing the mask would drop decisions; expected regions of at least {-(-H // h)}x{-(-W // w)} px "
            "(METHOD.md §3)")


def check_label_values(y: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise if a label is neither in [0, C) nor ignore_index (a data-dependent check: eager mode only)."""
    bad = (y != ignore_index) & ((y < 0) | (y >= num_classes))
    if bool(bad.any()):
        value = int(y[bad][0])
        raise ValueError(
            f"y contains label value {value}, which is neither in [0, {num_classes}) nor ignore_index={ignore_index}"
        )


def check_kl_call(za, zb, y, temperature, rule: str, normalize: str, learners: str = "both") -> float:
    """All metadata checks of pixel_selective_kl; returns the temperature as a float."""
    check_inputs(za, zb, y)
    check_choice("rule", rule, RULES)
    check_choice("normalize", normalize, NORMALIZATIONS)
    check_choice("learners", learners, LEARNERS)
    return check_temperature(temperature)


def check_region_call(za, zb, y, region, score: str) -> tuple[int, int]:
    """All metadata checks of region_direction_mask; returns the region size (rh, rw)."""
    check_inputs(za, zb, y)
    check_choice("score", score, SCORES)
    return check_region(region)


def check_peer_logits(logits, y: torch.Tensor | None) -> int:
    """The checks of the K-student losses (METHOD.md §9): ``logits`` is a list or tuple of K >= 2 logit tensors of
    one shape, dtype and device, and ``y`` their labels (not checked when None). Returns K. A student is named by
    its index, ``logits[s]``."""
    if isinstance(logits, torch.Tensor) or not isinstance(logits, (list, tuple)):
        raise ValueError(f"logits must be a list or tuple of K >= 2 students' (N, C, H, W) logits, got "
                         f"{type(logits).__name__}")
    k = len(logits)
    if k < 2:
        raise ValueError(f"logits must hold K >= 2 students' logits (METHOD.md §9), got K = {k}")
    first = logits[0]
    for s, z in enumerate(logits):
        name = f"logits[{s}]"
        _check_logits(name, z)
        if z.shape != first.shape:
            raise ValueError(f"{name} must have the shape of logits[0] {tuple(first.shape)}, got {tuple(z.shape)}")
        if z.dtype != first.dtype:
            raise TypeError(f"{name} must have the dtype of logits[0] ({first.dtype}), got {z.dtype}")
        if z.device != first.device:
            raise ValueError(f"{name} must be on the device of logits[0] ({first.device}), got {z.device}")
    if first.shape[1] < 1:
        raise ValueError(f"logits[0] must have at least one channel, got C = {first.shape[1]}")
    if y is not None:
        check_inputs(first, first, y)  # the labels against the (common) logit shape and device
    return k
