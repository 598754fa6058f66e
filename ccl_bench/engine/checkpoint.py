"""Checkpoints: both students, the method's own state, optimizers, schedulers, AMP scaler, RNG states, step.

Files are written atomically (temporary file, then rename) and read with ``weights_only=True``; a file that is
not a readable ccl-bench checkpoint raises :class:`CheckpointError` naming it and saying what is wrong.
"""
from __future__ import annotations

import os
import random
import tempfile
from typing import Any

import numpy as np
import torch

from ..student_names import MAX_STUDENTS, legacy_slot, slots

FORMAT = "ccl-bench-checkpoint"
VERSION = 1
REQUIRED = ("format", "version", "step", "students", "method", "optimizers", "schedulers", "rng", "config")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, corrupt, of another kind or another run)."""


def rng_state() -> dict[str, Any]:
    """Every generator a training step draws from (plain types only: loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python[-2], tuple(python[:-2]), python[-1]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    """Write ``state`` (plus format tags) to ``path`` atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and check a checkpoint; any problem is a :class:`CheckpointError`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r}: no such file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, pickle errors, foreign objects: many exception types
        raise CheckpointError(f"checkpoint {path!r} is corrupt or not a torch checkpoint: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path!r} is not a ccl-bench training checkpoint "
                              f"(expected a dict with format={FORMAT!r})")
    if state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path!r} has version {state.get('version')!r}; this ccl-bench reads "
                              f"version {VERSION}")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} lacks {missing}; it is incomplete")
    if not isinstance(state["students"], dict) or not 2 <= len(state["students"]) <= MAX_STUDENTS:
        raise CheckpointError(f"checkpoint {path!r}: 'students' must hold 2 to {MAX_STUDENTS} state dicts by "
                              f"slot ('a', 'b', ...)")
    for key in ("students", "optimizers", "schedulers"):  # the two-student engine's slot keys cnn, vit
        if isinstance(state.get(key), dict):
            state[key] = {legacy_slot(k): v for k, v in state[key].items()}
    if list(state["students"]) != list(slots(len(state["students"]))):
        raise CheckpointError(f"checkpoint {path!r}: 'students' holds {sorted(state['students'])}; expected the "
                              f"slots {list(slots(len(state['students'])))}")
    return state


def export_student(checkpoint: str, student: str, out: str) -> str:
    """Write one student of a training checkpoint (or of a run directory's last checkpoint) as a plain state
    dict, loadable by ``build_student(name, num_classes, checkpoint=out)``. Returns ``out``."""
    if os.path.isdir(checkpoint):
        checkpoint = os.path.join(checkpoint, "checkpoints", "last.pt")
    state = load_checkpoint(checkpoint)
    slot = legacy_slot(student.lower())
    if slot not in state["students"]:
        raise ValueError(f"student={student!r}; expected one of {list(state['students'])} (the run's slots)")
    weights = state["students"][slot]
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    torch.save(weights, out)
    return out
