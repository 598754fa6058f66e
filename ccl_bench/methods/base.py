"""What every co-training method is: a small ``nn.Module`` that turns both students' outputs into named losses.

The engine runs both students, hands the method their logits (already at the label resolution) and encoder
features, sums the loss terms the method returns and logs each of them. A method owns its learnable helpers
(HFD adapters, region-BSD projections) and says which student's optimizer each parameter belongs to.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..student_names import LETTERS, slots


HOLDOUT_NEEDED = ("method {name!r} estimates its ensemble weights on a held-out slice of the training set, and "
                  "data.holdout is 0; set a fraction, e.g. --set data.holdout=0.1 (METHOD.md §6: the slice is removed "
                  "from the training set of every method of a comparison, so set it for all of them)")
CE_TERMS = tuple(f"ce_{slot}" for slot in LETTERS)  # the students' own supervised losses (never ramped)


@dataclass(frozen=True)
class Knob:
    """A float option that ``ccl-bench tune`` searches, in [low, high]: log-uniform by default (weights and
    temperatures act multiplicatively)."""
    low: float
    high: float
    log: bool = True


class StudentOutput(NamedTuple):
    logits: torch.Tensor  # (N, C, H, W) at the label resolution
    features: Sequence[torch.Tensor] = ()  # encoder stage outputs [f1, f2, f3, f4] (METHOD.md stage 1 = index 0)


@dataclass
class MethodOutput:
    terms: dict[str, torch.Tensor]  # weighted loss terms; the engine's loss is their sum
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached diagnostics (teaching shares)


class Method(nn.Module):
    """Base class. Subclasses set ``name``, ``defaults`` (their options) and implement :meth:`losses`.

    A two-student method implements ``losses(self, out_a, out_b, y)``; a method that takes any number of
    students sets ``students_range = (2, 8)`` and implements ``losses(self, *outs, y)`` (the engine passes
    ``y`` by keyword, so both forms are called the same way). ``students`` are kept as plain references (not
    sub-modules), so the method's state dict holds only its own parameters and buffers; ``families`` says
    which are CNNs and which ViTs (``"cnn"``/``"vit"``, in the students' order).
    """

    name: ClassVar[str] = "method"
    description: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    # option -> allowed values, for the option checks (an option not listed here is checked by type)
    choices: ClassVar[dict[str, Sequence[Any]]] = {}
    # whether the method estimates something on the held-out slice of the training set (``data.holdout``), which
    # the data configuration removes from the training of every method of a comparison (METHOD.md §6)
    needs_holdout: ClassVar[bool] = False
    # how many students the method takes (inclusive): the two-student form by default
    students_range: ClassVar[tuple[int, int]] = (2, 2)
    # the method's own knobs and their ranges, what ``ccl-bench tune`` searches (equal trial budget per method)
    search_space: ClassVar[dict[str, Knob]] = {}

    def __init__(self, students: Sequence[nn.Module], num_classes: int, ignore_index: int = 255,
                 families: Sequence[str] | None = None, **options):
        super().__init__()
        low, high = self.students_range
        if not low <= len(students) <= high:
            raise ValueError(f"method {self.name!r} takes {low if low == high else f'{low} to {high}'} students; "
                             f"the config has {len(students)}")
        self.options = resolve_options(type(self), options)
        self._students = tuple(students)
        self.slots = slots(len(students))
        if families is None and len(students) > 2:
            raise ValueError(f"method {self.name!r}: {len(students)} students need their families ('cnn' or 'vit' "
                             f"each, in order)")
        self.families = tuple(families) if families is not None else ("cnn", "vit")
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    # -- what the engine calls -------------------------------------------------------------------------------
    def forward(self, *outs: StudentOutput, y: torch.Tensor | None = None) -> MethodOutput:
        """``method(out_a, out_b, ..., y=y)``, or with ``y`` last: ``method(out_a, out_b, y)``."""
        if y is None:
            *outs, y = outs
        return self.losses(*outs, y=y)

    def losses(self, out_a: StudentOutput, out_b: StudentOutput, y: torch.Tensor) -> MethodOutput:
        raise NotImplementedError

    def views(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The images each student sees (the same by default)."""
        return (x,) * len(self._students)

    def student_parameters(self, slot: str) -> list[nn.Parameter]:
        """This method's parameters that the optimizer of the student in ``slot`` (``"a"``, ``"b"``, ...)
        updates."""
        return []

    def on_epoch_start(self, epoch: int, holdout: Any | None) -> None:
        """Hook before each training epoch. ``holdout`` (when ``data.holdout > 0``) iterates ``(x, y)``
        batches of the held-out slice on the training device, students in eval mode, and ``holdout.sum(t)``
        sums a CPU tensor over the ranks."""

    # -- shared pieces ----------------------------------------------------------------------------------------
    def ce_terms(self, *outs: StudentOutput, y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``ce_a``, ``ce_b``, ...: each student's own CE (``ce_terms(out_a, out_b, y)`` as before works too)."""
        if y is None:
            *outs, y = outs
        return {key: self.cross_entropy(out.logits, y) for key, out in zip(CE_TERMS, outs)}

    def cross_entropy(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean CE over the valid pixels, 0 (not NaN) when a batch has none (METHOD.md §5, like the ops)."""
        total = F.cross_entropy(logits, y, ignore_index=self.ignore_index, reduction="sum")
        return total / self.valid_count(y).to(total.dtype)

    def valid_count(self, y: torch.Tensor) -> torch.Tensor:
        return (y != self.ignore_index).sum().clamp(min=1)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


def _type_ok(default: Any, value: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple)) and len(value) == len(default) and all(
            _type_ok(d, v) for d, v in zip(default, value))
    if default is None:
        return True
    return isinstance(value, type(default))


def resolve_options(cls: type[Method], options: dict[str, Any]) -> dict[str, Any]:
    """``cls.defaults`` updated by ``options``; an unknown option, a wrong type or a value outside ``cls.choices``
    is a ValueError naming the option, the value and what is expected."""
    unknown = sorted(set(options) - set(cls.defaults))
    if unknown:
        raise ValueError(f"method {cls.name!r}: unknown option(s) {unknown}; valid options: "
                         f"{sorted(cls.defaults) or 'none'}")
    resolved = dict(cls.defaults)
    for key, value in options.items():
        default = cls.defaults[key]
        if key in cls.choices and value not in cls.choices[key]:
            raise ValueError(f"method {cls.name!r}: {key}={value!r}; expected one of {list(cls.choices[key])}")
        if not _type_ok(default, value):
            raise ValueError(f"method {cls.name!r}: {key}={value!r}; expected a {type(default).__name__} "
                             f"like the default {default!r}")
        resolved[key] = float(value) if isinstance(default, float) else value
    for key, value in resolved.items():
        if key.startswith(("lambda", "weight")) and isinstance(value, float) and value < 0:
            raise ValueError(f"method {cls.name!r}: {key}={value!r}; expected a number >= 0")
        if key == "temperature" and not value > 0:
            raise ValueError(f"method {cls.name!r}: temperature={value!r}; expected a number > 0")
        if key.endswith("_dim") and isinstance(value, int) and value < 1:
            raise ValueError(f"method {cls.name!r}: {key}={value!r}; expected an int >= 1")
    return resolved


def share(count: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``count / total`` as a detached float (a teaching share for the logs)."""
    return (count.detach().float() / total.detach().float().clamp(min=1))
