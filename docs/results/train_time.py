"""Seconds per training step of each method in the grid itself (a markdown table).

``train_seconds`` in each run's ``metrics.json`` is the wall time of its training steps (data loading
included, evaluations excluded); divided by the steps, median over the seeds, and the ratio to `independent`.
A complement to ``ccl-bench overhead`` (one fixed batch, interleaved steps): these runs were made one after
another, so a slow period of the machine lands on whichever method ran then; the seeds spread it.

    python docs/results/train_time.py docs/results/runs/main --out docs/results/main/train_time.md
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import pandas as pd

from ccl_bench.report import find_runs


def step_seconds(folders: list[str]) -> pd.DataFrame:
    rows = []
    for run in find_runs(folders):
        with open(os.path.join(run, "metrics.json")) as f:
            metrics = json.load(f)
        if metrics.get("complete"):
            rows.append({"method": metrics["method"], "seed": metrics["seed"],
                         "s_per_step": metrics["train_seconds"] / metrics["step"]})
    if not rows:
        raise SystemExit(f"train_time.py: no finished run under {folders}")
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="folders holding finished runs")
    parser.add_argument("--out", required=True, help="markdown file to write")
    args = parser.parse_args()
    runs = step_seconds(args.folders)
    per_method = runs.groupby("method", sort=False)["s_per_step"]
    table = pd.DataFrame({"seeds": per_method.size(), "s/step (median)": per_method.median(),
                          "min": per_method.min(), "max": per_method.max()})
    if "independent" in table.index:
        table["× independent"] = table["s/step (median)"] / table.loc["independent", "s/step (median)"]
    text = table.reset_index().to_markdown(index=False, floatfmt=".3f") + "\n"
    with open(args.out, "w") as f:
        f.write(f"<!-- made by: python docs/results/train_time.py {' '.join(sys.argv[1:])} -->\n" + text)
    print(text)


if __name__ == "__main__":
    main()
