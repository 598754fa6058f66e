"""The baselines' losses for online distillation between a CNN and a ViT student (METHOD.md §6).

Plain functions over logits and labels, depending only on ``torch`` and :mod:`ccl_ops` (every KL goes through
:func:`ccl_ops.pixel_selective_kl`), the way :mod:`ccl_ops.losses` holds the proposed method's:

* :mod:`baselines.dml`: deep mutual learning (Zhang et al., CVPR 2018), the mutual KL at every valid pixel;
* :mod:`baselines.kdcl`: the per-pixel adaptation of KDCL (Guo et al., CVPR 2020), its ensemble teachers
  (naive, linear, min-logit, general) and the loss that distils each student from a teacher.

Each has a K-student form (METHOD.md §9) over a list of K students' logits: :func:`peer_kl`, :func:`kdcl_losses`
and the ``*_k`` teachers; with K = 2 they return the two-student functions' values to the bit.

The co-training methods built on them (``dml``, ``kdcl-*``) are in :mod:`ccl_bench.methods`.
"""
from .dml import mutual_kl, peer_kl
from .kdcl import (ensemble_weights, error_covariance, euclidean_simplex_projection, general_teacher,
                   general_teacher_k, kdcl_loss, kdcl_losses, linear_alpha, linear_teacher, linear_teacher_k,
                   linear_weights, min_logit_teacher, min_logit_teacher_k, naive_teacher, naive_teacher_k,
                   prediction_errors, project_to_simplex)

__all__ = ["mutual_kl", "naive_teacher", "linear_alpha", "linear_teacher", "min_logit_teacher", "prediction_errors",
           "error_covariance", "ensemble_weights", "project_to_simplex", "general_teacher", "kdcl_loss",
           # K >= 2 students (METHOD.md §9)
           "peer_kl", "kdcl_losses", "naive_teacher_k", "linear_weights", "linear_teacher_k",
           "euclidean_simplex_projection", "min_logit_teacher_k", "general_teacher_k"]
