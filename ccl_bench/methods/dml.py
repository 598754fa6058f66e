"""Deep mutual learning (METHOD.md §6, §9) over :func:`baselines.dml.mutual_kl`."""
from __future__ import annotations

from itertools import combinations

from baselines.dml import mutual_kl

from ..student_names import MAX_STUDENTS
from .base import Knob, Method, MethodOutput
from .registry import register


@register
class DML(Method):
    name = "dml"
    description = ("deep mutual learning: CE + l T^2 mean over the peers r of KL(sg p_r || p_s) at every valid "
                   "pixel (two students: KL(sg p_b || p_a) + KL(sg p_a || p_b))")
    defaults = {"temperature": 1.0, "lambda_kl": 1.0}
    search_space = {"temperature": Knob(1.0, 4.0), "lambda_kl": Knob(0.25, 4.0)}
    students_range = (2, MAX_STUDENTS)

    def losses(self, *outs, y) -> MethodOutput:
        # every pair once through the fused mutual KL (each call gives both directions); a student's term is the
        # mean over its K - 1 peers (with two students: exactly the pair's term)
        peers = [[] for _ in outs]
        for r, s in combinations(range(len(outs)), 2):
            kl = mutual_kl(outs[r].logits, outs[s].logits, y, temperature=self.options["temperature"],
                           ignore_index=self.ignore_index)
            peers[r].append(kl.loss_a)
            peers[s].append(kl.loss_b)
        terms = self.ce_terms(*outs, y=y)
        for slot, kls in zip(self.slots, peers):
            total = kls[0] if len(kls) == 1 else sum(kls[1:], kls[0])
            terms[f"kl_{slot}"] = self.options["lambda_kl"] * (total if len(kls) == 1 else total / len(kls))
        return MethodOutput(terms)
