"""The run directory: the files a run writes, no silent overwrite, and what ``--resume`` may change.

Rank 0 writes the directory; the other ranks only read its config. ``config.yaml`` is written before training,
``metrics.json`` after every evaluation (atomically, so a reader never sees half of it).
"""
from __future__ import annotations

import json
import os
import shutil

from .. import config as config_mod

# keys that may change when a run is resumed (everything else must match the run's saved config)
RESUMABLE_CHANGES = {"train.iters", "train.cpu_threads", "train.eval_interval", "train.checkpoint_interval",
                     "train.log_interval", "train.progress", "train.tensorboard", "data.num_workers", "train.overlays"}
RUN_FILES = ("config.yaml", "metrics.json", "steps.csv", "evals.csv", "train.log", "overlays.npz",
             "checkpoints", "tensorboard")


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (it holds a run and neither --resume nor --overwrite)."""


def checkpoint_path(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints", "last.pt")


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value and not prefix.startswith("methods"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def prepare_run_dir(run_dir: str, config: dict, resume: bool, overwrite: bool) -> tuple[dict, str | None]:
    """Check ``run_dir`` against the request; return the config to use and the checkpoint to resume from."""
    saved_config = os.path.join(run_dir, "config.yaml")
    last = checkpoint_path(run_dir)
    holds_run = os.path.isdir(run_dir) and any(os.path.exists(os.path.join(run_dir, f)) for f in RUN_FILES)
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other")
    if resume:
        if not os.path.isfile(saved_config):
            raise RunDirError(f"--resume: {run_dir!r} holds no run (no config.yaml); start it without --resume")
        saved = config_mod.validate(config_mod.load_file(saved_config))
        ours, theirs = _flat(config), _flat(saved)
        changed = sorted(k for k in set(ours) | set(theirs)
                         if ours.get(k) != theirs.get(k) and k not in RESUMABLE_CHANGES)
        if changed:
            details = "; ".join(f"{k}: run has {theirs.get(k)!r}, asked {ours.get(k)!r}" for k in changed[:6])
            raise RunDirError(f"--resume {run_dir!r}: the config differs from the run's in keys that cannot change "
                              f"on resume ({details}); only {sorted(RESUMABLE_CHANGES)} may")
        for key in RESUMABLE_CHANGES:
            section, name = key.split(".")
            saved[section][name] = config[section][name]
        return saved, (last if os.path.isfile(last) else None)
    if holds_run:
        if not overwrite:
            raise RunDirError(f"--out {run_dir!r} already holds a run; pass --resume to continue it, --overwrite "
                              "to replace it, or choose another --out")
    return config, None


def write_run_config(run_dir: str, config: dict, overwrite: bool) -> None:
    """Create ``run_dir`` (removing the files of the run it held when ``overwrite``) and write its config."""
    if overwrite:
        for name in RUN_FILES:
            path = os.path.join(run_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else (os.path.exists(path) and os.remove(path))
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(config_mod.dump(config))


def read_metrics(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "metrics.json")) as f:
        return json.load(f)


def write_metrics(run_dir: str, metrics: dict) -> None:
    path = os.path.join(run_dir, "metrics.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(metrics, f, indent=2)
    os.replace(tmp, path)
