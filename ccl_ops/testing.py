"""Inputs and tolerances for checking and timing the ccl ops: one kit for the tests, the kernel benchmark
(``ccl-bench kernels``) and the GPU scripts in ``benchmarks/gpu``.

:func:`make_inputs` builds a pair of student logits and labels where each student is right on about half the
pixels (so that both directions of teaching occur), in any dtype, device and memory layout (:func:`make_peer_inputs`
K students); :data:`LOSS_TOL`,
:data:`GRAD_TOL` and :data:`SCORE_TOL` are the per-dtype tolerances of the fused ops against the float64
reference. Needs only torch (no pytest, no hypothesis).
"""
from __future__ import annotations

import torch

from ._validate import LOGIT_DTYPES

DTYPES = LOGIT_DTYPES  # every logit dtype the ops accept
DTYPE_BY_NAME = {str(dtype).removeprefix("torch."): dtype for dtype in DTYPES}  # "float32" -> torch.float32
LAYOUTS = ("contiguous", "channels_last", "strided")

# Per-dtype tolerances against the float64 reference. Losses are accumulated in float32 whatever the input;
# gradients come back in the input dtype, so they carry its rounding.
LOSS_TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-10),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.float16: dict(rtol=2e-5, atol=2e-6),
    torch.bfloat16: dict(rtol=2e-5, atol=2e-6),
}
# Gradient atol is relative to the largest reference gradient (T / n * |g| sets their scale): the kernels'
# vectorised exp has about 2e-6 relative error.
GRAD_TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=8e-3),
}
SCORE_TOL = {dtype: dict(rtol=2e-5, atol=2e-5) for dtype in DTYPES}


def with_layout(z: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``z`` in another memory layout (one of :data:`LAYOUTS`)."""
    if layout == "channels_last":
        return z.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other element of a wider, transposed buffer: no stride is 1
        n, c, h, w = z.shape
        wide = torch.zeros(n, c, w, 2 * h, dtype=z.dtype, device=z.device).transpose(2, 3)
        wide[:, :, ::2] = z
        return wide[:, :, ::2]
    return z.contiguous()


def make_inputs(seed: int, n: int, c: int, h: int, w: int, dtype: torch.dtype = torch.float32, scale: float = 3.0,
                ignore_frac: float = 0.2, device="cpu", layout: str = "contiguous", ignore_index: int = 255,
                right_frac: float = 0.5):
    """Logits ``za``, ``zb`` (N, C, H, W) and labels ``y`` (N, H, W), the same for the same arguments anywhere.

    The logits are standard normal times ``scale``, drawn in float64 on the CPU from ``seed`` and then cast to
    ``dtype``, moved to ``device`` and laid out as ``layout``. Each student independently gets ``2 * scale``
    added to the labelled class on a ``right_frac`` share of the pixels (so it is right there, and both
    directions of teaching occur); ``right_frac=0`` leaves the logits plain noise. A share ``ignore_frac`` of
    the labels is ``ignore_index``.
    """
    (za, zb), y = make_peer_inputs(seed, 2, n, c, h, w, dtype, scale, ignore_frac, device, layout, ignore_index,
                                   right_frac)
    return za, zb, y


def make_peer_inputs(seed: int, k: int, n: int, c: int, h: int, w: int, dtype: torch.dtype = torch.float32,
                     scale: float = 3.0, ignore_frac: float = 0.2, device="cpu", layout: str = "contiguous",
                     ignore_index: int = 255, right_frac: float = 0.5):
    """``k`` students' logits (a list) and their labels, drawn as :func:`make_inputs` draws two (which it is,
    with ``k = 2``: the same random stream)."""
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * scale for _ in range(k)]
    y = torch.randint(0, c, (n, h, w), generator=g)
    if right_frac:
        boost = torch.rand(k, n, h, w, generator=g) < right_frac
        for z, b in zip(logits, boost):
            z.scatter_add_(1, y[:, None], b[:, None].double() * 2.0 * scale)
    y[torch.rand(n, h, w, generator=g) < ignore_frac] = ignore_index
    to = dict(device=device, dtype=dtype)
    return [with_layout(z.to(**to), layout) for z in logits], y.to(device)
