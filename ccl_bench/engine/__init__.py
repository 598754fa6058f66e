"""One co-training engine for every method: data order, seeds, schedule, AMP, DDP, checkpoints, logs.

``trainer`` (the loop, checkpoints of the whole run, signals) uses ``run_dir`` (the run directory and the
checks of --resume), ``sampling`` (deterministic data order and augmentation seeds, the held-out slice) and
``evaluation`` (metrics, overlays, what metrics.json holds).
"""
from .checkpoint import CheckpointError, export_student, load_checkpoint, save_checkpoint
from .run_dir import RunDirError
from .trainer import NonFiniteLossError, TrainingInterrupted, Trainer, run_training

__all__ = ["Trainer", "run_training", "CheckpointError", "NonFiniteLossError", "RunDirError",
           "TrainingInterrupted", "export_student", "load_checkpoint", "save_checkpoint"]
