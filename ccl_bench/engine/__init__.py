"""One co-training engine for every method: data order, seeds, schedule, AMP, DDP, checkpoints, logs."""
from .checkpoint import CheckpointError, export_student, load_checkpoint, save_checkpoint
from .trainer import NonFiniteLossError, RunDirError, TrainingInterrupted, Trainer, run_training

__all__ = ["Trainer", "run_training", "CheckpointError", "NonFiniteLossError", "RunDirError",
           "TrainingInterrupted", "export_student", "load_checkpoint", "save_checkpoint"]
