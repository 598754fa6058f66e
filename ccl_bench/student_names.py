"""The names of the two student slots everywhere in ccl_bench: configs (``students.cnn``, ``optim.vit``), checkpoints,
metrics, ``evals.csv`` columns, ``metrics.json`` keys, reports and plots.

METHOD.md calls them student A (the CNN) and student B (the ViT); :mod:`ccl_ops` and :mod:`baselines` keep those
generic names (``za``, ``zb``, ``loss_a``), since their ops do not care which student is which. A method receives
the two students' outputs in the order of :data:`STUDENTS` (A, B) and maps them to the ops' A and B; the loss
terms and teaching shares it logs keep METHOD.md's names (``ce_a``, ``pixel_ab``: A teaches B).
"""
CNN, VIT = STUDENTS = ("cnn", "vit")  # student A, student B
ENSEMBLE = "ensemble"  # the mean of the two students' probabilities (METHOD.md §7)
RESULT_KEYS = (*STUDENTS, ENSEMBLE)  # what the evaluation reports on, in this order
SLOT_LETTERS = dict(zip(STUDENTS, "AB"))


def student_label(slot: str, model: str | None) -> str:
    """How tables, plots and logs name the student in ``slot``: METHOD.md's letter and the configured model
    (``"A deeplabv3plus_resnet10t"``), so that a CNN in the second slot is never called a ViT. The slot names
    ``cnn``/``vit`` are the config's and the files' keys only: either slot takes any student."""
    return f"{SLOT_LETTERS[slot]} {model}" if model else f"{SLOT_LETTERS[slot]} ({slot})"


def student_labels(students: dict) -> dict[str, str]:
    """``{slot: label}`` for a config's ``students`` section or a metrics.json ``students`` mapping."""
    return {slot: student_label(slot, v["name"] if isinstance(v, dict) else v) for slot, v in students.items()}
