"""Independent training and deep mutual learning (METHOD.md §6)."""
from __future__ import annotations

import ccl_ops
from ccl_bench.methods.base import Method, MethodOutput
from ccl_bench.methods.registry import register


@register
class Independent(Method):
    name = "independent"
    description = "CE(za) + CE(zb): the two students share nothing"

    def losses(self, out_a, out_b, y) -> MethodOutput:
        return MethodOutput(self.ce_terms(out_a, out_b, y))


@register
class DML(Method):
    name = "dml"
    description = "deep mutual learning: CE + l T^2 [KL(sg p_b || p_a) + KL(sg p_a || p_b)] at every valid pixel"
    defaults = {"temperature": 1.0, "lambda_kl": 1.0}

    def losses(self, out_a, out_b, y) -> MethodOutput:
        # DML is the selective KL with all-ones masks over the valid pixels.
        kl = ccl_ops.pixel_selective_kl(out_a.logits, out_b.logits, y, temperature=self.options["temperature"],
                                        rule="all", ignore_index=self.ignore_index)
        terms = self.ce_terms(out_a, out_b, y)
        terms["kl_a"] = self.options["lambda_kl"] * kl.loss_a
        terms["kl_b"] = self.options["lambda_kl"] * kl.loss_b
        return MethodOutput(terms)
