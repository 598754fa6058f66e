"""KDCL (Guo et al., CVPR 2020) adapted per pixel (METHOD.md §6): each student distils from a detached ensemble
teacher ``zt`` built from both students. *Per-pixel KDCL is our adaptation of a classification method.*

``L = CE_a + CE_b + l T^2 [KL(softmax(zt/T) || p_a) + KL(softmax(zt/T) || p_b)]``; the KL is
``ccl_ops.pixel_selective_kl(z, zt, y, rule="all").loss_a`` (the teacher side is a constant inside the op).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import ccl_ops
from ccl_ops.reference import selection_masks
from ccl_bench.methods.base import Method, MethodOutput
from ccl_bench.methods.registry import register


class KDCL(Method):
    description = "KDCL (per-pixel adaptation)"
    defaults = {"temperature": 2.0, "lambda_kl": 1.0, "invariant": False, "invariant_strength": 0.2}

    def teacher(self, za: torch.Tensor, zb: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Ensemble teacher logits (no gradient), same shape as ``za``."""
        raise NotImplementedError

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
        t = self.options["temperature"]
        with torch.no_grad():
            zt = self.teacher(out_a.logits.detach(), out_b.logits.detach(), y)
        terms = self.ce_terms(out_a, out_b, y)
        for key, out in (("kl_a", out_a), ("kl_b", out_b)):
            kl = ccl_ops.pixel_selective_kl(out.logits, zt.to(out.logits.dtype), y, temperature=t, rule="all",
                                            ignore_index=self.ignore_index)
            terms[key] = self.options["lambda_kl"] * kl.loss_a
        return MethodOutput(terms)


def _target(y: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return torch.where(y == ignore_index, 0, y)


@register
class KDCLNaive(KDCL):
    name = "kdcl-naive"
    description = "KDCL-Naive (per-pixel adaptation): teacher = the student with the lower CE at each pixel"

    def teacher(self, za, zb, y):
        # B teaches where its CE is strictly lower (the "confidence" selection of ccl_ops), A elsewhere.
        _, b_better, _ = selection_masks(za, zb, y, "confidence", self.ignore_index)
        return torch.where(b_better[:, None], zb, za)


def linear_alpha(za: torch.Tensor, zb: torch.Tensor, y: torch.Tensor, ignore_index: int = 255,
                 tol: float = 1e-3) -> float:
    """``alpha`` in [0, 1] minimising the batch CE of ``alpha za + (1 - alpha) zb`` to ``tol`` (the CE is convex in
    alpha: bisection on the sign of its derivative)."""
    valid = y != ignore_index
    if not valid.any():
        return 0.5
    za_v = za.float().permute(0, 2, 3, 1)[valid]  # (P, C)
    zb_v = zb.float().permute(0, 2, 3, 1)[valid]
    onehot = F.one_hot(y[valid], za.shape[1]).float()
    diff = za_v - zb_v
    lo, hi = 0.0, 1.0

    def slope(alpha: float) -> float:
        p = torch.softmax(zb_v + alpha * diff, dim=1)
        return float(((p - onehot) * diff).sum(1).mean())

    if slope(0.0) >= 0:
        return 0.0
    if slope(1.0) <= 0:
        return 1.0
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if slope(mid) > 0:
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)


@register
class KDCLLinear(KDCL):
    name = "kdcl-linear"
    description = "KDCL-Linear (per-pixel adaptation): teacher = alpha za + (1 - alpha) zb, alpha minimising the batch CE"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("alpha", torch.tensor(0.5), persistent=False)

    def teacher(self, za, zb, y):
        alpha = linear_alpha(za, zb, y, self.ignore_index)
        self.alpha.fill_(alpha)
        return alpha * za + (1 - alpha) * zb

    def losses(self, out_a, out_b, y):
        out = super().losses(out_a, out_b, y)
        out.stats["alpha"] = self.alpha.clone()
        return out


@register
class KDCLMinLogit(KDCL):
    name = "kdcl-minlogit"
    description = "KDCL-MinLogit (per-pixel adaptation): zt^j = min_s (z_s^j - z_s^y)"

    def teacher(self, za, zb, y):
        index = _target(y, self.ignore_index)[:, None]
        return torch.minimum(za - za.gather(1, index), zb - zb.gather(1, index))


def project_to_simplex(w: torch.Tensor) -> torch.Tensor:
    """METHOD §6's projection of the ensemble weights: each clipped to [0, 1], then renormalised to sum 1."""
    w = w.clamp(0, 1)
    return w / w.sum()


@register
class KDCLGeneral(KDCL):
    name = "kdcl-general"
    description = ("KDCL-General (per-pixel adaptation): probability ensemble weighted by the inverse error "
                   "covariance on a held-out slice of the training set, projected onto the simplex, "
                   "re-estimated at the start of every epoch after the first (equal weights before)")
    defaults = {**KDCL.defaults, "holdout": 0.1, "ridge": 1e-6}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not 0 < self.options["holdout"] < 1:
            raise ValueError(f"method 'kdcl-general': holdout={self.options['holdout']!r}; expected a fraction "
                             "of the training set in (0, 1)")
        self.holdout_fraction = self.options["holdout"]
        self.register_buffer("weights", torch.tensor([0.5, 0.5]))  # checkpointed: resume keeps the estimate

    def on_epoch_start(self, epoch, holdout):
        # METHOD §6: equal weights during the first epoch (no trained students to estimate from yet); the
        # unconstrained estimate on untrained students gave weights like 5 and -4 and collapsed both students.
        if holdout is None or epoch == 0:
            return
        cov = torch.zeros(2, 2, dtype=torch.float64)
        count = torch.zeros((), dtype=torch.float64)
        a, b = self._students
        with torch.no_grad():
            for x, y in holdout:
                errors = []
                for model in (a, b):
                    z = model(x)
                    if z.shape[-2:] != y.shape[-2:]:
                        z = F.interpolate(z, size=y.shape[-2:], mode="bilinear", align_corners=False)
                    valid = y != self.ignore_index
                    p = torch.softmax(z.float() / self.options["temperature"], 1).permute(0, 2, 3, 1)[valid]
                    errors.append(p - F.one_hot(y[valid], z.shape[1]).float())
                e = torch.stack(errors)  # (2, P, C)
                cov += torch.einsum("spc,tpc->st", e.double(), e.double()).cpu()
                count += e.shape[1]
        cov, count = holdout.sum(cov), holdout.sum(count)  # summed over ranks
        cov = cov / count.clamp(min=1) + self.options["ridge"] * torch.eye(2, dtype=torch.float64)
        inv_one = torch.linalg.solve(cov, torch.ones(2, dtype=torch.float64))
        self.weights.copy_(project_to_simplex(inv_one / inv_one.sum()).to(self.weights))

    def teacher(self, za, zb, y):
        t = self.options["temperature"]
        w = self.weights.to(za.device, torch.float32)
        q = w[0] * torch.softmax(za.float() / t, 1) + w[1] * torch.softmax(zb.float() / t, 1)
        q = q.clamp(min=1e-8)
        q = q / q.sum(1, keepdim=True)
        return t * q.log()  # softmax(zt / T) = q

    def losses(self, out_a, out_b, y):
        out = super().losses(out_a, out_b, y)
        out.stats["weight_a"] = self.weights[0].clone()
        return out


KDCL_VARIANTS = ("kdcl-naive", "kdcl-linear", "kdcl-minlogit", "kdcl-general")
