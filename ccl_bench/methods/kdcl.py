"""The KDCL methods (METHOD.md §6, per-pixel adaptation) over the teachers and loss of :mod:`baselines.kdcl`.

Each variant only chooses its ensemble teacher; :class:`KDCL` distils both students from it, and in invariant
mode gives each student its own photometric view.
"""
from __future__ import annotations

import torch

from baselines.kdcl import (ensemble_weights, error_covariance, general_teacher_k, kdcl_losses, linear_teacher_k,
                            min_logit_teacher_k, naive_teacher_k, prediction_errors)
from ccl_ops import to_label_size

from ..student_names import MAX_STUDENTS
from .base import HOLDOUT_NEEDED, Knob, Method, MethodOutput
from .registry import register


class KDCL(Method):
    description = "KDCL (per-pixel adaptation)"
    defaults = {"temperature": 2.0, "lambda_kl": 1.0, "invariant": False, "invariant_strength": 0.2}
    search_space = {"temperature": Knob(1.0, 4.0), "lambda_kl": Knob(0.25, 4.0)}
    students_range = (2, MAX_STUDENTS)

    def teacher(self, logits: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        """Ensemble teacher logits from all students' ``logits`` (no gradient), the shape of each."""
        raise NotImplementedError

    def teacher_stats(self) -> dict[str, torch.Tensor]:
        """What the last teacher was made of, for the step logs (a variant's ensemble weight)."""
        return {}

    def views(self, x):
        """Invariant mode: each student sees its own random photometric perturbation (geometry unchanged, so the
        labels and the per-pixel teacher stay aligned)."""
        if not self.options["invariant"] or not self.training:
            return (x,) * len(self._students)
        return tuple(self._perturb(x) for _ in self._students)

    def _perturb(self, x: torch.Tensor) -> torch.Tensor:
        s = self.options["invariant_strength"]
        n = x.shape[0]
        gain = 1 + s * (2 * torch.rand(n, 1, 1, 1) - 1)
        shift = s * (2 * torch.rand(n, x.shape[1], 1, 1) - 1)
        return x * gain.to(x) + shift.to(x)

    def losses(self, *outs, y) -> MethodOutput:
        with torch.no_grad():
            zt = self.teacher([o.logits.detach() for o in outs], y)
        terms = self.ce_terms(*outs, y=y)
        kls = kdcl_losses([o.logits for o in outs], zt, y, temperature=self.options["temperature"],
                          ignore_index=self.ignore_index)
        terms.update({f"kl_{slot}": self.options["lambda_kl"] * kl for slot, kl in zip(self.slots, kls)})
        return MethodOutput(terms, self.teacher_stats())


@register
class KDCLNaive(KDCL):
    name = "kdcl-naive"
    description = "KDCL-Naive (per-pixel adaptation): teacher = the student with the lower CE at each pixel"

    def teacher(self, logits, y):
        return naive_teacher_k(logits, y, self.ignore_index)


@register
class KDCLLinear(KDCL):
    name = "kdcl-linear"
    description = "KDCL-Linear (per-pixel adaptation): teacher = alpha za + (1 - alpha) zb, alpha minimising the batch CE"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # the last batch's weights, for the logs (two students: alpha, A's weight)
        self.register_buffer("weights", torch.full((len(self._students),), 1 / len(self._students)),
                             persistent=False)

    def teacher(self, logits, y):
        zt, weights = linear_teacher_k(logits, y, self.ignore_index)
        self.weights.copy_(weights.to(self.weights))
        return zt

    def teacher_stats(self):
        if len(self.slots) == 2:
            return {"alpha": self.weights[0].clone()}
        return {f"weight_{slot}": w.clone() for slot, w in zip(self.slots, self.weights)}


@register
class KDCLMinLogit(KDCL):
    name = "kdcl-minlogit"
    description = "KDCL-MinLogit (per-pixel adaptation): zt^j = min_s (z_s^j - z_s^y)"

    def teacher(self, logits, y):
        return min_logit_teacher_k(logits, y, self.ignore_index)


@register
class KDCLGeneral(KDCL):
    name = "kdcl-general"
    description = ("KDCL-General (per-pixel adaptation): probability ensemble weighted by the inverse error "
                   "covariance on a held-out slice of the training set, projected onto the simplex, "
                   "re-estimated at the start of every epoch after the first (equal weights before)")
    defaults = {**KDCL.defaults, "ridge": 1e-6}
    needs_holdout = True  # METHOD §6: the slice is the data configuration's (data.holdout), for every method

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        k = len(self._students)  # equal weights until the first estimate; checkpointed: resume keeps it
        self.register_buffer("weights", torch.full((k,), 1 / k))

    def on_epoch_start(self, epoch, holdout):
        # METHOD §6: equal weights during the first epoch (no trained students to estimate from yet).
        if holdout is None:
            raise ValueError(HOLDOUT_NEEDED.format(name=self.name))
        if epoch == 0:
            return
        t = self.options["temperature"]
        k = len(self._students)
        cov = torch.zeros(k, k, dtype=torch.float64)
        count = torch.zeros((), dtype=torch.float64)
        with torch.no_grad():
            for x, y in holdout:
                errors = [prediction_errors(to_label_size(model(x), y), y, t, self.ignore_index)
                          for model in self._students]
                cov += error_covariance(errors).cpu()
                count += errors[0].shape[0]
        cov, count = holdout.sum(cov), holdout.sum(count)  # summed over ranks
        weights = ensemble_weights(cov / count.clamp(min=1), self.options["ridge"])
        self.weights.copy_(weights.to(self.weights))

    def teacher(self, logits, y):
        return general_teacher_k(logits, self.weights, self.options["temperature"])

    def teacher_stats(self):
        if len(self.slots) == 2:
            return {"weight_a": self.weights[0].clone()}
        return {f"weight_{slot}": w.clone() for slot, w in zip(self.slots, self.weights)}
