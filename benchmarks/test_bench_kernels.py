"""pytest-benchmark suite of the kernel cases of ``ccl-bench kernels`` (same inputs, same implementations).

    pytest benchmarks --benchmark-only                      # CPU, 2x19x512x512 float32
    CCL_BENCH_SHAPE=1x19x256x256 CCL_BENCH_DTYPE=bfloat16 pytest benchmarks --benchmark-only
    CCL_BENCH_DEVICE=cuda pytest benchmarks --benchmark-only

On CUDA each call synchronises so that the timings cover the kernels, not the launches.
"""
import os

import pytest
import torch

from ccl_bench.kernels import DEFAULT_SHAPES, KL_OPS, OPS, implementations, make_case_inputs, students_of
from ccl_bench.kernels.bench import total
from ccl_ops.testing import DTYPE_BY_NAME

DEVICE = torch.device(os.environ.get("CCL_BENCH_DEVICE", "cpu"))
SHAPE = tuple(int(v) for v in os.environ.get("CCL_BENCH_SHAPE", DEFAULT_SHAPES[DEVICE.type]).split("x"))
DTYPE = DTYPE_BY_NAME[os.environ.get("CCL_BENCH_DTYPE", "float32")]

if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.skip("CCL_BENCH_DEVICE=cuda but no CUDA device", allow_module_level=True)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", ("eager", "compile", "fused"))
@pytest.mark.parametrize("op", OPS)
def test_forward(benchmark, op, impl):
    fn = implementations(op, DEVICE)[impl]
    logits, y = make_case_inputs(SHAPE, DTYPE, DEVICE, students=students_of(op))

    def call():
        with torch.no_grad():
            out = fn(logits, y)
        _sync()
        return out

    call()  # compile / warm up outside the timing
    benchmark.extra_info.update(shape="x".join(map(str, SHAPE)), dtype=str(DTYPE))
    benchmark(call)


@pytest.mark.parametrize("impl", ("eager", "compile", "fused"))
@pytest.mark.parametrize("op", KL_OPS)
def test_forward_backward(benchmark, op, impl):
    fn = implementations(op, DEVICE)[impl]
    logits, y = make_case_inputs(SHAPE, DTYPE, DEVICE, students=students_of(op))
    logits = [z.requires_grad_() for z in logits]

    def call():
        grads = torch.autograd.grad(total(fn(logits, y)), logits)
        _sync()
        return grads

    call()
    benchmark.extra_info.update(shape="x".join(map(str, SHAPE)), dtype=str(DTYPE))
    benchmark(call)
