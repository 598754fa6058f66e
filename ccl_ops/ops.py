"""Public ops: dispatch to the compiled ``torch.ops.ccl`` kernels, or to the reference when there is none.

The compiled extension (``ccl_ops._C``) defines the schemas and the CPU/CUDA kernels; this module adds what the
dispatcher needs from Python: fake (meta) implementations for ``torch.compile`` and the autograd formula, whose
backward is its own custom op.
"""
from __future__ import annotations

import warnings

import torch

from . import reference
from ._validate import (check_choice, check_kl_call, check_label_values, check_peer_logits, check_region_call,
                        check_temperature)
from .types import NORMALIZATIONS, RULES, RegionMask, SelectiveKL, SelectiveKLPeers

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.ccl.*)

    _EXTENSION_ERROR = None
except ImportError as exc:  # the package still works, on the reference
    _EXTENSION_ERROR = exc

OPS = ("pixel_selective_kl", "pixel_selective_kl_peers", "region_direction_mask")
# Devices where pixel_selective_kl writes the gradients in its forward pass when the logits require grad. On a
# CPU the op is compute-bound: writing them while the probabilities are at hand saves the backward a second
# round of exponentials. On a GPU it is memory-bound: recomputing in the backward reads the logits once more,
# while the stored gradients would be read and written again to scale them, so the backward kernel recomputes.
FUSED_GRADIENT_DEVICES = frozenset({"cpu"})
# The most students pixel_selective_kl_peers takes (kMaxPeers in csrc/ops/kinds.h).
MAX_PEERS = 8


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
    learners: str = "both",
) -> SelectiveKL:
    """Pixel-wise selective KL, METHOD.md §1 (see :func:`ccl_ops.reference.pixel_selective_kl`).

    Where the logits require grad (on a CPU), the forward also writes the gradients of the losses, and the
    backward only scales them by the upstream gradient: the two logits-sized gradients are then held from the
    forward to the backward instead of being allocated in it.
    """
    t = check_kl_call(za, zb, y, temperature, rule, normalize, learners)
    if not _use_kernel(za.device):
        return reference.pixel_selective_kl(
            za, zb, y, temperature=t, rule=rule, normalize=normalize, ignore_index=ignore_index, learners=learners
        )
    fuse = torch.is_grad_enabled() and za.device.type in FUSED_GRADIENT_DEVICES
    grad_mask = [fuse and za.requires_grad and learners != "b", fuse and zb.requires_grad and learners != "a"]
    loss_a, loss_b, count_ab, count_ba, *_ = torch.ops.ccl.pixel_selective_kl(
        za, zb, y, t, rule, normalize, int(ignore_index), learners, grad_mask
    )
    return SelectiveKL(loss_a, loss_b, count_ab, count_ba)


def pixel_selective_kl_peers(
    logits,
    y: torch.Tensor,
    *,
    temperature: float = 1.0,
    rule: str = "correct",
    normalize: str = "valid",
    ignore_index: int = 255,
) -> SelectiveKLPeers:
    """Pixel-wise selective KL among K >= 2 students (METHOD.md §9 on §1) in one pass over the K logit tensors.

    ``logits``: a list of K (at most 8) (N, C, H, W) tensors of one shape, dtype and device. Student s learns at
    each pixel from the mean of the peers the two-student ``rule`` selects to teach it; ``losses[s]`` is the fused
    form of ``ccl_ops.peers.pixel_bsd_peers(...)[s]``, its plain-PyTorch reference (and this function's fallback
    where there is no kernel). With two students it equals :func:`pixel_selective_kl` (``[loss_a, loss_b]``).
    The gradients are written in the forward pass wherever a student's logits require grad (the kernel has them
    at hand; the backward scales them), so K logits-sized gradients are held from the forward to the backward.
    """
    k = check_peer_logits(logits, y)
    t = check_temperature(temperature)
    check_choice("rule", rule, RULES)
    check_choice("normalize", normalize, NORMALIZATIONS)
    if k > MAX_PEERS:
        raise ValueError(f"logits must hold at most {MAX_PEERS} students' logits for the fused op, got K = {k}")
    logits = list(logits)
    if not _use_kernel(logits[0].device):
        from .peers import learner_masks, peer_masks, pixel_bsd_peers

        losses = pixel_bsd_peers(logits, y, temperature=t, rule=rule, normalize=normalize, ignore_index=ignore_index)
        with torch.no_grad():
            masks = peer_masks([z.detach() for z in logits], y, rule=rule, ignore_index=ignore_index)
            counts = torch.stack([learns.sum() for learns in learner_masks(masks)])
        return SelectiveKLPeers(torch.stack(losses), counts)
    if not torch.compiler.is_compiling():
        check_label_values(y, logits[0].shape[1], ignore_index)
    grad_mask = [torch.is_grad_enabled() and z.requires_grad for z in logits]
    losses, counts, _, _ = torch.ops.ccl.pixel_selective_kl_peers(logits, y, t, rule, normalize, int(ignore_index),
                                                                  grad_mask)
    return SelectiveKLPeers(losses, counts)


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

    def _gradients_fake(za, zb, mask):
        return tuple(z.new_empty(z.shape) if needed else z.new_empty((0,)) for z, needed in zip((za, zb), mask))

    @torch.library.register_fake("ccl::pixel_selective_kl")
    def _pixel_selective_kl_fake(za, zb, y, temperature, rule, normalize, ignore_index, learners="both",
                                 grad_mask=(False, False)):
        acc = _opmath_dtype(za.dtype)
        n, _, h, w = za.shape
        return (
            za.new_empty((), dtype=acc),
            za.new_empty((), dtype=acc),
            za.new_empty((), dtype=torch.int64),
            za.new_empty((), dtype=torch.int64),
            za.new_empty((n, h, w), dtype=torch.uint8),
            za.new_empty((), dtype=acc),
            *_gradients_fake(za, zb, grad_mask),
        )

    @torch.library.register_fake("ccl::pixel_selective_kl_backward")
    def _pixel_selective_kl_backward_fake(grad_a, grad_b, za, zb, selection, norm, temperature, output_mask):
        return _gradients_fake(za, zb, output_mask)

    @torch.library.register_fake("ccl::region_direction_mask")
    def _region_direction_mask_fake(za, zb, y, region_h, region_w, score, ignore_index):
        n, _, h, w = za.shape
        hr, wr = -(-h // region_h), -(-w // region_w)
        return za.new_empty((n, hr, wr), dtype=torch.int8), za.new_empty((n, 2, hr, wr), dtype=torch.float32)

    def _setup_context(ctx, inputs, output):
        za, zb, _, temperature, _, _, _, learners, grad_mask = inputs  # defaults filled in by torch.library
        _, _, count_ab, count_ba, selection, norm, grad_za, grad_zb = output
        ctx.temperature = temperature
        ctx.learns = (learners != "b", learners != "a")
        ctx.mark_non_differentiable(count_ab, count_ba, selection, norm, grad_za, grad_zb)
        # Otherwise autograd would fill logits-sized zeros for the outputs that get no gradient (grad_za, grad_zb).
        ctx.set_materialize_grads(False)
        fused = [g if asked else None for g, asked in zip((grad_za, grad_zb), grad_mask)]
        if all(g is None or type(g) is torch.Tensor for g in fused):
            # Eager: the backward scales these in place, so they are kept out of save_for_backward (whose version
            # check would then refuse a second backward through a retained graph, which recomputes instead).
            ctx.save_for_backward(za, zb, selection, norm)
            ctx.fused = fused
        else:  # traced (torch.compile): saved as usual; the backward stays functional
            ctx.save_for_backward(za, zb, selection, norm, grad_za, grad_zb)
            ctx.fused = None
        ctx.grad_mask = list(grad_mask)

    def _scaled(grad: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
        """grad * upstream: as is when upstream is 1 (CPU), in place on a plain tensor, functional when traced."""
        upstream = upstream.detach()
        if type(grad) is not torch.Tensor:
            return grad * upstream
        if grad.device.type == "cpu" and upstream.device.type == "cpu" and upstream.item() == 1.0:
            return grad
        return grad.mul_(upstream)

    def _backward(ctx, grad_a, grad_b, *_):
        za, zb, selection, norm, *traced = ctx.saved_tensors
        fused = ctx.fused if ctx.fused is not None else [g if m else None for g, m in zip(traced, ctx.grad_mask)]
        upstream = (grad_a, grad_b)
        # A student gets a gradient where its loss is computed, needed and used.
        wanted = [ctx.needs_input_grad[i] and ctx.learns[i] and upstream[i] is not None for i in range(2)]
        grads = [_scaled(fused[i], upstream[i]) if wanted[i] and fused[i] is not None else None for i in range(2)]
        if ctx.fused is not None:
            ctx.fused = [None, None]  # handed out (and maybe scaled): a second backward recomputes
        recompute = [wanted[i] and grads[i] is None for i in range(2)]
        if any(recompute):
            g = [norm.new_zeros(()) if u is None else u for u in upstream]
            again = torch.ops.ccl.pixel_selective_kl_backward(
                g[0], g[1], za, zb, selection, norm, ctx.temperature, recompute
            )
            grads = [again[i] if recompute[i] else grads[i] for i in range(2)]
        return (grads[0], grads[1]) + (None,) * 7

    torch.library.register_autograd("ccl::pixel_selective_kl", _backward, setup_context=_setup_context)

    @torch.library.register_fake("ccl::pixel_selective_kl_peers")
    def _pixel_selective_kl_peers_fake(logits, y, temperature, rule, normalize, ignore_index, grad_mask):
        z = logits[0]
        acc = _opmath_dtype(z.dtype)
        k = len(logits)
        grads = [x.new_empty(x.shape) if needed else x.new_empty((0,)) for x, needed in zip(logits, grad_mask)]
        return z.new_empty((k,), dtype=acc), z.new_empty((k,), dtype=torch.int64), z.new_empty((), dtype=acc), grads

    def _peers_setup_context(ctx, inputs, output):
        logits, y, temperature, rule, normalize, ignore_index, grad_mask = inputs
        _, counts, norm, grads = output
        ctx.mark_non_differentiable(counts, norm, *grads)
        ctx.set_materialize_grads(False)
        ctx.options = (temperature, rule, normalize, ignore_index)
        fused = [g if asked else None for g, asked in zip(grads, grad_mask)]
        if all(g is None or type(g) is torch.Tensor for g in fused):  # eager: handed out once (see _setup_context)
            ctx.save_for_backward(y, *logits)
            ctx.fused = fused
        else:  # traced (torch.compile): saved as usual; the backward stays functional
            ctx.save_for_backward(y, *logits, *(g for g in fused if g is not None))
            ctx.fused = None
        ctx.grad_mask = list(grad_mask)

    def _peers_backward(ctx, grad_losses, *_):
        y, *saved = ctx.saved_tensors
        k = len(ctx.grad_mask)
        logits, traced = saved[:k], iter(saved[k:])
        fused = ctx.fused if ctx.fused is not None else [next(traced) if m else None for m in ctx.grad_mask]
        needs = ctx.needs_input_grad[0]  # one flag per student (a Tensor[] input)
        wanted = [bool(needs[s]) and grad_losses is not None for s in range(k)]
        grads = [_scaled(fused[s], grad_losses[s]) if wanted[s] and fused[s] is not None else None for s in range(k)]
        if ctx.fused is not None:
            ctx.fused = [None] * k  # handed out (and maybe scaled): a second backward recomputes
        recompute = [wanted[s] and grads[s] is None for s in range(k)]
        if any(recompute):
            again = torch.ops.ccl.pixel_selective_kl_peers(list(logits), y, *ctx.options, recompute)[3]
            grads = [again[s] * grad_losses[s] if recompute[s] else grads[s] for s in range(k)]
        return grads, None, None, None, None, None, None

    torch.library.register_autograd("ccl::pixel_selective_kl_peers", _peers_backward,
                                    setup_context=_peers_setup_context)
