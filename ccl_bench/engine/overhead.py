"""What a training step of each method costs (``ccl-bench overhead``), measured on one fixed batch.

The methods' steps are interleaved (A B A B ...) so that load changes on the machine hit all of them alike;
data loading is excluded.
"""
from __future__ import annotations

import statistics
import time
from typing import Sequence

import torch

from .trainer import Trainer


def timed_step(trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> float:
    """Seconds of one training step (synchronised on CUDA)."""
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    trainer.train_step(x, y)
    sync()
    return time.perf_counter() - start


def median_step_seconds(trainers: Sequence[Trainer], batch: tuple[torch.Tensor, torch.Tensor], warmup: int,
                        steps: int) -> list[float]:
    """Per trainer, the median seconds of ``steps`` interleaved steps on ``batch`` after ``warmup`` untimed ones."""
    times: list[list[float]] = [[] for _ in trainers]
    for i in range(warmup + steps):
        for trainer, record in zip(trainers, times):
            seconds = timed_step(trainer, *batch)
            if i >= warmup:
                record.append(seconds)
    return [statistics.median(record) for record in times]
