"""The KDCL methods (METHOD.md §6, per-pixel adaptation) over the teachers and loss of :mod:`baselines.kdcl`.

Each variant only chooses its ensemble teacher; :class:`KDCL` distils both students from it, and in invariant
mode gives each student its own photometric view.
"""
from __future__ import annotations

import torch

from baselines.kdcl import (ensemble_weights, error_covariance, general_teacher, kdcl_loss, linear_teacher,
                            min_logit_teacher, naive_teacher, prediction_errors)
from ccl_ops import to_label_size

from .base import HOLDOUT_NEEDED, Knob, Method, MethodOutput
from .registry import register


class KDCL(Method):
    description = "KDCL (per-pixel adaptation)"
    defaults = {"temperature": 2.0, "lambda_kl": 1.0, "invariant": False, "invariant_strength": 0.2}
    search_space = {"temperature": Knob(1.0, 4.0), "lambda_kl": Knob(0.25, 4.0)}

    def teacher(self, za: torch.Tensor, zb: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Ensemble teacher logits (no gradient), same shape as ``za``."""
        raise NotImplementedError

    def teacher_stats(self) -> dict[str, torch.Tensor]:
        """What the last teacher was made of, for the step logs (a variant's ensemble weight)."""
        return {}

    def views(self, x):
        """Invariant mode: each student sees its own random photometric perturbation (geometry unchanged, so the
        labels and the per-pixel teacher stay aligned)."""
        if not self.options["invariant"] or not self.training:
            return x, x
        return self._perturb(x), self._perturb(x)

    def _perturb(self, x: torch.Tensor) -> torch.Tensor:
        s = self.options["invariant_strength"]
        n = x.shape[0]
        gain = 1 + s * (2 * torch.rand(n, 1, 1, 1) - 1)
        shift = s * (2 * torch.rand(n, x.shape[1], 1, 1) - 1)
        return x * gain.to(x) + shift.to(x)

    def losses(self, out_a, out_b, y) -> MethodOutput:
        with torch.no_grad():
            zt = self.teacher(out_a.logits.detach(), out_b.logits.detach(), y)
        terms = self.ce_terms(out_a, out_b, y)
        for key, out in (("kl_a", out_a), ("kl_b", out_b)):
            kl = kdcl_loss(out.logits, zt, y, temperature=self.options["temperature"], ignore_index=self.ignore_index)
            terms[key] = self.options["lambda_kl"] * kl
        return MethodOutput(terms, self.teacher_stats())


@register
class KDCLNaive(KDCL):
    name = "kdcl-naive"
    description = "KDCL-Naive (per-pixel adaptation): teacher = the student with the lower CE at each pixel"

    def teacher(self, za, zb, y):
        return naive_teacher(za, zb, y, self.ignore_index)


@register
class KDCLLinear(KDCL):
    name = "kdcl-linear"
    description = "KDCL-Linear (per-pixel adaptation): teacher = alpha za + (1 - alpha) zb, alpha minimising the batch CE"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("alpha", torch.tensor(0.5), persistent=False)  # the last batch's, for the logs

    def teacher(self, za, zb, y):
        zt, alpha = linear_teacher(za, zb, y, self.ignore_index)
        self.alpha.fill_(alpha)
        return zt

    def teacher_stats(self):
        return {"alpha": self.alpha.clone()}


@register
class KDCLMinLogit(KDCL):
    name = "kdcl-minlogit"
    description = "KDCL-MinLogit (per-pixel adaptation): zt^j = min_s (z_s^j - z_s^y)"

    def teacher(self, za, zb, y):
        return min_logit_teacher(za, zb, y, self.ignore_index)


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
        self.register_buffer("weights", torch.tensor([0.5, 0.5]))  # checkpointed: resume keeps the estimate

    def on_epoch_start(self, epoch, holdout):
        # METHOD §6: equal weights during the first epoch (no trained students to estimate from yet).
        if holdout is None:
            raise ValueError(HOLDOUT_NEEDED.format(name=self.name))
        if epoch == 0:
            return
        t = self.options["temperature"]
        cov = torch.zeros(2, 2, dtype=torch.float64)
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

    def teacher(self, za, zb, y):
        return general_teacher(za, zb, self.weights, self.options["temperature"])

    def teacher_stats(self):
        return {"weight_a": self.weights[0].clone()}
