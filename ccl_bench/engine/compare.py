"""The runs of ``ccl-bench compare``: one directory per method spec and seed, reused when finished and
continued when started, so that an interrupted comparison picks up where it stopped."""
from __future__ import annotations

import os
from typing import Callable

from .run_dir import read_metrics
from .trainer import run_training


def run_dir_name(spec: str) -> str:
    """A folder name for a method spec (``ccl:region=[8,8]`` -> ``ccl_region=_8_8_``)."""
    return "".join(c if c.isalnum() or c in "-_=.+" else "_" for c in spec)


def train_or_reuse(config: dict, run_dir: str, say: Callable[[str], None]) -> None:
    """Train ``config`` into ``run_dir``: nothing when the run there is complete for the config's budget,
    resume it when it has started (a config.yaml), else start it."""
    resume = os.path.isfile(os.path.join(run_dir, "config.yaml"))
    if resume and os.path.isfile(os.path.join(run_dir, "metrics.json")):
        done = read_metrics(run_dir)
        if done.get("complete") and done.get("step", -1) >= config["train"]["iters"]:
            say(f"compare: {run_dir} is complete; reusing it")
            return
    if resume:
        say(f"compare: continuing {run_dir}")
    run_training(config, run_dir, resume=resume)
