"""Learning curves of finished runs as a markdown table, and the flatness check of the positive control: the
gain of each student's validation mIoU over the last quarter of the budget and between the last two
evaluations, and the train - validation gap at the end.

    python docs/positive_control/curves.py RUN_OR_FOLDER... --out FILE.md
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import pandas as pd

from ccl_bench.report import load_runs
from ccl_bench.student_names import LETTERS, legacy_column, student_labels


def read_evals(run: str) -> pd.DataFrame:
    """A run's evals.csv, columns named by slot (miou_a, train_miou_b; older runs wrote miou_cnn, ...)."""
    return pd.read_csv(os.path.join(run, "evals.csv")).rename(columns=legacy_column)


def slots_of(frame: pd.DataFrame) -> list[str]:
    return [k for k in LETTERS if f"miou_{k}" in frame]


def curve_rows(run: str, label: str) -> list[dict]:
    frame = read_evals(run)
    rows = []
    for _, r in frame.iterrows():
        row = {"run": label, "step": int(r["step"])}
        for slot in slots_of(frame):
            row[f"{slot.upper()} val"] = f"{100 * r[f'miou_{slot}']:.1f}"
            if f"train_miou_{slot}" in frame:
                row[f"{slot.upper()} train"] = f"{100 * r[f'train_miou_{slot}']:.1f}"
        rows.append(row)
    return rows


def flatness(run: str) -> dict:
    """Validation mIoU gain over the last quarter (the curve read at 75% of the steps, linearly between the two
    evaluations around it when none falls there) and over the last interval between evaluations."""
    frame = read_evals(run).set_index("step")
    last = frame.index.max()
    previous = frame.index[frame.index < last].max()
    out = {}
    for slot in slots_of(frame):
        curve = frame[f"miou_{slot}"]
        at_75 = np.interp(0.75 * last, curve.index.to_numpy(dtype=float), curve.to_numpy())
        name = slot.upper()
        out[f"{name} last-quarter gain"] = 100 * (curve[last] - at_75)
        out[f"{name} gain {previous}->{last}"] = 100 * (curve[last] - curve[previous])
        if f"train_miou_{slot}" in frame:
            out[f"{name} train - val"] = 100 * (frame.loc[last, f"train_miou_{slot}"] - curve[last])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="run directories or folders of runs")
    parser.add_argument("--out", required=True, help="markdown file to write")
    parser.add_argument("--curves", action="store_true", help="also the whole curve of every run")
    args = parser.parse_args()
    runs = load_runs(args.paths, complete_only=True)
    names = student_labels({slot: runs[f"model_{slot}"].dropna().iloc[0] for slot in LETTERS
                            if f"model_{slot}" in runs})
    flat = pd.DataFrame([{"method": m, "seed": s, **flatness(d)} for m, s, d in
                         zip(runs["method"], runs["seed"], runs["run_dir"])])
    text = [f"<!-- made by: python docs/positive_control/curves.py {' '.join(sys.argv[1:])} -->",
            f"Students: {', '.join(names.values())}. mIoU in %; last-quarter gain: "
            "validation mIoU at the end minus the curve at 75% of the steps (read linearly between the evaluations "
            "around it); gain a->b: between the last two evaluations; "
            "train - val: the gap at the end (fixed training subset minus validation set).", "",
            flat.to_markdown(index=False, floatfmt="+.2f"), ""]
    if args.curves:
        rows = [row for m, s, d in zip(runs["method"], runs["seed"], runs["run_dir"])
                for row in curve_rows(d, f"{m} seed {s}")]
        text += [pd.DataFrame(rows).to_markdown(index=False), ""]
    with open(args.out, "w") as f:
        f.write("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
