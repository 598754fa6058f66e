"""Paired differences over seeds with a 95% paired-t confidence interval (a markdown table).

Every method of the grid trains on the same seeds (same initialisation seed, same data order), so seed k of
`ccl` and seed k of `dml` form a pair. For each student the script takes the per-seed differences
``reference - other``, their mean, and the interval mean ± t(0.975, n-1) · sd / sqrt(n) (Student's t, n - 1
degrees of freedom; with 3 seeds t = 4.30). A difference is called *larger than seed noise* when its interval
excludes zero.

    python docs/results/paired.py docs/results/runs/main --reference ccl \
        --against independent,dml,kdcl-naive --out FILE.md
"""
from __future__ import annotations

import argparse
import sys

import pandas as pd
from ccl_bench.train_cli import split_method_specs
from ccl_bench.report import STUDENT_COLUMNS, load_runs, paired_t


def paired_table(runs: pd.DataFrame, reference: str, against: list[str]) -> pd.DataFrame:
    ref = runs[runs["method"] == reference].set_index("seed")
    if ref.empty:
        raise SystemExit(f"paired.py: no finished run of the reference method {reference!r}")
    rows = []
    for other in against:
        runs_other = runs[runs["method"] == other].set_index("seed")
        seeds = ref.index.intersection(runs_other.index)
        if seeds.empty:
            raise SystemExit(f"paired.py: no seed shared by {reference!r} and {other!r}")
        for key, title in STUDENT_COLUMNS:
            diff = 100 * (ref.loc[seeds, f"miou_{key}"] - runs_other.loc[seeds, f"miou_{key}"])
            mean, low, high = paired_t(diff)
            verdict = ("within seed noise" if not low > 0 and not high < 0
                       else f"{reference} {'higher' if low > 0 else 'lower'}")
            rows.append({"comparison": f"{reference} − {other}", "student": title, "seeds": len(seeds),
                         "per-seed Δ": " / ".join(f"{d:+.2f}" for d in diff),
                         "mean Δ": f"{mean:+.2f}", "95% CI": f"[{low:+.2f}, {high:+.2f}]", "verdict": verdict})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="folders holding finished runs")
    parser.add_argument("--reference", default="ccl", help="the method whose differences are taken")
    parser.add_argument("--against", required=True, help="comma-separated methods compared with the reference")
    parser.add_argument("--out", required=True, help="markdown file to write")
    args = parser.parse_args()
    runs = load_runs(args.folders, complete_only=True)
    table = paired_table(runs, args.reference, split_method_specs(args.against))
    text = ("mIoU differences in percentage points (11 classes), paired by seed; 95% CI: paired t interval over "
            "seeds (n − 1 degrees of freedom). *Within seed noise*: the interval contains 0.\n\n"
            + table.to_markdown(index=False, disable_numparse=True) + "\n")
    with open(args.out, "w") as f:
        f.write(f"<!-- made by: python docs/results/paired.py {' '.join(sys.argv[1:])} -->\n" + text)
    print(text)


if __name__ == "__main__":
    main()
