"""Where a co-training step goes: median milliseconds per phase and images/s, per method.

    python benchmarks/profile_step.py --preset quick --methods independent,dml,kdcl-minlogit,ccl --steps 10

Phases are timed by wrapping the engine's own calls (each student's forward, the method's loss terms, the
backward pass, gradient clipping, each optimizer step) inside ``Trainer.train_step``; "data" is the time to
draw the next batch from the engine's loader. CPU only (no synchronisation needed).
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import pandas as pd
import torch

from ccl_bench.config import load_config
from ccl_bench.engine.trainer import Trainer


def timed(record: dict, name: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            record[name] += time.perf_counter() - start
    return wrapper


def profile(method: str, preset: str, steps: int, warmup: int, overrides: list[str]) -> dict:
    trainer = Trainer(load_config(preset, None, overrides, method=method), None, quiet=True)
    record: dict = defaultdict(float)
    for net, key in zip(trainer.nets, trainer.slots):
        net.forward = timed(record, f"forward {key}", net.forward)
    trainer.method.forward = timed(record, "loss terms", trainer.method.forward)
    for opt, key in zip(trainer.optimizers, trainer.slots):
        opt.step = timed(record, f"optimizer {key}", opt.step)
    backward, clip = torch.autograd.backward, torch.nn.utils.clip_grad_norm_
    torch.autograd.backward = timed(record, "backward", backward)
    torch.nn.utils.clip_grad_norm_ = timed(record, "grad clip", clip)
    rows = defaultdict(list)
    batches = trainer.batches()
    try:
        for i in range(warmup + steps):
            record.clear()
            start = time.perf_counter()
            x, y = next(batches)
            record["data"] = time.perf_counter() - start
            trainer.train_step(x, y)
            record["step (all)"] = time.perf_counter() - start
            if i >= warmup:
                for name, seconds in record.items():
                    rows[name].append(seconds)
    finally:
        torch.autograd.backward, torch.nn.utils.clip_grad_norm_ = backward, clip
    out = {name: 1000 * statistics.median(values) for name, values in rows.items()}
    out["other"] = out["step (all)"] - sum(v for k, v in out.items() if k != "step (all)")
    out["images/s"] = trainer.config["data"]["batch_size"] * 1000 / out["step (all)"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--methods", default="independent,dml,kdcl-minlogit,ccl")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--set", nargs="*", default=[], help="config overrides key=value")
    args = parser.parse_args()
    table = pd.DataFrame({m: profile(m, args.preset, args.steps, args.warmup, args.set)
                          for m in args.methods.split(",")})
    print(f"median ms per phase over {args.steps} steps (after {args.warmup}), preset {args.preset}, "
          f"{torch.get_num_threads()} threads")
    print(table.to_markdown(floatfmt=".1f"))


if __name__ == "__main__":
    main()
