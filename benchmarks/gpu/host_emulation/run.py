"""Check the CUDA kernels' per-pixel arithmetic on the CPU (no GPU needed).

Builds emulate.cu with nvcc as a host shared library (the kernels' __host__ __device__ per-pixel functions from
csrc/cuda/selective_kl_pixel.cuh and pixel_math.cuh, driven by loops that mirror the kernels' indexing) and
compares it with ccl_ops.reference on random inputs: every rule, normalisation, register bucket and the online
path, float32 and float64, contiguous / channels_last / strided layouts, NaN logits, all-ignored inputs, both
region scores. It does not exercise the CUDA-specific parts (launch geometry, shuffles, shared memory, the
two-stage reduction, streams): verify.sh does, on a GPU.

    python benchmarks/gpu/host_emulation/run.py [--lib /tmp/libccl_emu.so]
"""
from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from ccl_ops import reference  # noqa: E402
from op_cases import make_inputs, with_layout  # noqa: E402

RULES = {"correct": 0, "confidence": 1, "all": 2}
P = ctypes.c_void_p


def build(lib: Path) -> None:
    inc = Path(torch.__file__).parent / "include"
    cmd = ["nvcc", "-std=c++20", "-O2", "-shared", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr",
           f"-I{inc}", f"-I{inc / 'torch/csrc/api/include'}", "-gencode=arch=compute_90,code=sm_90",
           str(HERE / "emulate.cu"), "-o", str(lib)]
    print("building:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def strides(t):
    return (ctypes.c_int64 * t.dim())(*t.stride())


def ptr(t):
    return P(t.data_ptr())


class Emu:
    def __init__(self, lib):
        self.lib = ctypes.CDLL(str(lib))

    def forward(self, za, zb, y, t, rule, normalize, path, ignore_index=255):
        n, c, h, w = za.shape
        out = torch.zeros(5, dtype=torch.float64)
        sel = torch.zeros(n, h, w, dtype=torch.uint8)
        rc = self.lib.ccl_emu_forward(
            int(za.dtype == torch.float64), path, ptr(za), strides(za), ptr(zb), strides(zb), ptr(y), strides(y),
            ctypes.c_int64(n), c, h, w, ctypes.c_double(t), RULES[rule], int(normalize == "valid"),
            ctypes.c_int64(ignore_index), ptr(out), ptr(sel))
        assert rc == 0, rc
        return out, sel

    def backward(self, za, zb, sel, t, g_a, g_b, norm, path):
        n, c, h, w = za.shape
        ga = torch.full((n, c, h, w), float("nan"), dtype=za.dtype)
        gb = torch.full((n, c, h, w), float("nan"), dtype=za.dtype)
        rc = self.lib.ccl_emu_backward(
            int(za.dtype == torch.float64), path, ptr(za), strides(za), ptr(zb), strides(zb), ptr(sel),
            ctypes.c_int64(n), c, h, w, ctypes.c_double(t), ctypes.c_double(g_a), ctypes.c_double(g_b),
            ctypes.c_double(norm), ptr(ga), ptr(gb))
        assert rc == 0, rc
        return ga, gb

    def region(self, za, zb, y, rh, rw, score, ignore_index=255):
        n, c, h, w = za.shape
        hr, wr = -(-h // rh), -(-w // rw)
        d = torch.zeros(n, hr, wr, dtype=torch.int8)
        s = torch.zeros(n, 2, hr, wr, dtype=torch.float32)
        rc = self.lib.ccl_emu_region(
            int(za.dtype == torch.float64), ptr(za), strides(za), ptr(zb), strides(zb), ptr(y), strides(y),
            ctypes.c_int64(n), c, h, w, ctypes.c_int64(rh), ctypes.c_int64(rw), int(score == "accuracy"),
            ctypes.c_int64(ignore_index), ptr(d), ptr(s))
        assert rc == 0, rc
        return d, s


def paths_for(c, dtype):
    if dtype == torch.float64:
        return [0]
    return [p for p in (8, 16, 32) if c <= p] + [0]


def check_kl(emu, za, zb, y, t, rule, normalize, path, exact_counts=True):
    out, sel = emu.forward(za, zb, y, t, rule, normalize, path)
    a, b = za.detach().double().clone().requires_grad_(), zb.detach().double().clone().requires_grad_()
    ref = reference.pixel_selective_kl(a, b, y, temperature=t, rule=rule, normalize=normalize)
    tol = dict(rtol=1e-9, atol=1e-10) if za.dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(out[0], ref.loss_a.detach(), **tol)
    torch.testing.assert_close(out[1], ref.loss_b.detach(), **tol)
    counts_ok = int(out[2]) == int(ref.count_ab) and int(out[3]) == int(ref.count_ba)
    assert counts_ok or not exact_counts, (rule, out, ref)
    g_a, g_b = 0.7, 1.3
    (g_a * ref.loss_a + g_b * ref.loss_b).backward()
    ga, gb = emu.backward(za, zb, sel, t, g_a, g_b, float(out[4]), path)
    gtol = dict(rtol=1e-9, atol=1e-12) if za.dtype == torch.float64 else dict(rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(ga.double(), a.grad, **gtol)
    torch.testing.assert_close(gb.double(), b.grad, **gtol)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lib", default=os.environ.get("CCL_EMU_LIB", "/tmp/libccl_emu.so"))
    args = parser.parse_args()
    lib = Path(args.lib)
    if not lib.exists():
        build(lib)
    emu = Emu(lib)
    checks = 0
    for dtype in (torch.float32, torch.float64):
        for seed, (n, c, h, w) in enumerate([(2, 1, 5, 7), (2, 2, 6, 5), (2, 5, 9, 11), (1, 13, 7, 12),
                                             (2, 19, 8, 9), (1, 40, 6, 7)]):
            for layout in ("contiguous", "channels_last", "strided"):
                za, zb, y = make_inputs(seed, n, c, h, w, dtype, layout=layout)
                for path in paths_for(c, dtype):
                    for rule in RULES:
                        for normalize, t in (("valid", 1.0), ("selected", 1.7)):
                            check_kl(emu, za, zb, y, t, rule, normalize, path)
                            checks += 1
                for score, (rh, rw) in (("ce", (4, 4)), ("accuracy", (3, 5)), ("ce", (16, 16)), ("accuracy", (1, 2))):
                    d, s = emu.region(za, zb, y, rh, rw, score)
                    ref = reference.region_direction_mask(za, zb, y, region=(rh, rw), score=score)
                    torch.testing.assert_close(s, ref.scores, rtol=2e-5, atol=2e-5, equal_nan=True)
                    assert torch.equal(d, ref.direction), (d, ref.direction)
                    checks += 1
    # Logits near 1e4 (centred arithmetic), identical students (exactly zero loss), NaN propagation.
    for path in (32, 0):
        za, zb, y = make_inputs(5, 2, 6, 9, 10, torch.float32, scale=1e4 / 6)
        for rule in RULES:
            # float32 cross-entropies of confident pixels round to exact ties that float64 resolves: the
            # 'confidence' counts may differ at pixels whose KL is ~0 (the losses still match).
            check_kl(emu, za, zb, y, 1.0, rule, "valid", path, exact_counts=rule != "confidence")
            out, _ = emu.forward(za, za.clone(), y, 2.0, rule, "valid", path)
            assert out[0] == 0 and out[1] == 0, out
        za, zb, y = make_inputs(7, 1, 4, 6, 6, torch.float32, ignore_frac=0.0)
        za[0, 2, 3, 3] = float("nan")
        for rule in RULES:
            out, _ = emu.forward(za, zb, y, 1.0, rule, "valid", path)
            assert out[0].isnan() and out[1].isnan(), (rule, out)
        y[0, 3, 3] = 255
        out, _ = emu.forward(za, zb, y, 1.0, "correct", "valid", path)
        assert out[:2].isfinite().all(), out
        y[:] = 255
        out, _ = emu.forward(za, zb, y, 1.0, "all", "valid", path)
        assert out[0] == 0 and out[1] == 0 and out[4] == 1, out
        checks += 1
    print(f"host emulation: {checks} checks passed (per-pixel CUDA arithmetic vs ccl_ops.reference)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
