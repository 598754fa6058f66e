"""``ccl-bench kernels``: speed and memory of the ccl ops against their peers.

Implementations per op: ``eager`` (the pure-PyTorch reference), ``compile`` (``torch.compile`` of the same reference
arithmetic), ``fused`` (the ccl_ops kernel) and, on CUDA where Liger-Kernel imports, ``liger`` (Liger's KL loss
composed with the same masks). The two-student ops get two students' logits, the K-student
``pixel_selective_kl_peers`` ``--students`` of them (default 3; its reference is ``ccl_ops.pixel_bsd_peers``). For
each op x shape x dtype it reports, per implementation, the median time of the forward and of forward+backward, the
peak memory allocated during forward+backward beyond its inputs, and the achieved bandwidth against the minimal
bytes.

Timing is interleaved: for each op x shape x dtype, every timed call is warmed up first, then each repetition
(a round) times every one of them once in turn (the starting point rotating from round to round), so that
machine noise hits all alike. The calls of a round are: each implementation's forward and forward+backward;
a copy ``dst.copy_(src)`` of one logits-sized float32 buffer (the machine's copy bandwidth, measured in the
same rounds); on CPU with ``--threads-scaling`` the fused forward with 1 thread (the others run with
``torch.get_num_threads()``); and the allocation and filling of two fresh logits-sized float32 tensors
(``torch.empty(...).fill_(0)`` twice, with whatever allocator is loaded), whose cost, page faults included, is
comparable to the kernels' on a CPU. A time is the median over rounds; a ratio is the median over rounds of the
ratio within a round:

* ``*_x_vs_<peer>`` = peer time / this time;
* ``x_floor`` = fwd_bwd_ms (fwd_ms for a forward-only op) / floor time, the floor being the time to move the
  minimal bytes at the round's copy bandwidth: read every student's logits and the labels once, write every
  gradient once (forward only: read the logits and the labels); ``pct_of_copy_bw`` = 100 / x_floor;
* ``fwd_thread_speedup`` (fused only) = forward time with 1 thread / forward time with all threads.

A second table gives, per op x shape x dtype, the copy bandwidth and the allocation cost of the same rounds.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

import ccl_ops
from ccl_ops import reference
from ccl_ops.ops import OPS
from ccl_ops.testing import DTYPE_BY_NAME, make_peer_inputs

DEFAULT_SHAPES = {"cpu": "2x19x512x512", "cuda": "8x19x512x1024"}
PEERS = ("eager", "compile")
KL_OPS = ("pixel_selective_kl", "pixel_selective_kl_peers")  # the ops with a backward (timed forward+backward)
PEER_STUDENTS = 3  # students in the K-student op's cases unless asked otherwise


@dataclass
class Case:
    op: str
    shape: tuple[int, int, int, int]
    dtype: torch.dtype
    device: torch.device
    students: int = 2


def students_of(op: str, peer_students: int = PEER_STUDENTS) -> int:
    """How many students' logits an op's cases get."""
    return peer_students if op == "pixel_selective_kl_peers" else 2


def make_case_inputs(shape, dtype, device, seed=0, students=2):
    """The benchmark's inputs, (a list of ``students`` logits, labels): :func:`ccl_ops.testing.make_peer_inputs`
    (each student right on about half the pixels, so every teaching direction occurs) with 5% of the pixels
    ignored."""
    return make_peer_inputs(seed, students, *shape, dtype, ignore_frac=0.05, device=device)


def implementations(op: str, device: torch.device) -> dict[str, Callable]:
    """name -> fn(logits, y), ``logits`` a list of the students' logits, returning the losses for the KL ops, or
    the direction mask for the region op."""
    if op == "pixel_selective_kl":
        def kl_math(z, y):
            return reference.pixel_selective_kl_math(*z, y, 1.0, "correct", "valid", 255)[:2]

        impls = {
            "eager": kl_math,
            "compile": torch.compile(kl_math, dynamic=False),
            "fused": lambda z, y: ccl_ops.pixel_selective_kl(*z, y)[:2],
        }
        if device.type == "cuda":
            from . import liger_peer

            if liger_peer.available():
                impls["liger"] = lambda z, y: liger_peer.pixel_selective_kl_math(
                    *z, y, 1.0, "correct", "valid", 255)[:2]
        return impls
    if op == "pixel_selective_kl_peers":
        def peers_math(z, y):
            return ccl_ops.pixel_bsd_peers(z, y)

        return {
            "eager": peers_math,
            "compile": torch.compile(peers_math, dynamic=False),
            "fused": lambda z, y: ccl_ops.pixel_selective_kl_peers(z, y).losses,
        }

    def region_math(z, y):
        return reference.region_direction_mask_math(*z, y, 16, 16, "ce", 255).direction

    return {
        "eager": region_math,
        "compile": torch.compile(region_math, dynamic=False),
        "fused": lambda z, y: ccl_ops.region_direction_mask(*z, y).direction,
    }


def total(losses) -> torch.Tensor:
    """The sum of the losses an implementation returns (a tuple of scalars or a (K,) tensor)."""
    return losses.sum() if isinstance(losses, torch.Tensor) else sum(losses[1:], losses[0])


@dataclass
class Timed:
    """One call of a round: fn(i) for the i-th call, run with `threads` intra-op threads (None: unchanged)."""

    fn: Callable[[int], object]
    threads: int | None = None


def time_once_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call: perf_counter on CPU, CUDA events on GPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def interleaved_ms(calls: dict[str, Timed], device: torch.device, warmup: int, reps: int) -> dict[str, list[float]]:
    """Times of every call in every round: all warmed up, then `reps` rounds timing each call once in turn."""
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    threads = torch.get_num_threads()

    def use_threads(name):
        wanted = calls[name].threads or threads
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)

    try:
        for i in range(warmup):
            for name in names:
                use_threads(name)
                calls[name].fn(i)
        for r in range(reps):
            for k in range(len(names)):
                name = names[(r + k) % len(names)]
                use_threads(name)
                times[name].append(time_once_ms(lambda: calls[name].fn(r), device))
    finally:
        torch.set_num_threads(threads)
    return times


def median_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num / den within a round."""
    return statistics.median(a / b for a, b in zip(num, den))


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


def run_case(case: Case, impls: dict[str, Callable], warmup: int, reps: int, rotations: int,
             threads_scaling: bool) -> tuple[list[dict], dict]:
    """Rows of every implementation of one op x shape x dtype, and the row of the same rounds' copy and allocation."""
    inputs = [make_case_inputs(case.shape, case.dtype, case.device, seed=s, students=case.students)
              for s in range(rotations)]
    leaves = [([z.clone().requires_grad_() for z in logits], labels) for logits, labels in inputs]
    (za, *_), y = inputs[0]
    logit_bytes = za.numel() * za.element_size()
    fwd_bytes = case.students * logit_bytes + y.numel() * y.element_size()  # read the logits and the labels
    has_backward = case.op in KL_OPS
    floor_bytes = fwd_bytes + case.students * logit_bytes if has_backward else fwd_bytes  # + write the gradients

    def forward(fn):
        def call(i):
            logits, labels = inputs[i % rotations]
            with torch.no_grad():
                return fn(logits, labels)
        return call

    def forward_backward(fn):
        def call(i):
            logits, labels = leaves[i % rotations]
            return torch.autograd.grad(total(fn(logits, labels)), logits)
        return call

    src = torch.empty(za.shape, dtype=torch.float32, device=case.device).normal_()
    dst = torch.empty_like(src)

    def alloc_fill(i):
        return [torch.empty(za.shape, dtype=torch.float32, device=case.device).fill_(0) for _ in range(2)]

    calls = {"copy": Timed(lambda i: dst.copy_(src)), "alloc": Timed(alloc_fill)}
    for name, fn in impls.items():
        calls[f"{name}/fwd"] = Timed(forward(fn))
        if has_backward:
            calls[f"{name}/fwd_bwd"] = Timed(forward_backward(fn))
    if threads_scaling and "fused" in impls:
        calls["fused/fwd@1"] = Timed(forward(impls["fused"]), threads=1)
    times = interleaved_ms(calls, case.device, warmup, reps)

    copy_bytes = 2 * src.numel() * src.element_size()  # read + write
    floor_ms = [floor_bytes / copy_bytes * t for t in times["copy"]]  # the minimal bytes at the round's copy bw
    copy_gbps = copy_bytes / (statistics.median(times["copy"]) * 1e-3) / 1e9
    key = dict(op=case.op, students=case.students, shape="x".join(map(str, case.shape)),
               dtype=str(case.dtype).removeprefix("torch."))
    rows = []
    for name, fn in impls.items():
        row = dict(key, impl=name, fwd_ms=statistics.median(times[f"{name}/fwd"]))
        row["fwd_GBps"] = fwd_bytes / (row["fwd_ms"] * 1e-3) / 1e9
        main = "fwd"
        if has_backward:
            main = "fwd_bwd"
            row["fwd_bwd_ms"] = statistics.median(times[f"{name}/fwd_bwd"])
            row["fwd_bwd_GBps"] = floor_bytes / (row["fwd_bwd_ms"] * 1e-3) / 1e9
            peak = peak_extra_bytes(lambda: forward_backward(fn)(0), case.device)
        else:
            peak = peak_extra_bytes(lambda: forward(fn)(0), case.device)
        row["peak_extra_MB"] = peak / 2**20
        row["peak_extra_logits"] = peak / logit_bytes  # in units of one student's logits
        for peer in PEERS:
            for part in ("fwd", "fwd_bwd") if has_backward else ("fwd",):
                row[f"{part}_x_vs_{peer}"] = (median_ratio(times[f"{peer}/{part}"], times[f"{name}/{part}"])
                                              if peer in impls else float("nan"))
        row["copy_GBps"] = copy_gbps
        row["x_floor"] = median_ratio(times[f"{name}/{main}"], floor_ms)
        row["pct_of_copy_bw"] = 100 / row["x_floor"]
        if name == "fused" and "fused/fwd@1" in times:
            row["fwd_thread_speedup"] = median_ratio(times["fused/fwd@1"], times["fused/fwd"])
        rows.append(row)
    costs = dict(key, copy_ms=statistics.median(times["copy"]), copy_GBps=copy_gbps,
                 floor_ms=statistics.median(floor_ms), alloc_fill_2_logits_ms=statistics.median(times["alloc"]))
    return rows, costs


class BenchArgumentError(ValueError):
    """An argument of the benchmark names a shape, dtype, op or device it cannot run."""


def parse_arguments(device: str, shapes: str | None, dtypes: str, ops: str):
    """(device, shapes, dtype names, op names) checked, or BenchArgumentError."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchArgumentError("--device cuda: no CUDA device is available on this machine")
    shape_list = [tuple(int(v) for v in s.split("x")) for s in (shapes or DEFAULT_SHAPES[dev.type]).split(",")]
    for s in shape_list:
        if len(s) != 4:
            raise BenchArgumentError(f"--shapes: each shape is NxCxHxW, got {'x'.join(map(str, s))}")
    bad = [d for d in dtypes.split(",") if d not in DTYPE_BY_NAME]
    if bad:
        raise BenchArgumentError(f"--dtypes: unknown {bad}; expected some of {list(DTYPE_BY_NAME)}")
    bad = [o for o in ops.split(",") if o not in OPS]
    if bad:
        raise BenchArgumentError(f"--ops: unknown {bad}; expected some of {list(OPS)}")
    return dev, shape_list, dtypes.split(","), ops.split(",")


def run(device: str = "cpu", shapes: str | None = None, dtypes: str = "float32", ops: str = ",".join(OPS),
        impls: str | None = None, warmup: int = 3, reps: int = 10, rotations: int | None = None,
        threads_scaling: bool | None = None, students: int = PEER_STUDENTS):
    """(all cases, the copy and allocation costs of their rounds) as two pandas DataFrames."""
    import pandas as pd

    dev, shape_list, dtype_names, op_names = parse_arguments(device, shapes, dtypes, ops)
    if not 2 <= students <= ccl_ops.MAX_PEERS:
        raise BenchArgumentError(f"--students: {students}; expected 2 to {ccl_ops.MAX_PEERS}")
    # On CUDA, rotate through enough input sets that L2 cannot serve them (H100/H200 L2: 50-60 MB).
    rotations = rotations or (3 if dev.type == "cuda" else 1)
    if threads_scaling is None:
        threads_scaling = dev.type == "cpu"
    rows, costs = [], []
    for shape in shape_list:
        for dtype_name in dtype_names:
            for op in op_names:
                chosen = {name: fn for name, fn in implementations(op, dev).items()
                          if not impls or name in impls.split(",")}
                case = Case(op, shape, DTYPE_BY_NAME[dtype_name], dev, students_of(op, students))
                case_rows, case_costs = run_case(case, chosen, warmup, reps, rotations, threads_scaling)
                rows += case_rows
                costs.append(case_costs)
                for row in case_rows:
                    print(f"  {op:24s} {row['impl']:8s} {row['shape']} {dtype_name}: fwd {row['fwd_ms']:.2f} ms"
                          + (f", fwd+bwd {row['fwd_bwd_ms']:.2f} ms" if "fwd_bwd_ms" in row else "")
                          + f", x_floor {row['x_floor']:.2f}", flush=True)
    return pd.DataFrame(rows), pd.DataFrame(costs)


def allocator_description(device: torch.device) -> str:
    """Which allocator serves the tensors: a malloc preloaded through LD_PRELOAD, else glibc's, with the tunables
    set in the environment (they change its answer: MALLOC_MMAP_MAX_=0 keeps large buffers mapped, for one)."""
    if device.type == "cuda":
        return "CUDA caching allocator"
    preload = os.environ.get("LD_PRELOAD", "")
    for name in ("tcmalloc", "jemalloc", "mimalloc"):
        if name in preload:
            return f"{name} (LD_PRELOAD)"
    tunables = sorted(f"{k}={v}" for k, v in os.environ.items()
                      if k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE"))
    return "glibc malloc, " + " ".join(tunables) if tunables else "default (glibc malloc)"


def machine_description(device: torch.device) -> str:
    import platform

    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {os.cpu_count()} cores"
    return (f"{what}; torch {torch.__version__}; backend {ccl_ops.backend(device)}; "
            f"allocator {allocator_description(device)}")
