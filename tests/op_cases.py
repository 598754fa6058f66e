"""Hypothesis strategies of the op tests (the inputs and tolerances themselves are in :mod:`ccl_ops.testing`)."""
from __future__ import annotations

from hypothesis import strategies as st

shapes = st.tuples(
    st.integers(1, 3), st.integers(1, 7), st.integers(1, 19), st.integers(1, 21)
)  # N, C, H, W: odd sizes and tiles that do not divide them

# Widths that are whole multiples of 16 pixels, where the CPU region kernel reads float NCHW logits in place.
wide_shapes = st.tuples(st.integers(1, 2), st.integers(1, 7), st.integers(1, 9), st.sampled_from((16, 32, 48)))
