"""The names of the two students everywhere in ccl_bench: configs (``students.cnn``, ``optim.vit``), checkpoints,
metrics, ``evals.csv`` columns, ``metrics.json`` keys, reports and plots.

METHOD.md calls them student A (the CNN) and student B (the ViT); :mod:`ccl_ops` and :mod:`baselines` keep those
generic names (``za``, ``zb``, ``loss_a``), since their ops do not care which student is which. A method receives
the two students' outputs in the order of :data:`STUDENTS` (A, B) and maps them to the ops' A and B; the loss
terms and teaching shares it logs keep METHOD.md's names (``ce_a``, ``pixel_ab``: A teaches B).
"""
CNN, VIT = STUDENTS = ("cnn", "vit")  # student A, student B
ENSEMBLE = "ensemble"  # the mean of the two students' probabilities (METHOD.md §7)
RESULT_KEYS = (*STUDENTS, ENSEMBLE)  # what the evaluation reports on, in this order
