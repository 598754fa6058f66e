"""Deep mutual learning (METHOD.md §6) over :func:`baselines.dml.mutual_kl`."""
from __future__ import annotations

from baselines.dml import mutual_kl

from .base import Knob, Method, MethodOutput
from .registry import register


@register
class DML(Method):
    name = "dml"
    description = "deep mutual learning: CE + l T^2 [KL(sg p_b || p_a) + KL(sg p_a || p_b)] at every valid pixel"
    defaults = {"temperature": 1.0, "lambda_kl": 1.0}
    search_space = {"temperature": Knob(1.0, 4.0), "lambda_kl": Knob(0.25, 4.0)}

    def losses(self, out_a, out_b, y) -> MethodOutput:
        kl = mutual_kl(out_a.logits, out_b.logits, y, temperature=self.options["temperature"],
                       ignore_index=self.ignore_index)
        terms = self.ce_terms(out_a, out_b, y)
        terms["kl_a"] = self.options["lambda_kl"] * kl.loss_a
        terms["kl_b"] = self.options["lambda_kl"] * kl.loss_b
        return MethodOutput(terms)
