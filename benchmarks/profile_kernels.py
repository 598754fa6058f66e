"""The fused ops in a steady loop: a workload for a sampling profiler, or quick medians to compare two builds.

    perf record -e cpu-clock -F 4000 -o perf.data python benchmarks/profile_kernels.py forward 300
    perf report -i perf.data --no-children --sort dso,symbol
    python benchmarks/profile_kernels.py --time          # medians with 1 and 2 threads

Workloads: ``forward`` (pixel_selective_kl without grad: evaluation), ``forward-backward`` (with grad: the
forward writes both gradients, the backward hands them on), ``region`` (region_direction_mask).

``--time`` runs the three workloads in turn, 15 rounds, and prints the median of the last 12, with 1 thread and
with all. It uses only the public ops and builds its own inputs, so it runs unchanged against older builds (put
their checkout first on PYTHONPATH). The inputs: each student is right on about half the pixels, and 5% of the
pixels are ignored.

This VM exposes no hardware counters (``perf stat`` reports cycles and instructions as not supported), so shares
come from cpu-clock samples, and code changes were compared by wall time and by callgrind's instruction counts.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import ccl_ops


def inputs(shape, seed=0):
    n, c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n, h, w), generator=g)
    logits = []
    for _ in range(2):
        z = torch.randn(n, c, h, w, generator=g)
        z.scatter_add_(1, y[:, None], (torch.rand(n, 1, h, w, generator=g) < 0.5).float() * 4)
        logits.append(z)
    y[torch.rand(n, h, w, generator=g) < 0.05] = 255
    return logits[0], logits[1], y


def workloads(za, zb, y):
    a, b = za.clone().requires_grad_(), zb.clone().requires_grad_()

    def forward():
        with torch.no_grad():
            ccl_ops.pixel_selective_kl(za, zb, y)

    def forward_backward():
        out = ccl_ops.pixel_selective_kl(a, b, y)
        torch.autograd.grad(out.loss_a + out.loss_b, (a, b))

    return {"forward": forward, "forward-backward": forward_backward,
            "region": lambda: ccl_ops.region_direction_mask(za, zb, y)}


def medians(calls: dict, rounds: int = 15, skip: int = 3) -> dict:
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t[skip:]) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload", nargs="?", choices=("forward", "forward-backward", "region"))
    parser.add_argument("calls", type=int, nargs="?", default=300)
    parser.add_argument("--time", action="store_true", help="print medians of all workloads, 1 and all threads")
    parser.add_argument("--shape", default="2x19x512x512", help="NxCxHxW (default: %(default)s)")
    args = parser.parse_args()
    calls = workloads(*inputs(tuple(int(v) for v in args.shape.split("x"))))
    if args.time:
        threads = torch.get_num_threads()
        for n in sorted({1, threads}):
            torch.set_num_threads(n)
            row = ", ".join(f"{name} {ms:.1f} ms" for name, ms in medians(calls).items())
            print(f"{n} thread(s): {row}")
        return
    if args.workload is None:
        parser.error("name a workload, or pass --time")
    for _ in range(args.calls):
        calls[args.workload]()


if __name__ == "__main__":
    main()
