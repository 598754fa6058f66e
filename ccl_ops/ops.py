"""Public ops: dispatch to the compiled ``torch.ops.ccl`` kernels, or to the reference when there is none.

The compiled extension (``ccl_ops._C``) defines the schemas and the CPU/CUDA kernels; this module adds what the
dispatcher needs from Python: fake (meta) implementations for ``torch.compile`` and the autograd formula, whose
backward is its own custom op.
"""
from __future__ import annotations

import warnings

import torch

from . import reference
from ._validate import check_kl_call, check_region_call
from .types import RegionMask, SelectiveKL

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.ccl.*)

    _EXTENSION_ERROR = None
except ImportError as exc:  # the package still works, on the reference
    _EXTENSION_ERROR = exc

OPS = ("pixel_selective_kl", "region_direction_mask")


def _kernel_devices() -> frozenset[str]:
    """Device types for which every op has a compiled kernel (computed once: a plain set is traceable)."""
    if _EXTENSION_ERROR is not None:
        return frozenset()
    found = set()
    for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA")):
        if all(torch._C._dispatch_has_kernel_for_dispatch_key(f"ccl::{op}", key) for op in OPS):
            found.add(device_type)
    return frozenset(found)


KERNEL_DEVICES = _kernel_devices()
_warned: set[str] = set()


def backend(device) -> str:
    """Which implementation serves ``device``: ``"cuda"``, ``"cpu-fused"`` or ``"reference"``."""
    device_type = torch.device(device).type
    if device_type in KERNEL_DEVICES:
        return "cuda" if device_type == "cuda" else "cpu-fused"
    return "reference"


def _use_kernel(device: torch.device) -> bool:
    if device.type in KERNEL_DEVICES:
        return True
    if device.type not in _warned and not torch.compiler.is_compiling():
        _warned.add(device.type)
        why = f"the extension failed to load: {_EXTENSION_ERROR}" if _EXTENSION_ERROR else "it has no kernel for it"
        warnings.warn(
            f"ccl_ops: no compiled kernel for device type '{device.type}' ({why}); using the pure-PyTorch reference",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


def pixel_selective_kl(
    za: torch.Tensor,
    zb: torch.Tensor,
    y: torch.Tensor,
    *,
    temperature: float = 1.0,
    rule: str = "correct",
    normalize: str = "valid",
    ignore_index: int = 255,
) -> SelectiveKL:
    """Pixel-wise selective KL, METHOD.md §1 (see :func:`ccl_ops.reference.pixel_selective_kl`)."""
    t = check_kl_call(za, zb, y, temperature, rule, normalize)
    if not _use_kernel(za.device):
        return reference.pixel_selective_kl(
            za, zb, y, temperature=t, rule=rule, normalize=normalize, ignore_index=ignore_index
        )
    loss_a, loss_b, count_ab, count_ba, _, _ = torch.ops.ccl.pixel_selective_kl(
        za, zb, y, t, rule, normalize, int(ignore_index)
    )
    return SelectiveKL(loss_a, loss_b, count_ab, count_ba)


def region_direction_mask(
    za: torch.Tensor,
    zb: torch.Tensor,
    y: torch.Tensor,
    *,
    region=(16, 16),
    score: str = "ce",
    ignore_index: int = 255,
) -> RegionMask:
    """Region direction masks, METHOD.md §2 (see :func:`ccl_ops.reference.region_direction_mask`)."""
    rh, rw = check_region_call(za, zb, y, region, score)
    if not _use_kernel(za.device):
        return reference.region_direction_mask(za, zb, y, region=(rh, rw), score=score, ignore_index=ignore_index)
    direction, scores = torch.ops.ccl.region_direction_mask(za, zb, y, rh, rw, score, int(ignore_index))
    return RegionMask(direction, scores)


def _opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


if _EXTENSION_ERROR is None:

    @torch.library.register_fake("ccl::pixel_selective_kl")
    def _pixel_selective_kl_fake(za, zb, y, temperature, rule, normalize, ignore_index):
        acc = _opmath_dtype(za.dtype)
        n, _, h, w = za.shape
        return (
            za.new_empty((), dtype=acc),
            za.new_empty((), dtype=acc),
            za.new_empty((), dtype=torch.int64),
            za.new_empty((), dtype=torch.int64),
            za.new_empty((n, h, w), dtype=torch.uint8),
            za.new_empty((), dtype=acc),
        )

    @torch.library.register_fake("ccl::pixel_selective_kl_backward")
    def _pixel_selective_kl_backward_fake(grad_a, grad_b, za, zb, selection, norm, temperature, output_mask):
        return tuple(
            z.new_empty(z.shape) if needed else z.new_empty((0,)) for z, needed in zip((za, zb), output_mask)
        )

    @torch.library.register_fake("ccl::region_direction_mask")
    def _region_direction_mask_fake(za, zb, y, region_h, region_w, score, ignore_index):
        n, _, h, w = za.shape
        hr, wr = -(-h // region_h), -(-w // region_w)
        return za.new_empty((n, hr, wr), dtype=torch.int8), za.new_empty((n, 2, hr, wr), dtype=torch.float32)

    def _setup_context(ctx, inputs, output):
        za, zb, _, temperature, *_ = inputs
        _, _, count_ab, count_ba, selection, norm = output
        ctx.save_for_backward(za, zb, selection, norm)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(count_ab, count_ba, selection, norm)

    def _backward(ctx, grad_a, grad_b, *_):
        za, zb, selection, norm = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_a or need_b):
            return (None,) * 7
        grad_a = norm.new_zeros(()) if grad_a is None else grad_a
        grad_b = norm.new_zeros(()) if grad_b is None else grad_b
        grad_za, grad_zb = torch.ops.ccl.pixel_selective_kl_backward(
            grad_a, grad_b, za, zb, selection, norm, ctx.temperature, [need_a, need_b]
        )
        return (grad_za if need_a else None, grad_zb if need_b else None) + (None,) * 5

    torch.library.register_autograd("ccl::pixel_selective_kl", _backward, setup_context=_setup_context)
