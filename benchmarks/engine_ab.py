"""Step time of two checkouts of ccl-bench, interleaved: ``ccl-bench overhead`` of checkout A, then of B, then A
again, ... (one process per measurement, each importing its own checkout), so that drift of the machine falls on
both alike. Prints the median ms/step per method and checkout and the paired ratio B/A per round.

    python benchmarks/engine_ab.py --a /path/to/old/checkout --b . --rounds 4 -- --preset small-data \
        --methods independent,dml,ccl --steps 20 --warmup 3
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import pandas as pd


def measure(checkout: str, overhead_args: list[str], out: str) -> pd.DataFrame:
    checkout = os.path.abspath(checkout)  # run from inside it: `python -m` puts the working directory first
    subprocess.run([sys.executable, "-m", "ccl_bench", "overhead", *overhead_args, "--out", out], cwd=checkout,
                   env={**os.environ, "PYTHONPATH": checkout}, check=True, capture_output=True, text=True)
    return pd.read_csv(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=True, help="checkout A (the reference)")
    parser.add_argument("--b", required=True, help="checkout B")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", help="also write the per-round table to this CSV file")
    parser.add_argument("overhead_args", nargs=argparse.REMAINDER, help="-- then ccl-bench overhead's arguments")
    args = parser.parse_args()
    extra = [a for a in args.overhead_args if a != "--"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, checkout in (("A", args.a), ("B", args.b)):
                table = measure(checkout, extra, os.path.join(tmp, f"{name}{r}.csv"))
                rows += [{"round": r, "checkout": name, "method": m, "ms_per_step": ms}
                         for m, ms in zip(table["method"], table["ms_per_step"])]
    frame = pd.DataFrame(rows)
    wide = frame.pivot_table(index=["method", "round"], columns="checkout", values="ms_per_step")
    wide["B/A"] = wide["B"] / wide["A"]
    summary = wide.groupby("method").agg(A_ms=("A", "median"), B_ms=("B", "median"), ratio_median=("B/A", "median"),
                                         ratio_min=("B/A", "min"), ratio_max=("B/A", "max"))
    print(f"A = {args.a}, B = {args.b}; {args.rounds} rounds of `ccl-bench overhead {' '.join(extra)}`, A then B")
    print(summary.to_markdown(floatfmt=".3f"))
    if args.out:
        wide.reset_index().to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
