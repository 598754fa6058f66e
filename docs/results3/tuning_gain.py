"""What tuning changed, per method: the tuned row against the same method's defaults, seed by seed (paired Δ and
its 95% t interval, mIoU in %), for every method that has both (`<method>` and `<method>+tuned`).

    python docs/results3/tuning_gain.py DEFAULT_RUNS... --tuned docs/results3/runs/cnn-vit/tuned \
        --out docs/results3/cnn-vit/tuned/vs_defaults.md [--order dml,kdcl-naive,...]
"""
from __future__ import annotations

import argparse
from typing import Sequence

import pandas as pd

from ccl_bench.report import _interval, _signed, load_runs, student_columns, summarize
from ccl_bench.student_names import ENSEMBLE

SUFFIX = "+tuned"


def tuning_gain(defaults: pd.DataFrame, tuned: pd.DataFrame, order: Sequence[str] = ()) -> pd.DataFrame:
    """One row per method with both rows: the report's paired Δ of ``<method>+tuned`` to ``<method>``."""
    rank = {m: i for i, m in enumerate(order)}
    methods = sorted((label.removesuffix(SUFFIX) for label in tuned["method"].unique() if label.endswith(SUFFIX)),
                     key=lambda m: rank.get(m, len(rank)))
    rows = []
    for method in methods:
        pair = pd.concat([defaults[defaults["method"] == method], tuned[tuned["method"] == method + SUFFIX]])
        gain = summarize(pair, baseline=method).set_index("method").loc[method + SUFFIX]
        if not gain.get(f"{ENSEMBLE}_pairs", 0):
            continue
        row = {"method": method, "seeds": int(gain[f"{ENSEMBLE}_pairs"])}
        for key, title in student_columns(tuned):
            row[f"tuned − defaults {title}"] = (f"{_signed(gain[f'{key}_paired_mean'])} "
                                               f"{_interval(gain[f'{key}_ci_low'], gain[f'{key}_ci_high'])}")
        rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("defaults", nargs="+", help="run folders (or folders of them) of the default rows")
    parser.add_argument("--tuned", required=True, help="folder of the tuned runs (methods named <method>+tuned)")
    parser.add_argument("--out", required=True, help="markdown file to write")
    parser.add_argument("--order", default="", help="comma-separated methods, in the table's order")
    args = parser.parse_args()
    table = tuning_gain(load_runs(args.defaults, complete_only=True), load_runs([args.tuned], complete_only=True),
                        [m for m in args.order.split(",") if m])
    text = (table.to_markdown(index=False) + "\n\nPaired Δ: per-seed difference of the tuned run to the default run "
            "of the same method and seed (mIoU points), mean and 95% paired t interval (* where it excludes 0).\n")
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
