"""The SIMT harness can fail: kernels with deliberate defects are caught.

One extra build compiles mutated copies of the kernel headers (float32 only), each mutation switched on at
run time by SIMT_MUTANT=k, so that one binary serves every defect. Each mutation must match the kernel source
exactly once: when the kernels change, this test says so instead of silently testing nothing. With
SIMT_MUTANT=0 the same binary passes the same cases (the failure comes from the defect, not from the setup).
"""
from __future__ import annotations

import pytest
import torch
from simt_harness import SUPPORTED, build, kl_case, mutator, region_case, run

from ccl_ops.testing import make_inputs

pytestmark = pytest.mark.skipif(not SUPPORTED, reason="the SIMT harness needs Linux x86-64")

# mutant id -> (file, original text, mutated text)
MUTATIONS = {
    1: ("csrc/cuda/pixel_math.cuh",  # block_sum's first barrier removed: the next call overwrites `partial`
        "  __syncthreads();  // a previous call may still be reading `partial`",
        "  if (::simt::mutant() != 1) __syncthreads();"),
    2: ("csrc/cuda/pixel_math.cuh",  # block_sum's second barrier removed: warp 0 reads before the others wrote
        "  if (lane == 0) partial[warp] = v;\n  __syncthreads();",
        "  if (lane == 0) partial[warp] = v;\n  if (::simt::mutant() != 2) __syncthreads();"),
    3: ("csrc/cuda/pixel_selective_kl_kernel.cuh",  # off by one in the forward's grid-stride loop over N
        "for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {\n      const int label",
        "for (int64_t n = blockIdx.y; n < N + (::simt::mutant() == 3); n += gridDim.y) {\n      const int label"),
    4: ("csrc/cuda/pixel_selective_kl_kernel.cuh",  # early return of the threads past H*W, before block_sum
        "  const int hw = blockIdx.x * kThreads + threadIdx.x;\n  double kl_ab = 0",
        "  const int hw = blockIdx.x * kThreads + threadIdx.x;\n  if (::simt::mutant() == 4 && hw >= HW) return;\n"
        "  double kl_ab = 0"),
    5: ("csrc/cuda/region_direction_mask_kernel.cuh",  # off by one in the region's block-stride loop
        "for (int k = threadIdx.x; k < pixels; k += blockDim.x)",
        "for (int k = threadIdx.x; k < pixels + (::simt::mutant() == 5); k += blockDim.x)"),
    6: ("csrc/cuda/region_direction_mask_kernel.cuh",  # block size not rounded up to whole warps
        "(region_pixels + kWarpSize - 1) / kWarpSize * kWarpSize",
        "(::simt::mutant() == 6 ? region_pixels : (region_pixels + kWarpSize - 1) / kWarpSize * kWarpSize)"),
    7: ("csrc/cuda/pixel_selective_kl_kernel.cuh",  # grid.y not capped at 65535
        "std::min<int64_t>(std::max<int64_t>(N, 1), max_grid_y)",
        "(::simt::mutant() == 7 ? N : std::min<int64_t>(std::max<int64_t>(N, 1), max_grid_y))"),
}


@pytest.fixture(scope="module")
def mutant_harness():
    return build(defines=("CCL_SIMT_FLOAT32_ONLY",), mutate=mutator(MUTATIONS.values()), name="mutant")


def cases():
    za, zb, y = make_inputs(7, 2, 5, 9, 11, torch.float32)  # 99 pixels: one partial block per image
    ra, rb, ry = make_inputs(8, 2, 3, 8, 8, torch.float32)
    return [kl_case(za, zb, y, rule="all"), region_case(ra, rb, ry, region=(4, 4))]


# mutant -> what the harness must say (the kernel's name is in every SIMT ERROR line)
EXPECTED = {
    1: "differs from the forward thread order",
    2: "differs from the forward thread order",
    3: "AddressSanitizer: heap-buffer-overflow",
    4: "divergence",  # the warp straddling H*W waits in a shuffle for lanes that returned
    5: "AddressSanitizer: heap-buffer-overflow",
    6: "is not whole warps",
}


def run_mutant(exe, k, monkeypatch):
    monkeypatch.setenv("SIMT_MUTANT", str(k))
    return run(exe, cases(), check=False)


def test_unmutated_build_passes(mutant_harness, monkeypatch):
    proc = run_mutant(mutant_harness, 0, monkeypatch)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("k", sorted(EXPECTED))
def test_defect_is_caught(mutant_harness, monkeypatch, k):
    proc = run_mutant(mutant_harness, k, monkeypatch)
    assert proc.returncode != 0, f"mutant {k} ({MUTATIONS[k][2]!r}) passed the harness"
    assert EXPECTED[k] in proc.stderr, proc.stderr[-4000:]


def test_whole_warps_exiting_before_a_barrier_is_caught(mutant_harness, monkeypatch):
    monkeypatch.setenv("SIMT_MUTANT", "4")
    za, zb, y = make_inputs(9, 1, 3, 8, 8, torch.float32)  # 64 pixels: warps 2-7 return, warps 0-1 wait
    proc = run(mutant_harness, [kl_case(za, zb, y)], check=False)
    assert proc.returncode != 0 and "exited while 64 wait at __syncthreads" in proc.stderr, proc.stderr[-4000:]


def test_grid_beyond_cuda_limits_is_caught(mutant_harness, monkeypatch):
    monkeypatch.setenv("SIMT_MUTANT", "7")
    za, zb, y = make_inputs(10, 70000, 1, 1, 1, torch.float32)  # grid.y = 70000 > 65535: refused at launch
    proc = run(mutant_harness, [kl_case(za, zb, y)], check=False)
    assert proc.returncode != 0 and "grid (1, 70000, 1) is outside CUDA's limits" in proc.stderr, proc.stderr
