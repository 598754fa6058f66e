"""Baselines for online distillation between a CNN and a ViT student (METHOD.md §6).

``independent`` (no exchange), ``dml`` (Zhang et al., CVPR 2018) and the per-pixel adaptation of KDCL
(Guo et al., CVPR 2020): ``kdcl-naive``, ``kdcl-linear``, ``kdcl-minlogit``, ``kdcl-general``. Every KL goes
through :func:`ccl_ops.pixel_selective_kl`. Importing this package registers them in
:mod:`ccl_bench.methods`.
"""
from .dml import DML, Independent
from .kdcl import KDCL_VARIANTS, KDCLGeneral, KDCLLinear, KDCLMinLogit, KDCLNaive, linear_alpha

__all__ = ["Independent", "DML", "KDCLNaive", "KDCLLinear", "KDCLMinLogit", "KDCLGeneral", "KDCL_VARIANTS",
           "linear_alpha"]
