"""Deep mutual learning (METHOD.md §6, §9) over :func:`baselines.dml.peer_kl`."""
from __future__ import annotations

from baselines.dml import peer_kl

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
        kls = peer_kl([o.logits for o in outs], y, temperature=self.options["temperature"],
                      ignore_index=self.ignore_index)
        terms = self.ce_terms(*outs, y=y)
        terms.update({f"kl_{slot}": self.options["lambda_kl"] * kl for slot, kl in zip(self.slots, kls)})
        return MethodOutput(terms)
