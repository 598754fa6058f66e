"""What tuning changed, per method: the tuned row against the same method's defaults, seed by seed (paired Δ and
its 95% t interval, mIoU in %), for every method that has both (`<method>` and `<method>+tuned`).

    python docs/results3/tuning_gain.py DEFAULT_RUNS... --tuned docs/results3/runs/cnn-vit/tuned \
        --out docs/results3/cnn-vit/tuned/vs_defaults.md [--order dml,kdcl-naive,...]
"""
from __future__ import annotations

import argparse

import pandas as pd

from ccl_bench.report import load_runs, paired_t, student_columns

SUFFIX = "+tuned"


def tuning_gain(defaults: pd.DataFrame, tuned: pd.DataFrame, order: list[str] = ()) -> pd.DataFrame:
    rows = []
    labels = sorted(tuned["method"].unique(), key=lambda l: (list(order) + [l.removesuffix(SUFFIX)]).index(
        l.removesuffix(SUFFIX)))
    for label in labels:
        method = label.removesuffix(SUFFIX)
        base = defaults[defaults["method"] == method].set_index("seed")
        runs = tuned[tuned["method"] == label].set_index("seed")
        common = runs.index.intersection(base.index).sort_values()
        if label == method or not len(common):
            continue
        row = {"method": method, "seeds": len(common)}
        for key, title in student_columns(tuned):
            mean, low, high = paired_t(100 * (runs.loc[common, f"miou_{key}"] - base.loc[common, f"miou_{key}"]))
            star = " *" if low > 0 or high < 0 else ""
            row[f"tuned − defaults {title}"] = f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]{star}"
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
