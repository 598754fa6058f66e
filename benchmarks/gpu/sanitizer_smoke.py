"""Tiny run of both ccl ops, forward and backward, on CUDA: the workload for compute-sanitizer.

Covers every kernel instantiation family once at small sizes: the register buckets (C = 5, 13, 19 -> CMAX 8,
16, 32) and the online path (C = 40), float32/float16/bfloat16/float64, contiguous and channels_last inputs,
a strided label tensor, every rule and normalisation, T != 1, both region scores, partial regions, an
all-ignored batch and an empty batch. It also checks each CUDA result against the CPU reference loosely (the
property suite does the tight checks), so that a sanitizer run that "passes" also computed the right thing.

    compute-sanitizer --tool memcheck python benchmarks/gpu/sanitizer_smoke.py

CCL_SMOKE_QUICK=1 runs bfloat16 (float accumulation) and float64 only.
"""
from __future__ import annotations

import os
import sys

import torch

import ccl_ops
from ccl_ops import reference
from ccl_ops.testing import make_inputs


def inputs(n, c, h, w, dtype, seed, ignore_frac=0.2, channels_last=False):
    """ccl_ops.testing.make_inputs on the CPU, plain noise (no student made right on purpose)."""
    return make_inputs(seed, n, c, h, w, dtype, ignore_frac=ignore_frac, right_frac=0.0,
                       layout="channels_last" if channels_last else "contiguous")


def main() -> int:
    assert torch.cuda.is_available(), "needs a CUDA device"
    assert "cuda" in ccl_ops.KERNEL_DEVICES, f"no CUDA kernels in the extension: {ccl_ops.KERNEL_DEVICES}"
    dev = torch.device("cuda")
    checked = 0
    cases = [(2, 5, 9, 11), (1, 13, 7, 33), (2, 19, 17, 20), (1, 40, 6, 37)]
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    if os.environ.get("CCL_SMOKE_QUICK") == "1":  # racecheck/synccheck are slow: one dtype per accumulation type
        dtypes = (torch.bfloat16, torch.float64)
    for dtype in dtypes:
        for k, (n, c, h, w) in enumerate(cases):
            for channels_last in (False, True):
                za, zb, y = inputs(n, c, h, w, dtype, seed=k, channels_last=channels_last)
                ya = y.transpose(1, 2).contiguous().transpose(1, 2)  # same values, non-contiguous labels
                for rule, normalize, t in (("correct", "valid", 1.0), ("confidence", "selected", 2.0),
                                           ("all", "valid", 0.7), ("confidence", "valid", 1.0)):
                    a = za.to(dev).requires_grad_()
                    b = zb.to(dev).requires_grad_()
                    out = ccl_ops.pixel_selective_kl(a, b, ya.to(dev), temperature=t, rule=rule, normalize=normalize)
                    (out.loss_a * 0.7 + out.loss_b * 1.3).backward()
                    ref = reference.pixel_selective_kl(za.double(), zb.double(), y, temperature=t, rule=rule,
                                                       normalize=normalize)
                    tol = dict(rtol=1e-3, atol=1e-4)
                    torch.testing.assert_close(out.loss_a.double().cpu(), ref.loss_a, **tol)
                    torch.testing.assert_close(out.loss_b.double().cpu(), ref.loss_b, **tol)
                    assert a.grad is not None and b.grad is not None
                    checked += 1
                for score, region in (("ce", (4, 4)), ("accuracy", (3, 5)), ("ce", (16, 16)), ("ce", (1, 64))):
                    got = ccl_ops.region_direction_mask(za.to(dev), zb.to(dev), ya.to(dev), region=region,
                                                        score=score)
                    ref = reference.region_direction_mask(za.double(), zb.double(), y, region=region, score=score)
                    torch.testing.assert_close(got.scores.cpu(), ref.scores, rtol=1e-3, atol=1e-3, equal_nan=True)
                    checked += 1
    # Edge cases: every pixel ignored; an empty batch; only one gradient asked for.
    za, zb, y = inputs(1, 5, 4, 4, torch.float32, seed=9, ignore_frac=1.0)
    out = ccl_ops.pixel_selective_kl(za.cuda(), zb.cuda(), y.cuda())
    assert out.loss_a.item() == 0 and out.loss_b.item() == 0
    mask = ccl_ops.region_direction_mask(za.cuda(), zb.cuda(), y.cuda(), region=(2, 2))
    assert mask.scores.isnan().all() and (mask.direction == 0).all()
    za, zb, y = inputs(0, 5, 4, 4, torch.float32, seed=9)
    out = ccl_ops.pixel_selective_kl(za.cuda().requires_grad_(), zb.cuda(), y.cuda())
    out.loss_a.backward()
    ccl_ops.region_direction_mask(za.cuda(), zb.cuda(), y.cuda())
    za, zb, y = inputs(2, 19, 8, 8, torch.bfloat16, seed=10)
    a = za.cuda().requires_grad_()
    ccl_ops.pixel_selective_kl(a, zb.cuda(), y.cuda(), rule="all").loss_a.backward()
    torch.cuda.synchronize()
    print(f"sanitizer smoke: {checked} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
