"""Aggregate run directories into comparison tables (markdown, CSV, LaTeX) and plots.

Reads only each run's ``metrics.json`` (``{"method", "seed", "step", "miou": {"a", "b", ..., "ensemble"}}``,
fractions; the two-student engine's keys ``cnn``/``vit`` read as ``a``/``b``), so runs made by other tools
aggregate too. Per method: mIoU of every student and the ensemble as mean ± std over seeds (in %), the
difference of the means to the baseline (``independent``), and the paired differences over the seeds both have
(mean ± std, paired-t 95% interval). One table holds runs of one set of students.
"""
from __future__ import annotations

import json
import math
import os
from typing import Iterable, Sequence

import pandas as pd

from .student_names import ENSEMBLE, LETTERS, legacy_column, legacy_slot


def student_columns(frame: pd.DataFrame) -> list[tuple[str, str]]:
    """``[(key, title)]`` of the students in a runs table, then the ensemble: each student is named by its
    slot's letter in the columns (``A``) and by its model in the table's notes."""
    keys = [k for k in LETTERS if f"miou_{k}" in frame or f"{k}_mean" in frame]
    return [(k, k.upper()) for k in keys] + [(ENSEMBLE, "Ens.")]
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


def _read_metrics(run: str) -> dict:
    path = os.path.join(run, "metrics.json")
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON file ({' '.join(str(exc).split())})") from None
    if not isinstance(m, dict):
        raise ValueError(f"{path}: expected a JSON object with method, seed, step, miou; got {type(m).__name__}")
    missing = [k for k in ("method", "seed", "step", "miou") if k not in m]
    if missing:
        raise ValueError(f"{path} lacks {missing}; expected at least method, seed, step, miou")
    return m


def _field(path: str, key: str, value, ok: bool, expected: str):
    if not ok:
        raise ValueError(f"{path}: {key}={value!r}; expected {expected}")
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _row(run: str, m: dict) -> dict:
    """One table row from a metrics.json, every field checked: a foreign or hand-edited file is an error naming
    it, never a wrong number in the table (e.g. mIoU in % where fractions are expected)."""
    path = os.path.join(run, "metrics.json")
    row = {"method": _field(path, "method", m["method"], isinstance(m["method"], str) and m["method"], "a name"),
           "seed": _field(path, "seed", m["seed"], _is_int(m["seed"]), "an int"),
           "step": _field(path, "step", m["step"], _is_int(m["step"]), "an int"),
           "complete": _field(path, "complete", m.get("complete", True), isinstance(m.get("complete", True), bool),
                              "true or false"),
           "run_dir": run}
    for field in ("miou", "train_miou"):
        if field == "train_miou" and field not in m:
            continue
        values = _field(path, field, m[field], isinstance(m[field], dict), "an object {a, b, ..., ensemble}")
        values = {legacy_slot(k): v for k, v in values.items()}
        keys = [k for k in values if k in LETTERS] + [ENSEMBLE]
        if len(keys) < 3 or keys[:-1] != list(LETTERS[:len(keys) - 1]):
            _field(path, field, m[field], False, "an object {a, b, ..., ensemble} with 2 to 8 students")
        for key in keys:
            value = values.get(key)
            fraction = isinstance(value, (int, float)) and not isinstance(value, bool) and (
                math.isnan(value) or 0 <= value <= 1)
            row[f"{field}_{key}"] = math.nan if value is None else float(
                _field(path, f"{field}.{key}", value, fraction, "a fraction in [0, 1] (not %) or null"))
    students = m.get("students") if isinstance(m.get("students"), dict) else {}
    students = {legacy_slot(k): v for k, v in students.items()}
    for slot in keys[:-1]:
        row[f"model_{slot}"] = students.get(slot)
    ramp = m.get("distill_ramp", 0.0)
    row["distill_ramp"] = float(_field(path, "distill_ramp", ramp, isinstance(ramp, (int, float)) and not
                                       isinstance(ramp, bool), "a number"))
    return row


def load_runs(paths: Iterable[str], complete_only: bool = False) -> pd.DataFrame:
    """One row per run: method, seed, step, complete, miou_a, miou_b, ..., miou_ensemble, run_dir."""
    rows, seen = [], {}
    for run in find_runs(paths):
        row = _row(run, _read_metrics(run))
        key = (row["method"], row["seed"])
        if key in seen:
            raise ValueError(f"{run}/metrics.json and {seen[key]}/metrics.json are both method {key[0]!r} seed "
                             f"{key[1]}; expected one run per method and seed (report the folders separately)")
        seen[key] = run
        rows.append(row)
    counts = {sum(1 for k in row if k.startswith("miou_")) - 1 for row in rows}
    if len(counts) > 1:
        raise ValueError(f"report: the runs have {' and '.join(map(str, sorted(counts)))} students; expected one "
                         f"set of students per table (report them separately)")
    slots = LETTERS[:counts.pop()] if rows else "ab"
    columns = (["method", "seed", "step", "complete"]
               + [f"{f}_{k}" for f in ("miou", "train_miou") for k in (*slots, ENSEMBLE)]
               + [f"model_{slot}" for slot in slots] + ["distill_ramp", "run_dir"])
    df = pd.DataFrame(rows, columns=columns)
    if complete_only:
        df = df[df["complete"]]
    for slot in slots:  # one table compares one set of students
        models = df[f"model_{slot}"].dropna().unique()
        if len(models) > 1:
            raise ValueError(f"report: the runs put different students in slot {slot.upper()} "
                             f"({', '.join(sorted(models))}); expected one set of students per table (report them "
                             f"separately)")
    return df


def student_note(df: pd.DataFrame) -> str:
    """``A = <model>, B = <model>, ...`` for the table's notes."""
    parts = []
    for slot, title in student_columns(df)[:-1]:
        models = df[f"model_{slot}"].dropna().unique() if f"model_{slot}" in df else []
        parts.append(f"{title} = {models[0] if len(models) else 'unknown'}")
    return "Students: " + ", ".join(parts) + "; Ens. = the mean of their probabilities."


def paired_t(differences: pd.Series, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and the two ends of the paired-t interval of per-seed differences: mean ± t(0.5 + level/2, n-1) ·
    sd / sqrt(n) (NaN ends with fewer than two pairs)."""
    from scipy import stats

    n = len(differences)
    mean = differences.mean() if n else math.nan
    if n < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.5 + level / 2, n - 1) * differences.std(ddof=1) / n ** 0.5
    return mean, mean - half, mean + half


def _check_csv(path: str) -> None:
    if not (os.path.isfile(path) and os.path.getsize(path)):
        return
    try:
        frame = pd.read_csv(path)
    except Exception as exc:  # pandas parser errors come in several types
        raise ValueError(f"{path}: not a readable CSV file ({' '.join(str(exc).split())})") from None
    if "step" not in frame or not pd.api.types.is_numeric_dtype(frame["step"]) or frame["step"].duplicated().any():
        raise ValueError(f"{path}: expected a 'step' column of distinct numbers (a log written by ccl-bench train)")
    from .plots import SHARES

    plotted = {"loss"} | {col for col, _ in SHARES}
    text = [c for c in frame if (c in plotted or c.startswith(("miou_", "ce_")))
            and not pd.api.types.is_numeric_dtype(frame[c])]
    if text:
        raise ValueError(f"{path}: columns {text} hold non-numbers; expected numeric logs")


def check_plot_inputs(df: pd.DataFrame) -> None:
    """The logs the plots read (steps.csv, evals.csv, the history in metrics.json, overlays.npz), checked before
    anything is written: a broken or foreign one is an error naming it (``--no-plots`` skips them)."""
    import numpy as np

    for run in df["run_dir"]:
        for name in ("steps.csv", "evals.csv"):
            _check_csv(os.path.join(run, name))
        history = _read_metrics(run).get("history")
        if history is not None and not (isinstance(history, list) and all(
                isinstance(h, dict) and _is_int(h.get("step")) for h in history)):
            raise ValueError(f"{run}/metrics.json: history is not a list of {{step, miou_...}} rows")
        source = os.path.join(run, "overlays.npz")
        if os.path.isfile(source):
            needed = ("images", "labels", "pred_a", "pred_b", "pixel_direction", "region_direction",
                      "region", "ignore_index", "rule")
            try:
                with np.load(source) as data:
                    files = {legacy_column(k): k for k in data.files}  # pred_cnn, pred_vit: pred_a, pred_b
                    absent = [k for k in needed if k not in files]
                    if not absent:
                        [data[files[k]] for k in needed]  # decodes every array: a truncated file fails here
            except Exception as exc:
                raise ValueError(f"{source}: not a readable overlays file ({' '.join(str(exc).split())})") from None
            if absent:
                raise ValueError(f"{source} lacks {absent}; expected the overlays written by ccl-bench train")


def _order(methods: Sequence[str], baseline: str, order: Sequence[str] = ()) -> list[str]:
    """The baseline, then the methods of ``order`` (e.g. compare's --methods), then the others as found."""
    unique = list(dict.fromkeys(methods))
    ranked = [m for m in order if m in unique] + [m for m in unique if m not in order]
    return ([baseline] if baseline in unique else []) + [m for m in ranked if m != baseline]


def summarize(df: pd.DataFrame, baseline: str = "independent", order: Sequence[str] = ()) -> pd.DataFrame:
    """Numeric summary (fractions): per method and student, mean, std, n, delta and the paired differences."""
    out = []
    columns = student_columns(df)
    base = df[df["method"] == baseline].set_index("seed")
    for method in _order(df["method"], baseline, order):
        runs = df[df["method"] == method].set_index("seed").sort_index()
        row = {"method": method, "seeds": len(runs), "seed_list": ",".join(map(str, runs.index))}
        ramps = sorted(runs["distill_ramp"].unique()) if "distill_ramp" in runs else []
        row["distill_ramp"] = ",".join(f"{r:g}" for r in ramps)
        for key, _ in columns:
            col = runs[f"miou_{key}"]
            row[f"{key}_mean"] = col.mean()
            row[f"{key}_std"] = col.std(ddof=1) if len(col) > 1 else math.nan
            train = runs.get(f"train_miou_{key}", pd.Series(dtype=float)).dropna()
            row[f"{key}_train_mean"] = train.mean() if len(train) else math.nan
            if len(base) and method != baseline:
                row[f"{key}_delta"] = col.mean() - base[f"miou_{key}"].mean()
                common = runs.index.intersection(base.index)
                paired = col.loc[common] - base.loc[common, f"miou_{key}"]
                row[f"{key}_paired_mean"] = paired.mean() if len(paired) else math.nan
                row[f"{key}_paired_std"] = paired.std(ddof=1) if len(paired) > 1 else math.nan
                _, row[f"{key}_ci_low"], row[f"{key}_ci_high"] = paired_t(paired)
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
    columns = student_columns(summary)
    for _, r in summary.iterrows():
        name = r["method"] + (" †" if r["method"].startswith(ADAPTED) else "")
        row = {"Method": name, "Seeds": int(r["seeds"])}
        for key, title in columns:
            row[f"{title} mIoU"] = _pm(r[f"{key}_mean"], r[f"{key}_std"])
        for key, title in columns:
            row[f"Δ{title}"] = _signed(r.get(f"{key}_delta", math.nan))
        for key, title in columns:
            row[f"paired Δ{title}"] = _signed(r.get(f"{key}_paired_mean", math.nan), r.get(f"{key}_paired_std", math.nan))
        for key, title in columns:
            row[f"95% CI Δ{title}"] = _interval(r.get(f"{key}_ci_low", math.nan), r.get(f"{key}_ci_high", math.nan))
        if summary.filter(like="_train_mean").notna().any().any():
            for key, title in columns:
                row[f"{title} train mIoU"] = _pm(r.get(f"{key}_train_mean", math.nan), math.nan)
        if any(ramp not in ("", "0") for ramp in summary.get("distill_ramp", ())):  # some method ramps
            row["ramp"] = r["distill_ramp"]
        rows.append(row)
    return pd.DataFrame(rows)


def _interval(low: float, high: float) -> str:
    if low is None or (isinstance(low, float) and math.isnan(low)):
        return "–"
    mark = " *" if low > 0 or high < 0 else ""  # the interval excludes 0: larger than seed noise
    return f"[{100 * low:+.2f}, {100 * high:+.2f}]{mark}"


def to_markdown(table: pd.DataFrame, baseline: str = "independent", students: str = "") -> str:
    headers = list(table.columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    notes = [f"mIoU in % (mean ± std over seeds), on the validation set; Δ: difference of the means to "
             f"`{baseline}`; paired Δ: per-seed differences to it (mean ± std); 95% CI: paired t interval over the "
             "seeds both have (* where it excludes 0: larger than seed noise)."
             + (" train mIoU: on the fixed training subset (mean over seeds)." if any("train" in h for h in headers)
                else "")
             + (" ramp: the distillation ramp-up of METHOD.md §8 (fraction of the steps; 0: none)."
                if "ramp" in headers else "")]
    if students:
        notes.append(students)
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
        raise ValueError(f"report: no {'complete ' if complete_only else ''}run (metrics.json) found under "
                         f"{list(paths)}")
    if plots:
        check_plot_inputs(df)  # every input is checked before the first file is written
    summary = summarize(df, baseline, order)
    table = display_table(summary, baseline)
    os.makedirs(out, exist_ok=True)
    written = {"markdown": os.path.join(out, "table.md"), "csv": os.path.join(out, "table.csv"),
               "latex": os.path.join(out, "table.tex"), "runs": os.path.join(out, "runs.csv")}
    with open(written["markdown"], "w") as f:
        f.write(to_markdown(table, baseline, student_note(df)))
    with open(written["latex"], "w") as f:
        f.write(to_latex(table, baseline))
    summary.to_csv(written["csv"], index=False)
    df.to_csv(written["runs"], index=False)
    if plots:
        from .plots import plot_all

        written.update(plot_all(df, os.path.join(out, "plots")))
    return written
