"""Free-form option mappings (``data.options``, ``students.cnn.options``, ...) checked against the signatures of
the functions they are passed to.

The valid names, and the types where annotated, are read from the constructors themselves
(:func:`inspect.signature`), so an option added to a dataset or a student is accepted without touching this
module. Ranges stay the constructor's job (it raises a ValueError naming the option).
"""
from __future__ import annotations

import collections.abc
import inspect
import math
import os
import types
import typing
from typing import Any, Callable, Iterable, NamedTuple


class Option(NamedTuple):
    hint: Any  # resolved annotation, or inspect.Parameter.empty
    default: Any


def signature_options(chain: Iterable[tuple[Callable, Iterable[str]]]) -> tuple[dict[str, Option], bool]:
    """Keyword options accepted by a chain of functions that forward ``**options`` to the next one.

    ``chain``: ``(function, names the caller fills itself)``. Returns the options (first occurrence wins: the
    outermost function sees the value first) and whether the last function still takes ``**kwargs`` (then names
    cannot be checked).
    """
    options: dict[str, Option] = {}
    open_ended = False
    for fn, taken in chain:
        try:
            hints = typing.get_type_hints(fn)
        except Exception:  # an annotation that does not resolve here: fall back to the defaults' types
            hints = {}
        open_ended = False
        for name, p in inspect.signature(fn).parameters.items():
            if p.kind is p.VAR_KEYWORD:
                open_ended = True
            elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in taken and name != "self":
                options.setdefault(name, Option(hints.get(name, p.empty), p.default))
    return options, open_ended


def fits(value: Any, hint: Any) -> bool:
    """Whether a YAML value can be passed where ``hint`` is annotated (lists stand for tuples and sequences).
    An annotation this checker does not understand accepts: the constructor has the last word."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, h) for h in args)
    if hint is type(None) or hint is None:
        return value is None
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(fits(v, args[0]) for v in value)
        return not args or (len(value) == len(args) and all(fits(v, h) for v, h in zip(value, args)))
    if origin in (list, collections.abc.Sequence):
        return isinstance(value, (list, tuple)) and all(fits(v, args[0]) for v in value) if args else \
            isinstance(value, (list, tuple))
    if origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    if isinstance(hint, type):
        if issubclass(hint, os.PathLike):
            return isinstance(value, str)
        return isinstance(value, hint)
    return True


def describe(option: Option) -> str:
    """``int | None = None`` style text of what an option takes."""
    hint, default = option
    if hint is inspect.Parameter.empty:
        text = type(default).__name__ if default not in (None, inspect.Parameter.empty) else "any value"
    else:
        text = inspect.formatannotation(hint).replace("typing.", "").replace("NoneType", "None")
    return text + ("" if default is inspect.Parameter.empty else f" = {default!r}")


def check_options(path: str, owner: str, given: Any, valid: dict[str, Option], open_ended: bool) -> None:
    """Raise ConfigError unless every entry of the mapping ``given`` (the config key ``path``) is an option of
    ``owner`` with a value of the annotated type (or the type of its default)."""
    from . import ConfigError

    reset = f"reset the mapping with {path}={{}} (or {path}=null) to drop options set by a preset"
    for name, value in given.items():
        if name not in valid:
            if open_ended:
                continue
            raise ConfigError(f"{path}.{name}={value!r}: {owner} has no option {name!r}; valid options: "
                              f"{', '.join(sorted(valid)) or 'none'}; {reset}")
        option = valid[name]
        hint = option.hint
        if hint is inspect.Parameter.empty and option.default not in (None, inspect.Parameter.empty):
            hint = type(option.default)
            if hint is tuple:
                hint = typing.Tuple[(typing.Any,) * len(option.default)]
        if not fits(value, hint):
            raise ConfigError(f"{path}.{name}={value!r}; {owner} expects {name}: {describe(option)}")
