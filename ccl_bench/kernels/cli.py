"""The ``ccl-bench kernels`` subcommand: arguments, and the tables written under ``--out``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import bench


def write_tables(table, costs, out: Path, device: torch.device) -> Path:
    """kernels_<device>.csv (the cases) and kernels_<device>.md (both tables, the command line in the header)."""
    out.mkdir(parents=True, exist_ok=True)
    csv = out / f"kernels_{device.type}.csv"
    table.to_csv(csv, index=False)
    header = (f"# ccl-bench kernels ({bench.machine_description(device)})\n"
              f"# command: ccl-bench {' '.join(sys.argv[1:])}\n")
    text = (header + "\n" + table.to_markdown(index=False, floatfmt=".3g") + "\n\n"
            + "Copy and allocation (two fresh logits-sized float32 tensors, empty + fill) in the same rounds:\n\n"
            + costs.to_markdown(index=False, floatfmt=".3g") + "\n")
    csv.with_suffix(".md").write_text(text)
    print(text)
    return csv


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    try:
        table, costs = bench.run(args.device, args.shapes, args.dtypes, args.ops, args.impls, args.warmup, args.reps,
                                 args.rotations, args.threads_scaling, args.students)
    except bench.BenchArgumentError as exc:  # the message alone, as argparse does for its own errors
        raise SystemExit(str(exc)) from None
    csv = write_tables(table, costs, Path(args.out), device)
    print(f"wrote {csv} and {csv.with_suffix('.md')}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("kernels", help="benchmark the ccl ops against eager, torch.compile (and Liger)",
                              description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--shapes", default=None, help="comma-separated NxCxHxW (default: 2x19x512x512 on CPU, "
                                                  "8x19x512x1024 on CUDA)")
    p.add_argument("--dtypes", default="float32", help=f"comma-separated, from {list(bench.DTYPE_BY_NAME)}")
    p.add_argument("--ops", default=",".join(bench.OPS), help="comma-separated subset of the ops")
    p.add_argument("--students", type=int, default=bench.PEER_STUDENTS,
                   help="students in the cases of pixel_selective_kl_peers (default: %(default)s)")
    p.add_argument("--impls", default=None, help="comma-separated subset of eager,compile,fused,liger")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10, help="timed rounds; medians over them are reported")
    p.add_argument("--rotations", type=int, default=None, help="input sets cycled through (default 3 on CUDA)")
    p.add_argument("--threads-scaling", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the fused forward with 1 thread (fwd_thread_speedup; default: on for CPU)")
    p.add_argument("--out", default="runs/kernels", help="directory for kernels_<device>.csv and .md")
    p.set_defaults(func=main)
