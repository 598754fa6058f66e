"""Plots of a set of runs (matplotlib, Agg): mIoU and loss curves, teaching shares over training, and
direction-mask overlays on validation images (which student teaches where)."""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd

from .student_names import ENSEMBLE, LETTERS, legacy_column, student_label

SHARES = (("pixel_ab", "pixels A→B"), ("pixel_ba", "pixels B→A"), ("region_ab", "regions A→B"),
          ("region_ba", "regions B→A"))


def _slots(runs: pd.DataFrame) -> list[str]:
    return [k for k in LETTERS if f"miou_{k}" in runs]


def _names(runs: pd.DataFrame) -> dict[str, str]:
    """Each slot's label (``A deeplabv3plus_resnet10t``) where every run agrees on its model, else the letter."""
    names = {}
    for slot in _slots(runs):
        models = set(runs.get(f"model_{slot}", pd.Series(dtype=object)).dropna())
        names[slot] = student_label(slot, models.pop() if len(models) == 1 else None)
    return {**names, ENSEMBLE: "ensemble"}


def _legend(ax, **kwargs) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def _finish(fig, axes, path: str, ylim=None) -> str:
    """Common axes dressing, then save and close."""
    plt = _pyplot()
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ylim:
            ax.set_ylim(*ylim)
        _legend(ax, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _read_csv(path: str) -> pd.DataFrame | None:
    """A run's log (its legacy ``_cnn``/``_vit`` columns named by slot)."""
    if not (os.path.isfile(path) and os.path.getsize(path)):
        return None
    return pd.read_csv(path).rename(columns=legacy_column)


def _mean_by_step(frames: list[pd.DataFrame], column: str) -> pd.Series | None:
    parts = [f.set_index("step")[column] for f in frames if f is not None and column in f]
    return pd.concat(parts, axis=1).mean(axis=1) if parts else None


def _history(run_dir: str) -> pd.DataFrame | None:
    frame = _read_csv(os.path.join(run_dir, "evals.csv"))
    if frame is not None:
        return frame
    with open(os.path.join(run_dir, "metrics.json")) as f:
        history = json.load(f).get("history")
    return pd.DataFrame(history).rename(columns=legacy_column) if history else None


def plot_miou_curves(runs: pd.DataFrame, path: str) -> str:
    plt = _pyplot()
    keys = [*_slots(runs), ENSEMBLE]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), sharey=True)
    names = _names(runs)
    for method, group in runs.groupby("method", sort=False):
        frames = [_history(d) for d in group["run_dir"]]
        for ax, key in zip(axes, keys):
            curve = _mean_by_step(frames, f"miou_{key}")
            if curve is not None:
                line, = ax.plot(curve.index, 100 * curve.values, marker="o", label=f"{method} (val)")
                ax.set_title(f"{names[key]} mIoU (mean over seeds)")
                train = _mean_by_step(frames, f"train_miou_{key}")
                if train is not None:  # the fixed training subset: the gap to val is the overfitting
                    ax.plot(train.index, 100 * train.values, "--", color=line.get_color(), label=f"{method} (train)")
    axes[0].set_ylabel("mIoU (%)")
    return _finish(fig, axes, path)


def plot_loss_curves(runs: pd.DataFrame, path: str) -> str:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    names = _names(runs)
    for method, group in runs.groupby("method", sort=False):
        frames = [_read_csv(os.path.join(d, "steps.csv")) for d in group["run_dir"]]
        total = _mean_by_step(frames, "loss")
        if total is not None:
            axes[0].plot(total.index, total.values, label=method)
        for i, who in enumerate(_slots(runs)):
            series = _mean_by_step(frames, f"ce_{who}")
            style = ("-", "--", ":", "-.")[i % 4]
            if series is not None:
                axes[1].plot(series.index, series.values, style, label=f"{method} CE {names[who]}")
    axes[0].set_title("total loss")
    axes[1].set_title("cross-entropy of each student")
    return _finish(fig, axes, path)


def plot_shares(runs: pd.DataFrame, path: str) -> str | None:
    """Share of pixels / regions where A teaches B and B teaches A, over training (methods that select)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    drawn = False
    # two students: who teaches whom (SHARES); K > 2: where each student learns (pixels) and teaches (regions)
    peers = [(0, f"pixel_{k}", f"pixels {k.upper()} learns") for k in _slots(runs)] + [
        (1, f"region_{k}", f"regions {k.upper()} teaches") for k in _slots(runs)]
    for method, group in runs.groupby("method", sort=False):
        frames = [_read_csv(os.path.join(d, "steps.csv")) for d in group["run_dir"]]
        for i, (col, title) in enumerate(SHARES):
            curve = _mean_by_step(frames, col)
            if curve is not None:
                drawn = True
                axes[i // 2].plot(curve.index, curve.values, "-" if i % 2 == 0 else "--", label=f"{method}: {title}")
        for ax, col, title in peers if len(_slots(runs)) > 2 else ():
            curve = _mean_by_step(frames, col)
            if curve is not None:
                drawn = True
                axes[ax].plot(curve.index, curve.values, label=f"{method}: {title}")
    if not drawn:
        plt.close(fig)
        return None
    axes[0].set_title("pixel-wise BSD: share of valid pixels taught")
    axes[1].set_title("region-wise BSD: share of regions taught")
    return _finish(fig, axes, path, ylim=(0, 1))


def _direction_rgb(direction: np.ndarray) -> np.ndarray:
    """+1 (A teaches) red, -1 (B teaches) blue, 0 white."""
    rgb = np.ones(direction.shape + (3,), np.float32)
    rgb[direction > 0] = (0.85, 0.2, 0.15)
    rgb[direction < 0] = (0.15, 0.35, 0.85)
    return rgb


# One colour per student (A, B, C, ...) in the K-student maps: its name in the key, its RGB.
STUDENT_COLOURS = (("red", (0.85, 0.2, 0.15)), ("blue", (0.15, 0.35, 0.85)), ("green", (0.2, 0.65, 0.3)),
                   ("orange", (0.9, 0.6, 0.1)), ("purple", (0.55, 0.3, 0.75)), ("brown", (0.45, 0.3, 0.2)),
                   ("pink", (0.9, 0.45, 0.7)), ("grey", (0.4, 0.4, 0.4)))


def _target_rgb(target: np.ndarray) -> np.ndarray:
    """Each region in its target student's colour, white where there is none (-1)."""
    rgb = np.ones(target.shape + (3,), np.float32)
    for s, (_, colour) in enumerate(STUDENT_COLOURS):
        rgb[target == s] = colour
    return rgb


def _learners_rgb(learners: np.ndarray) -> np.ndarray:
    """Pixels where one student learns in its colour, where several learn black, white where none does."""
    rgb = np.ones(learners.shape + (3,), np.float32)
    for s, (_, colour) in enumerate(STUDENT_COLOURS):
        rgb[learners == 1 << s] = colour
    several = (learners & (learners - 1)) != 0
    rgb[several] = 0.0
    return rgb


def plot_overlays(run_dir: str, path: str, heading: str | None = None,
                  names: dict[str, str] | None = None) -> str | None:
    """Image, labels, every student's prediction, who teaches each pixel and each region: with two students red
    where A teaches B, blue where B teaches A; with K > 2 (METHOD.md §9) the pixels where each student learns
    and each region's target, in the students' colours. The title is ``heading`` (default: the run folder's
    name) and the colour key."""
    source = os.path.join(run_dir, "overlays.npz")
    if not os.path.isfile(source):
        return None
    plt = _pyplot()
    with np.load(source) as stored:
        data = {legacy_column(k): stored[k] for k in stored.files}
    students = [k for k in LETTERS if f"pred_{k}" in data]
    names = names or {slot: student_label(slot, None) for slot in students}
    peers = "region_target" in data
    images, labels = data["images"], data["labels"]
    rh, rw = (int(v) for v in data["region"])
    ignore = int(data["ignore_index"])
    count = len(images)
    grid = tuple(int(v) for v in data["region_grid"]) if "region_grid" in data else ()
    score = f", {data['score']}" if "score" in data else ""
    shown = students if peers else students[:2]
    cols = ("image", "label", *(f"{names.get(k, k.upper())} prediction" for k in shown),
            f"pixels ({data['rule']} rule)" + (": who learns" if peers else ""),
            f"regions {rh}x{rw}{score}" + (f" on {grid[0]}x{grid[1]}" if grid else "") + (": target" if peers else ""))
    fig, axes = plt.subplots(count, len(cols), figsize=(2.2 * len(cols), 2.2 * count), squeeze=False)
    vmax = max([int(labels[labels != ignore].max(initial=0))] + [int(data[f"pred_{k}"].max()) for k in shown])
    for i in range(count):
        h, w = labels[i].shape
        region = data["region_target" if peers else "region_direction"][i]
        if region.shape != (h, w):  # one value per region (no training grid recorded)
            region = np.kron(region, np.ones((rh, rw), np.int8))[:h, :w]
        label = np.ma.masked_equal(labels[i], ignore)
        maps = ((_learners_rgb(data["pixel_learners"][i]), _target_rgb(region)) if peers else
                (_direction_rgb(data["pixel_direction"][i]), _direction_rgb(region)))
        panels = (images[i], label, *(data[f"pred_{k}"][i] for k in shown), *maps)
        for j, panel in enumerate(panels):
            ax = axes[i, j]
            if 1 <= j < len(panels) - 2:
                ax.imshow(panel, cmap="tab20", vmin=0, vmax=max(vmax, 1), interpolation="nearest")
            elif j >= len(panels) - 2:
                ax.imshow(images[i])
                ax.imshow(panel, alpha=0.6, interpolation="nearest")
            else:
                ax.imshow(panel)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(cols[j], fontsize=8)
    if peers:
        key = ", ".join(f"{names.get(k, k.upper())} {c}" for k, (c, _) in zip(shown, STUDENT_COLOURS))
        key += "; black: several students learn"
    else:
        key = f"red = {names.get('a', 'A')} teaches {names.get('b', 'B')}, blue = the reverse"
    fig.suptitle(f"{heading or os.path.basename(run_dir)}: {key}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(runs: pd.DataFrame, out: str) -> dict[str, str]:
    """Every plot for the runs of a report; returns name -> path."""
    os.makedirs(out, exist_ok=True)
    written = {"miou_curves": plot_miou_curves(runs, os.path.join(out, "miou_curves.png")),
               "loss_curves": plot_loss_curves(runs, os.path.join(out, "loss_curves.png"))}
    shares = plot_shares(runs, os.path.join(out, "teaching_shares.png"))
    if shares:
        written["teaching_shares"] = shares
    names = _names(runs)
    for method, group in runs.groupby("method", sort=False):
        first = group.sort_values("seed").iloc[0]
        safe = "".join(c if c.isalnum() or c in "-_=" else "_" for c in method)
        path = plot_overlays(first["run_dir"], os.path.join(out, f"overlays_{safe}.png"),
                             f"{method} (seed {first['seed']})", names)
        if path:
            written[f"overlays_{method}"] = path
    return written
