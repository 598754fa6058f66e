"""Independent training (METHOD.md §6): the reference every other method is compared with."""
from __future__ import annotations

from .base import Method, MethodOutput
from .registry import register


@register
class Independent(Method):
    name = "independent"
    description = "CE(za) + CE(zb): the two students share nothing"

    def losses(self, out_a, out_b, y) -> MethodOutput:
        return MethodOutput(self.ce_terms(out_a, out_b, y))
