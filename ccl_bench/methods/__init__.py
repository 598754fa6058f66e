"""Co-training methods: the proposed ``ccl`` and the baselines, one registry by name.

Each method is a thin ``Method`` over its losses: ``ccl`` over :mod:`ccl_ops.losses`, ``dml`` and ``kdcl-*``
over :mod:`baselines`. Importing this package imports every method's module, which registers it.

A method gets both students' logits (at the label resolution) and encoder features, returns named, weighted
loss terms (the engine sums and logs them) and detached diagnostics (teaching shares). Our readings of
METHOD.md where it leaves a choice, all configurable through the method's options:

* ``ccl`` HFD: Gamma = 1x1 conv + bilinear resize to the other student's stage-1 grid; the borrowed stage 2 runs
  with detached weights and untouched BatchNorm statistics (``run_stage(frozen=True)``); MSE in float32; the
  Gammas train with their source student's optimizer. Region-wise BSD: :class:`ccl_ops.RegionBSDLoss`
  (projection width ``rbsd_dim``, common grid = the finer feature grid); ``proj_a`` trains with A, ``proj_b``
  with B. Pixel-wise BSD: :class:`ccl_ops.PixelBSDLoss` (``rule``, ``normalize``, ``temperature``).
* ``kdcl-*`` are per-pixel adaptations of a classification method. Naive: ties go to A. Linear: ``alpha`` per
  batch (per process under DDP). General: the held-out slice is the data configuration's (``data.holdout`` of
  the training set, drawn with the run's seed, removed from the training of every method); errors use the temperature-softened probabilities;
  ``ridge`` regularises the 2x2 covariance. Invariant mode: each student gets its own photometric gain and
  shift (geometric augmentations would misalign the per-pixel teacher).
"""
from .base import Knob, Method, MethodOutput, StudentOutput
from .registry import METHODS, build_method, method_class, method_names, parse_method_spec, register
from . import ccl, dml, independent, kdcl  # noqa: F401,E402  (each registers its methods)

__all__ = ["Knob", "Method", "MethodOutput", "StudentOutput", "METHODS", "build_method", "method_class",
           "method_names", "parse_method_spec", "register"]
