"""Independent training (METHOD.md §6): the reference every other method is compared with."""
from __future__ import annotations

from ..student_names import MAX_STUDENTS
from .base import Method, MethodOutput
from .registry import register


@register
class Independent(Method):
    name = "independent"
    description = "the sum of the students' CE terms: the students share nothing"
    students_range = (2, MAX_STUDENTS)

    def losses(self, *outs, y) -> MethodOutput:
        return MethodOutput(self.ce_terms(*outs, y=y))
