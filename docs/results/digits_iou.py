"""Two numbers the mIoU table needs to be read on the digits data (a markdown file).

1. The all-background floor: the mIoU of predicting "background" at every pixel of the same evaluation images.
   A student below or at it has learned nothing about the digits.
2. The digit-class mIoU (mean IoU over the 10 digit classes, background left out) per method and student,
   mean ± std over seeds, from each run's ``metrics.json``: at small budgets the background IoU (~0.93) is
   most of the 11-class mIoU and hides what the students learned about the digits.

    python docs/results/digits_iou.py docs/results/runs/main --order independent,dml,ccl --out FILE.md
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import pandas as pd
import torch
import yaml

from ccl_bench.data import build_dataset
from ccl_bench.train_cli import split_method_specs
from ccl_bench.metrics import SegMetrics
from ccl_bench.report import find_runs


def background_floor(config: dict) -> tuple[float, int]:
    """mIoU of predicting background everywhere, and the number of evaluation images."""
    data = config["data"]
    dataset = build_dataset(data["dataset"], data["val_split"], data["root"], **data["options"], **data["val_options"])
    metrics = SegMetrics(dataset.num_classes)
    for i in range(len(dataset)):
        _, label = dataset[i]
        metrics.update(torch.zeros_like(label)[None], label[None])
    return metrics.compute()["miou"], len(dataset)


def digit_miou(folders: list[str]) -> tuple[pd.DataFrame, dict]:
    rows, config = [], None
    for run in find_runs(folders):
        with open(os.path.join(run, "metrics.json")) as f:
            metrics = json.load(f)
        if not metrics.get("complete"):
            continue
        if config is None:
            with open(os.path.join(run, "config.yaml")) as f:
                config = yaml.safe_load(f)
        row = {"method": metrics["method"], "seed": metrics["seed"]}
        for student, iou in metrics["iou"].items():
            digits = [v for v in iou[1:] if v == v]  # classes 1..10; NaN = absent class
            row[student] = 100 * sum(digits) / len(digits)
        rows.append(row)
    if not rows:
        raise SystemExit(f"no finished run under {folders}")
    return pd.DataFrame(rows), config


def main(folders: list[str], order: list[str]) -> str:
    runs, config = digit_miou(folders)
    found = list(dict.fromkeys(runs["method"]))
    order = [m for m in order if m in found] + [m for m in found if m not in order]
    table = runs.groupby("method", sort=False).agg(["mean", "std"]).drop(columns="seed").reindex(order)
    shown = pd.DataFrame({"method": order, "seeds": runs.groupby("method", sort=False).size().reindex(order).values})
    for student in ("cnn", "vit", "ensemble"):
        mean, std = table[(student, "mean")], table[(student, "std")]
        shown[f"{student} digit mIoU"] = [f"{m:.2f}" + (f" ± {s:.2f}" if s == s else "") for m, s in zip(mean, std)]
    floor, images = background_floor(config)
    text = (f"All-background floor (11-class mIoU of predicting background everywhere on the same {images} "
            f"evaluation images): {100 * floor:.2f}%\n\n"
            "Digit-class mIoU in % (10 digit classes, background left out), mean ± std over seeds:\n\n"
            + shown.to_markdown(index=False) + "\n")
    return text


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="folders holding finished runs")
    parser.add_argument("--order", default="", help="comma-separated methods listed first, in this order")
    parser.add_argument("--out", required=True, help="markdown file to write")
    args = parser.parse_args()
    text = main(args.folders, split_method_specs(args.order))
    with open(args.out, "w") as f:
        f.write(f"<!-- made by: python docs/results/digits_iou.py {' '.join(sys.argv[1:])} -->\n" + text)
    print(text)
