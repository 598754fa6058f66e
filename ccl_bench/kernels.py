"""``ccl-bench kernels``: speed and memory of the ccl ops against their peers.

Implementations per op: ``eager`` (the pure-PyTorch reference), ``compile`` (``torch.compile`` of the same
reference arithmetic), ``fused`` (the ccl_ops kernel) and, on CUDA where Liger-Kernel imports, ``liger``
(Liger's KL loss composed with the same masks). For each op x implementation x shape x dtype it reports the
median time of the forward and of forward+backward, the peak memory allocated during forward+backward beyond
its inputs, and the achieved bandwidth against the minimal bytes (read both logits and the labels once, write
both gradients once), next to the copy bandwidth measured in the same run.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import ccl_ops
from ccl_ops import reference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SHAPES = {"cpu": "2x19x512x512", "cuda": "8x19x512x1024"}
OPS = ("pixel_selective_kl", "region_direction_mask")


@dataclass
class Case:
    op: str
    impl: str
    shape: tuple[int, int, int, int]
    dtype: torch.dtype
    device: torch.device


def make_case_inputs(shape, dtype, device, seed=0):
    """Logits where each student is right on about half the pixels (so both teaching directions occur)."""
    n, c, h, w = shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    y = torch.randint(0, c, (n, h, w), generator=g)
    logits = []
    for _ in range(2):
        z = torch.randn(n, c, h, w, generator=g)
        z.scatter_add_(1, y[:, None], (torch.rand(n, 1, h, w, generator=g) < 0.5).float() * 4)
        logits.append(z.to(device=device, dtype=dtype))
    y[torch.rand(n, h, w, generator=g) < 0.05] = 255
    return logits[0], logits[1], y.to(device)


def implementations(op: str, device: torch.device) -> dict[str, Callable]:
    """name -> fn(za, zb, y) returning (loss_a, loss_b) for the KL op, or the direction mask for the region op."""
    if op == "pixel_selective_kl":
        def kl_math(za, zb, y):
            return reference.pixel_selective_kl_math(za, zb, y, 1.0, "correct", "valid", 255)[:2]

        impls = {
            "eager": kl_math,
            "compile": torch.compile(kl_math, dynamic=False),
            "fused": lambda za, zb, y: ccl_ops.pixel_selective_kl(za, zb, y)[:2],
        }
        if device.type == "cuda":
            from . import liger_peer

            if liger_peer.available():
                impls["liger"] = lambda za, zb, y: liger_peer.pixel_selective_kl_math(
                    za, zb, y, 1.0, "correct", "valid", 255)[:2]
        return impls

    def region_math(za, zb, y):
        return reference.region_direction_mask_math(za, zb, y, 16, 16, "ce", 255).direction

    return {
        "eager": region_math,
        "compile": torch.compile(region_math, dynamic=False),
        "fused": lambda za, zb, y: ccl_ops.region_direction_mask(za, zb, y).direction,
    }


class Timer:
    """Median wall time of a callable: perf_counter on CPU, CUDA events on GPU (inputs rotated by the caller)."""

    def __init__(self, device: torch.device, warmup: int, reps: int):
        self.device, self.warmup, self.reps = device, warmup, reps

    def median_ms(self, fn: Callable[[int], object]) -> float:
        for i in range(self.warmup):
            fn(i)
        times = []
        for i in range(self.reps):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(i)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn(i)
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated while fn runs, beyond what was allocated before (its outputs included)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def copy_bandwidth_gbs(nbytes: int, device: torch.device, timer: Timer) -> float:
    """Bandwidth of a plain device copy of nbytes (read + write), the floor every memory-bound op is held to."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    return 2 * nbytes / (timer.median_ms(lambda i: dst.copy_(src)) * 1e-3) / 1e9


def run_case(case: Case, fn: Callable, timer: Timer, rotations: int) -> dict:
    inputs = [make_case_inputs(case.shape, case.dtype, case.device, seed=s) for s in range(rotations)]
    za, zb, y = inputs[0]
    logit_bytes = za.numel() * za.element_size()
    fwd_bytes = 2 * logit_bytes + y.numel() * y.element_size()
    has_backward = case.op == "pixel_selective_kl"

    def forward(i):
        a, b, labels = inputs[i % rotations]
        with torch.no_grad():
            return fn(a, b, labels)

    leaves = [(a.clone().requires_grad_(), b.clone().requires_grad_(), labels) for a, b, labels in inputs]

    def forward_backward(i):
        a, b, labels = leaves[i % rotations]
        loss_a, loss_b = fn(a, b, labels)
        grads = torch.autograd.grad(loss_a + loss_b, (a, b))
        return grads

    row = dict(op=case.op, impl=case.impl, shape="x".join(map(str, case.shape)), dtype=str(case.dtype)[6:],
               fwd_ms=timer.median_ms(forward))
    row["fwd_GBps"] = fwd_bytes / (row["fwd_ms"] * 1e-3) / 1e9
    if has_backward:
        row["fwd_bwd_ms"] = timer.median_ms(forward_backward)
        row["fwd_bwd_GBps"] = (fwd_bytes + 2 * logit_bytes) / (row["fwd_bwd_ms"] * 1e-3) / 1e9
        peak = peak_extra_bytes(lambda: forward_backward(0), case.device)
    else:
        peak = peak_extra_bytes(lambda: forward(0), case.device)
    row["peak_extra_MB"] = peak / 2**20
    row["peak_extra_logits"] = peak / logit_bytes  # in units of one student's logits
    return row


class BenchArgumentError(ValueError):
    """An argument of the benchmark names a shape, dtype, op or device it cannot run."""


def run(device: str = "cpu", shapes: str | None = None, dtypes: str = "float32", ops: str = ",".join(OPS),
        impls: str | None = None, warmup: int = 3, reps: int = 10, rotations: int | None = None):
    """All cases as a pandas DataFrame, with ratios against eager and compile and the % of copy bandwidth."""
    import pandas as pd

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchArgumentError("--device cuda: no CUDA device is available on this machine")
    shape_list = [tuple(int(v) for v in s.split("x")) for s in (shapes or DEFAULT_SHAPES[dev.type]).split(",")]
    for s in shape_list:
        if len(s) != 4:
            raise BenchArgumentError(f"--shapes: each shape is NxCxHxW, got {'x'.join(map(str, s))}")
    bad = [d for d in dtypes.split(",") if d not in DTYPES]
    if bad:
        raise BenchArgumentError(f"--dtypes: unknown {bad}; expected some of {list(DTYPES)}")
    bad = [o for o in ops.split(",") if o not in OPS]
    if bad:
        raise BenchArgumentError(f"--ops: unknown {bad}; expected some of {list(OPS)}")
    # On CUDA, rotate through enough input sets that L2 cannot serve them (H100/H200 L2: 50-60 MB).
    rotations = rotations or (3 if dev.type == "cuda" else 1)
    timer = Timer(dev, warmup, reps)
    rows = []
    for shape in shape_list:
        for dtype_name in dtypes.split(","):
            for op in ops.split(","):
                for name, fn in implementations(op, dev).items():
                    if impls and name not in impls.split(","):
                        continue
                    case = Case(op, name, shape, DTYPES[dtype_name], dev)
                    rows.append(run_case(case, fn, timer, rotations))
                    print(f"  {op:22s} {name:8s} {rows[-1]['shape']} {dtype_name}: fwd {rows[-1]['fwd_ms']:.2f} ms"
                          + (f", fwd+bwd {rows[-1]['fwd_bwd_ms']:.2f} ms" if "fwd_bwd_ms" in rows[-1] else ""),
                          flush=True)
        copy_gbs = copy_bandwidth_gbs(shape[0] * shape[1] * shape[2] * shape[3] * 4, dev, timer)
        for row in rows:
            row.setdefault("copy_GBps", copy_gbs)
    table = pd.DataFrame(rows)
    key = ["op", "shape", "dtype"]
    for peer in ("eager", "compile"):
        for col in ("fwd_ms", "fwd_bwd_ms"):
            if col not in table:
                continue
            base = table[table.impl == peer].set_index(key)[col].rename("peer")
            joined = table.join(base, on=key)
            table[f"{col.removesuffix('_ms')}_x_vs_{peer}"] = joined["peer"] / table[col]
    best = table["fwd_bwd_GBps"].fillna(table["fwd_GBps"]) if "fwd_bwd_GBps" in table else table["fwd_GBps"]
    table["pct_of_copy_bw"] = 100 * best / table["copy_GBps"]
    return table


def machine_description(device: torch.device) -> str:
    import os
    import platform

    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {os.cpu_count()} cores"
    return f"{what}; torch {torch.__version__}; backend {ccl_ops.backend(device)}"


def main(args: argparse.Namespace) -> int:
    import sys

    device = torch.device(args.device)
    try:
        table = run(args.device, args.shapes, args.dtypes, args.ops, args.impls, args.warmup, args.reps,
                    args.rotations)
    except BenchArgumentError as exc:  # the message alone, as argparse does for its own errors
        raise SystemExit(str(exc)) from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv = out / f"kernels_{device.type}.csv"
    table.to_csv(csv, index=False)
    header = f"# ccl-bench kernels ({machine_description(device)})\n# command: ccl-bench {' '.join(sys.argv[1:])}\n"
    (out / f"kernels_{device.type}.md").write_text(header + "\n" + table.to_markdown(index=False, floatfmt=".3g") + "\n")
    print(header + table.to_markdown(index=False, floatfmt=".3g"))
    print(f"\nwrote {csv} and {csv.with_suffix('.md')}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("kernels", help="benchmark the ccl ops against eager, torch.compile (and Liger)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--shapes", default=None, help="comma-separated NxCxHxW (default: 2x19x512x512 on CPU, "
                                                  "8x19x512x1024 on CUDA)")
    p.add_argument("--dtypes", default="float32", help=f"comma-separated, from {list(DTYPES)}")
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of the ops")
    p.add_argument("--impls", default=None, help="comma-separated subset of eager,compile,fused,liger")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10, help="timed repetitions; the median is reported")
    p.add_argument("--rotations", type=int, default=None, help="input sets cycled through (default 3 on CUDA)")
    p.add_argument("--out", default="runs/kernels", help="directory for kernels_<device>.csv and .md")
    p.set_defaults(func=main)
