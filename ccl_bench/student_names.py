"""The names of the student slots everywhere in ccl_bench: checkpoints, metrics, ``evals.csv`` columns,
``metrics.json`` keys, loss terms, reports and plots.

A run has K students (2 to 8), in the order of the config's ``students`` list. Slot k is named by a letter,
``a``, ``b``, ``c``, ... (METHOD.md calls the first two A and B): ``miou_a``, ``ce_b``, ``lr_c`` in the files,
"A deeplabv3plus_resnet10t" in tables, plots and logs. :mod:`ccl_ops` and :mod:`baselines` keep the generic
names of their ops (``za``, ``zb``, ``loss_a``). Runs of the two-student engine named the slots ``cnn`` and
``vit``; :func:`legacy_slot` maps those keys onto ``a`` and ``b`` wherever old run folders are read.
"""
from __future__ import annotations

MAX_STUDENTS = 8
LETTERS = "abcdefgh"[:MAX_STUDENTS]
ENSEMBLE = "ensemble"  # the mean of all students' probabilities (METHOD.md §7, §9)
LEGACY_SLOTS = {"cnn": "a", "vit": "b"}  # the two-student engine's slot keys


def slots(k: int) -> tuple[str, ...]:
    """The slot keys of a run of ``k`` students: ``('a', 'b', ...)``."""
    if not 2 <= k <= MAX_STUDENTS:
        raise ValueError(f"{k} students; expected 2 to {MAX_STUDENTS}")
    return tuple(LETTERS[:k])


def result_keys(k: int) -> tuple[str, ...]:
    """What an evaluation reports on, in this order: every student, then their ensemble."""
    return (*slots(k), ENSEMBLE)


def legacy_slot(key: str) -> str:
    """``cnn`` -> ``a``, ``vit`` -> ``b`` (keys of the two-student engine's files); anything else unchanged."""
    return LEGACY_SLOTS.get(key, key)


def legacy_column(name: str) -> str:
    """``miou_cnn`` -> ``miou_a``, ``lr_vit`` -> ``lr_b``, ``pred_cnn`` -> ``pred_a`` (the two-student engine's
    ``evals.csv``/``steps.csv`` columns and overlay arrays); anything else unchanged."""
    head, sep, tail = name.rpartition("_")
    return f"{head}_{LEGACY_SLOTS[tail]}" if sep and tail in LEGACY_SLOTS else name


def student_label(slot: str, model: str | None) -> str:
    """How tables, plots and logs name the student in ``slot``: its letter and its model
    (``"A deeplabv3plus_resnet10t"``), so that students are never named by a family they may not belong to."""
    return f"{slot.upper()} {model}" if model else slot.upper()


def student_labels(models: dict[str, str | None]) -> dict[str, str]:
    """``{slot: label}`` for ``{slot: model name}``."""
    return {slot: student_label(slot, model) for slot, model in models.items()}
