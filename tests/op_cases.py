"""Input builders and tolerances shared by the op tests."""
from __future__ import annotations

import torch
from hypothesis import strategies as st

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
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
    """The same values as ``z`` in another memory layout."""
    if layout == "channels_last":
        return z.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other element of a wider, transposed buffer: no stride is 1
        n, c, h, w = z.shape
        wide = torch.zeros(n, c, w, 2 * h, dtype=z.dtype, device=z.device).transpose(2, 3)
        wide[:, :, ::2] = z
        return wide[:, :, ::2]
    return z.contiguous()


def make_inputs(seed, n, c, h, w, dtype, scale=3.0, ignore_frac=0.2, device="cpu", layout="contiguous",
                ignore_index=255):
    g = torch.Generator().manual_seed(seed)
    za = torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * scale
    zb = torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * scale
    # Make the students often right, so that both directions of transfer occur.
    y = torch.randint(0, c, (n, h, w), generator=g)
    boost = torch.rand(2, n, h, w, generator=g) < 0.5
    for z, b in ((za, boost[0]), (zb, boost[1])):
        z.scatter_add_(1, y[:, None], b[:, None].double() * 2.0 * scale)
    y[torch.rand(n, h, w, generator=g) < ignore_frac] = ignore_index
    to = dict(device=device, dtype=dtype)
    return with_layout(za.to(**to), layout), with_layout(zb.to(**to), layout), y.to(device)


shapes = st.tuples(
    st.integers(1, 3), st.integers(1, 7), st.integers(1, 19), st.integers(1, 21)
)  # N, C, H, W: odd sizes and tiles that do not divide them
