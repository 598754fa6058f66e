"""Run logs: CSV files (one row per logged step or evaluation), optional TensorBoard, messages."""
from __future__ import annotations

import csv
import os
import sys
import time


class CSVLog:
    """Append rows to ``path``; the columns are fixed by the first row (later new keys are an error).

    ``truncate(step)`` drops rows logged after ``step`` (a resumed run continues from its checkpoint)."""

    def __init__(self, path: str):
        self.path = path
        self.columns: list[str] | None = None
        if os.path.isfile(path):
            with open(path, newline="") as f:
                self.columns = next(csv.reader(f), None)

    def truncate(self, step: int) -> None:
        if not os.path.isfile(self.path):
            return
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns or [])
            writer.writeheader()
            writer.writerows(r for r in rows if int(r["step"]) <= step)

    def write(self, row: dict) -> None:
        new = self.columns is None
        if new:
            self.columns = list(row)
        extra = set(row) - set(self.columns)
        if extra:
            raise ValueError(f"{self.path}: new columns {sorted(extra)} after the header {self.columns}")
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            if new:
                writer.writeheader()
            writer.writerow({k: _fmt(row.get(k, "")) for k in self.columns})


def _fmt(value):
    return f"{value:.6g}" if isinstance(value, float) else value


class TensorBoard:
    """Scalars to ``<run>/tensorboard`` when enabled; a no-op otherwise."""

    def __init__(self, log_dir: str, enabled: bool):
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise RuntimeError("train.tensorboard=true needs the tensorboard package "
                                   "(pip install tensorboard), or set train.tensorboard=false") from exc
            self.writer = SummaryWriter(log_dir)

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Messages:
    """Lines to stderr (main process only) and to ``<run>/train.log``."""

    def __init__(self, path: str | None, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def __call__(self, text: str) -> None:
        if not self.enabled:
            return
        line = f"[ccl-bench {time.strftime('%H:%M:%S')}] {text}"
        print(line, file=sys.stderr, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")
