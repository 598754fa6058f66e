"""Hypothesis strategies of the op tests (the inputs and tolerances themselves are in :mod:`ccl_ops.testing`)."""
from __future__ import annotations

from hypothesis import strategies as st

shapes = st.tuples(
    st.integers(1, 3), st.integers(1, 7), st.integers(1, 19), st.integers(1, 21)
)  # N, C, H, W: odd sizes and tiles that do not divide them
