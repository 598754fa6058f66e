"""Learning curve of the quick regime: mIoU of each student against images seen, mean ± std over seeds.

    python docs/curve/curve.py docs/curve/runs --out docs/curve
    python docs/curve/curve.py docs/results/runs/main/independent docs/results/runs/main/ccl --students cnn,vit \
        --out docs/results/curve

reads every run's ``evals.csv`` (evaluations every ``train.eval_interval`` steps) and ``config.yaml`` (batch
size), writes ``curve.md`` (a markdown table) and ``curve.png``.
"""
from __future__ import annotations

import argparse
import os

import matplotlib
import pandas as pd
import yaml

from ccl_bench.report import find_runs

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STUDENTS = {"miou_cnn": "CNN", "miou_vit": "ViT", "miou_ensemble": "ensemble"}


def load(folders: list[str]) -> pd.DataFrame:
    frames = []
    for run in find_runs(folders):
        with open(os.path.join(run, "config.yaml")) as f:
            config = yaml.safe_load(f)
        evals = pd.read_csv(os.path.join(run, "evals.csv"))
        frames.append(evals.assign(seed=config["seed"], method=config.get("label") or config["method"],
                                   images=evals["step"] * config["data"]["batch_size"]))
    return pd.concat(frames, ignore_index=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--students", default="cnn,vit,ensemble", help="comma-separated: cnn, vit, ensemble")
    args = parser.parse_args()
    students = {f"miou_{s}": STUDENTS[f"miou_{s}"] for s in args.students.split(",")}
    data = load(args.folders)
    grouped = data.groupby(["method", "step", "images"])[list(students)]
    mean, std, count = grouped.mean(), grouped.std(ddof=1), grouped.size()
    table = pd.DataFrame({"seeds": count})
    for key, name in students.items():
        table[f"{name} mIoU %"] = [f"{100 * m:.1f} ± {100 * s:.1f}" for m, s in zip(mean[key], std[key])]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "curve.md"), "w") as f:
        f.write(table.reset_index().to_markdown(index=False) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    linestyles = {"miou_cnn": "-o", "miou_vit": "--s", "miou_ensemble": ":^"}  # colour: method; line: student
    for colour, method in enumerate(mean.index.unique("method")):
        for key, name in students.items():
            m, s = mean.loc[method][key], std.loc[method][key]
            images = m.index.get_level_values("images")
            ax.errorbar(images, 100 * m.values, yerr=100 * s.fillna(0).values, fmt=linestyles[key],
                        color=f"C{colour}", capsize=3, label=f"{method} {name}")
    ax.set_xlabel("training images seen")
    ax.set_ylabel("validation mIoU % (11 classes)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "curve.png"), dpi=120)
    print(table.reset_index().to_markdown(index=False))


if __name__ == "__main__":
    main()
