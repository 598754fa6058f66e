"""The tuning of every method as one markdown file: the chosen options (best.yaml) beside the defaults, and each
study's trials (trials.csv), best first.

    python docs/results3/tune_table.py docs/results3/tune --out docs/results3/tune.md
"""
from __future__ import annotations

import argparse
import os

import pandas as pd
import yaml

from ccl_bench.methods import method_class
from ccl_bench.student_names import legacy_column


def study_sections(folder: str) -> tuple[pd.DataFrame, list[str]]:
    chosen, sections = [], []
    for name in sorted(os.listdir(folder)):
        study = os.path.join(folder, name)
        if not os.path.isfile(os.path.join(study, "best.yaml")):
            continue
        cls = method_class(name)
        with open(os.path.join(study, "best.yaml")) as f:
            best = yaml.safe_load(f)["methods"][name]
        trials = pd.read_csv(os.path.join(study, "trials.csv")).rename(columns=legacy_column)
        top = trials.loc[trials["score"].idxmax()]
        chosen.append({"method": name, "trials": len(trials), "best trial": int(top["trial"]),
                       "score (defaults)": 100 * trials.loc[trials["trial"] == 0, "score"].item(),
                       "score (best)": 100 * top["score"],
                       **{k: f"{cls.defaults[k]:g} → {v:.3g}" for k, v in best.items()}})
        shown = trials.sort_values("score", ascending=False, kind="stable").astype({"trial": str})
        for col in ["score"] + [c for c in shown if c.startswith("miou_")]:
            shown[col] = 100 * shown[col]
        sections.append(f"### {name}\n\n" + shown.to_markdown(index=False, floatfmt=".3g") + "\n")
    return pd.DataFrame(chosen), sections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    chosen, sections = study_sections(args.folder)
    text = ("Score: the mean of the two students' final validation mIoU (%) on the held-out copy of the data "
            "(`data.options.seed=1`), training seed 0. Knobs: default → chosen.\n\n"
            + chosen.fillna("–").to_markdown(index=False, floatfmt=".2f") + "\n\n## Trials\n\n" + "\n".join(sections))
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
