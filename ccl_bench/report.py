"""Aggregate run directories into comparison tables (markdown, CSV, LaTeX) and plots.

Reads only each run's ``metrics.json`` (``{"method", "seed", "step", "miou": {"cnn", "vit", "ensemble"}}``,
fractions), so runs made by other tools aggregate too. Per method: mIoU of the CNN, the ViT and the ensemble
as mean ± std over seeds (in %), the difference of the means to the baseline (``independent``), and the
paired differences over the seeds both have (mean ± std).
"""
from __future__ import annotations

import json
import math
import os
from typing import Iterable, Sequence

import pandas as pd

STUDENT_COLUMNS = (("cnn", "CNN"), ("vit", "ViT"), ("ensemble", "Ens."))
ADAPTED = "kdcl"  # methods adapted from classification: marked in every table
ADAPTED_NOTE = "† KDCL is a classification method; per-pixel KDCL is our adaptation (METHOD.md §6)."


def find_runs(paths: Iterable[str]) -> list[str]:
    """Run directories (holding ``metrics.json``) at or below ``paths``, sorted."""
    found = set()
    for path in paths:
        if os.path.isfile(path) and os.path.basename(path) == "metrics.json":
            found.add(os.path.dirname(os.path.abspath(path)))
            continue
        if not os.path.isdir(path):
            raise FileNotFoundError(f"report: {path!r} is neither a run directory nor a folder of runs")
        for root, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if d not in ("checkpoints", "tensorboard", "plots")]
            if "metrics.json" in files:
                found.add(os.path.abspath(root))
    return sorted(found)


def load_runs(paths: Iterable[str], complete_only: bool = False) -> pd.DataFrame:
    """One row per run: method, seed, step, complete, miou_cnn, miou_vit, miou_ensemble, run_dir."""
    rows = []
    for run in find_runs(paths):
        with open(os.path.join(run, "metrics.json")) as f:
            try:
                m = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{run}/metrics.json is not valid JSON ({exc})") from exc
        missing = [k for k in ("method", "seed", "step", "miou") if k not in m]
        if missing:
            raise ValueError(f"{run}/metrics.json lacks {missing}; expected at least method, seed, step, miou")
        row = {"method": str(m["method"]), "seed": int(m["seed"]), "step": int(m["step"]),
               "complete": bool(m.get("complete", True)), "run_dir": run}
        row.update({f"miou_{k}": float(m["miou"].get(k, math.nan)) for k, _ in STUDENT_COLUMNS})
        rows.append(row)
    columns = ["method", "seed", "step", "complete"] + [f"miou_{k}" for k, _ in STUDENT_COLUMNS] + ["run_dir"]
    df = pd.DataFrame(rows, columns=columns)
    if complete_only:
        df = df[df["complete"]]
    return df


def _order(methods: Sequence[str], baseline: str, order: Sequence[str] = ()) -> list[str]:
    """The baseline, then the methods of ``order`` (e.g. compare's --methods), then the others as found."""
    unique = list(dict.fromkeys(methods))
    ranked = [m for m in order if m in unique] + [m for m in unique if m not in order]
    return ([baseline] if baseline in unique else []) + [m for m in ranked if m != baseline]


def summarize(df: pd.DataFrame, baseline: str = "independent", order: Sequence[str] = ()) -> pd.DataFrame:
    """Numeric summary (fractions): per method and student, mean, std, n, delta and the paired differences."""
    out = []
    base = df[df["method"] == baseline].set_index("seed")
    for method in _order(df["method"], baseline, order):
        runs = df[df["method"] == method].set_index("seed").sort_index()
        row = {"method": method, "seeds": len(runs), "seed_list": ",".join(map(str, runs.index))}
        for key, _ in STUDENT_COLUMNS:
            col = runs[f"miou_{key}"]
            row[f"{key}_mean"] = col.mean()
            row[f"{key}_std"] = col.std(ddof=1) if len(col) > 1 else math.nan
            if len(base) and method != baseline:
                row[f"{key}_delta"] = col.mean() - base[f"miou_{key}"].mean()
                common = runs.index.intersection(base.index)
                paired = col.loc[common] - base.loc[common, f"miou_{key}"]
                row[f"{key}_paired_mean"] = paired.mean() if len(paired) else math.nan
                row[f"{key}_paired_std"] = paired.std(ddof=1) if len(paired) > 1 else math.nan
                row[f"{key}_pairs"] = len(paired)
        out.append(row)
    return pd.DataFrame(out)


def _pm(mean: float, std: float) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    text = f"{100 * mean:.2f}"
    return text + (f" ± {100 * std:.2f}" if std is not None and not math.isnan(std) else "")


def _signed(value: float, std: float = math.nan) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    text = f"{100 * value:+.2f}"
    return text + (f" ± {100 * std:.2f}" if std is not None and not math.isnan(std) else "")


def display_table(summary: pd.DataFrame, baseline: str = "independent") -> pd.DataFrame:
    """The table as strings, mIoU in %: mean ± std, Δ vs the baseline, paired Δ (mean ± std over seeds)."""
    rows = []
    for _, r in summary.iterrows():
        name = r["method"] + (" †" if r["method"].startswith(ADAPTED) else "")
        row = {"Method": name, "Seeds": int(r["seeds"])}
        for key, title in STUDENT_COLUMNS:
            row[f"{title} mIoU"] = _pm(r[f"{key}_mean"], r[f"{key}_std"])
        for key, title in STUDENT_COLUMNS:
            row[f"Δ{title}"] = _signed(r.get(f"{key}_delta", math.nan))
        for key, title in STUDENT_COLUMNS:
            row[f"paired Δ{title}"] = _signed(r.get(f"{key}_paired_mean", math.nan), r.get(f"{key}_paired_std", math.nan))
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame, baseline: str = "independent") -> str:
    headers = list(table.columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    notes = [f"mIoU in % (mean ± std over seeds); Δ: difference of the means to `{baseline}`; paired Δ: "
             "per-seed differences to it (mean ± std)."]
    if table["Method"].str.contains("†").any():
        notes.append(ADAPTED_NOTE)
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def to_latex(table: pd.DataFrame, baseline: str = "independent") -> str:
    def esc(text: str) -> str:
        return (str(text).replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%")
                .replace("&", r"\&").replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("†", r"$^\dagger$"))

    headers = [esc(h) for h in table.columns]
    lines = [r"\begin{tabular}{l" + "r" * (len(headers) - 1) + "}", r"\toprule", " & ".join(headers) + r" \\",
             r"\midrule"]
    lines += [" & ".join(esc(v) for v in row) + r" \\" for row in table.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    if table["Method"].str.contains("†").any():
        lines.append("% " + ADAPTED_NOTE)
    return "\n".join(lines) + "\n"


def write_report(paths: Sequence[str], out: str, baseline: str = "independent", plots: bool = True,
                 complete_only: bool = False, order: Sequence[str] = ()) -> dict[str, str]:
    """Write ``table.md``, ``table.csv`` (numeric, fractions), ``table.tex``, ``runs.csv`` and plots into
    ``out``; return the paths written."""
    df = load_runs(paths, complete_only=complete_only)
    if df.empty:
        raise ValueError(f"report: no run (metrics.json) found under {list(paths)}")
    summary = summarize(df, baseline, order)
    table = display_table(summary, baseline)
    os.makedirs(out, exist_ok=True)
    written = {"markdown": os.path.join(out, "table.md"), "csv": os.path.join(out, "table.csv"),
               "latex": os.path.join(out, "table.tex"), "runs": os.path.join(out, "runs.csv")}
    with open(written["markdown"], "w") as f:
        f.write(to_markdown(table, baseline))
    with open(written["latex"], "w") as f:
        f.write(to_latex(table, baseline))
    summary.to_csv(written["csv"], index=False)
    df.to_csv(written["runs"], index=False)
    if plots:
        from .plots import plot_all

        written.update(plot_all(df, os.path.join(out, "plots")))
    return written
