"""One registry of co-training methods, chosen by name (``build_method``).

A leaf module: each method's module fills ``METHODS`` on import with :func:`register`, and importing
:mod:`ccl_bench.methods` imports all of them. Methods from outside the package (:mod:`.plugins`) register the
same way: installed entry points of the group ``ccl_bench.methods`` load the first time the registry is
consulted, ``--plugin`` modules and files when a command or a config names them. :func:`register` checks every
class, built-in or not, the same way.
"""
from __future__ import annotations

import os
import sys
import types
from typing import Any

from ..student_names import MAX_STUDENTS
from .base import Knob, Method

METHODS: dict[str, type] = {}
PLUGIN_MODULE_PREFIX = "_ccl_bench_plugin_"  # the module names of plugin files (see plugins.py)
OPTION_TYPES = (bool, int, float, str, list, type(None))
_entry_points_loaded = False


GROUP = "ccl_bench.methods"  # the entry-point group of installed plugins


class PluginError(ValueError):
    """A plugin that cannot be loaded (one line naming it and what is expected)."""


def error_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


class RegistrationError(ValueError):
    """A method class that cannot be registered: one line naming its module or file, the class and what is expected."""


def origin(cls) -> str:
    """Where a method class comes from: its plugin file, else its module."""
    module_name = getattr(cls, "__module__", "?")
    path = getattr(sys.modules.get(module_name), "__file__", None)
    return path if module_name.startswith(PLUGIN_MODULE_PREFIX) and path else module_name


def _same_source(a, b) -> bool:
    """The same class of the same file imported twice (a plugin file that is also an installed module)."""
    files = [getattr(sys.modules.get(c.__module__), "__file__", None) for c in (a, b)]
    return a.__qualname__ == b.__qualname__ and None not in files and len({os.path.realpath(f) for f in files}) == 1


def _check(cls) -> None:
    def fail(problem: str):
        raise RegistrationError(f"method class {getattr(cls, '__qualname__', repr(cls))} of {origin(cls)!r}: "
                                f"{problem}")

    if not (isinstance(cls, type) and issubclass(cls, Method)):
        fail("expected a subclass of ccl_bench.methods.Method")
    name, defaults, choices = cls.name, cls.defaults, cls.choices
    if name == Method.name:
        fail("sets no name; expected a class attribute such as name = 'my-method'")
    if not isinstance(name, str) or not name or any(c in ":," or c.isspace() for c in name):
        fail(f"name={name!r}; expected a non-empty string without ':', ',' or whitespace")
    if cls.losses is Method.losses:
        fail("does not override losses; expected losses(self, out_a, out_b, y) returning a MethodOutput")
    if not isinstance(defaults, dict):
        fail(f"defaults={defaults!r}; expected a dict of option name -> default value")
    for key, value in defaults.items():
        if not isinstance(key, str) or not isinstance(value, OPTION_TYPES):
            fail(f"defaults {{{key!r}: {value!r}}}; expected str option names with bool, int, float, str, list "
                 f"or None values")
    if not isinstance(choices, dict):
        fail(f"choices={choices!r}; expected a dict of option name -> allowed values")
    for key, allowed in choices.items():
        if key not in defaults:
            fail(f"choices[{key!r}]: no such option; expected options of defaults {sorted(defaults)}")
        if not isinstance(allowed, (list, tuple)) or defaults[key] not in allowed:
            fail(f"defaults[{key!r}]={defaults[key]!r}, choices[{key!r}]={allowed!r}; expected a list of "
                 f"allowed values holding the default")
    span = cls.students_range
    if not (isinstance(span, tuple) and len(span) == 2 and all(isinstance(v, int) for v in span)
            and 2 <= span[0] <= span[1] <= MAX_STUDENTS):
        fail(f"students_range={span!r}; expected (low, high) with 2 <= low <= high <= {MAX_STUDENTS}")
    space = cls.search_space
    if not isinstance(space, dict):
        fail(f"search_space={space!r}; expected a dict of option name -> Knob(low, high)")
    for key, knob in space.items():
        if key not in defaults or not isinstance(defaults[key], float):
            fail(f"search_space[{key!r}]: expected a float option of defaults {sorted(defaults)}")
        if not (isinstance(knob, Knob) and 0 <= knob.low < knob.high and (knob.low > 0 or not knob.log)):
            fail(f"search_space[{key!r}]={knob!r}; expected Knob(low, high) with 0 <= low < high (low > 0 on a "
                 f"log scale)")
        if not knob.low <= defaults[key] <= knob.high:
            fail(f"search_space[{key!r}]={knob!r} leaves out the default {defaults[key]!r}; expected a range "
                 f"holding it (the first trial runs the defaults)")
    other = METHODS.get(name)
    if other is not None and other is not cls and not _same_source(other, cls):
        fail(f"name {name!r} is already registered by {other.__qualname__} of {origin(other)!r}; "
             f"expected a unique name")


def register(cls):
    """Class decorator: check ``cls`` (:class:`RegistrationError`) and make it available under ``cls.name``."""
    _check(cls)
    METHODS.setdefault(cls.name, cls)  # a second import of the same class keeps the first
    return cls


def _load_entry_points() -> None:
    """The installed plugins (entry points of the group ``ccl_bench.methods``), once, on the first look-up."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True  # first: a plugin may consult the registry while it loads
    try:
        load_entry_points()
    except BaseException:
        _entry_points_loaded = False  # a broken plugin stays an error on the next look-up too
        raise


def load_entry_points() -> None:
    """Load every installed entry point of the group ``ccl_bench.methods``: a module registers its own methods,
    a Method subclass is registered here; a broken one is one PluginError line naming it and its distribution."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=GROUP):
        try:
            obj = ep.load()
            if isinstance(obj, type):
                register(obj)
            elif not isinstance(obj, types.ModuleType):
                raise TypeError(f"it names {obj!r}")
        except Exception as exc:
            dist = f"distribution {ep.dist.name} {ep.dist.version}" if ep.dist else "an unknown distribution"
            detail = str(exc) if isinstance(exc, RegistrationError) else (
                f"{error_line(exc)}; expected a module that registers methods or a Method subclass")
            raise PluginError(f"entry point {ep.name} = {ep.value} (group {GROUP}) of {dist}: {detail}") from None


def method_names() -> list[str]:
    _load_entry_points()
    return sorted(METHODS)


def method_class(name: str):
    _load_entry_points()
    if name not in METHODS:
        raise ValueError(f"method={name!r} is unknown; expected one of {sorted(METHODS)}")
    return METHODS[name]


def build_method(name: str, students, num_classes: int, ignore_index: int = 255, families=None, **options: Any):
    """Build method ``name`` for ``students`` (A, B, ...; ``families`` ``"cnn"``/``"vit"`` in that order) with
    its ``options`` (checked)."""
    return method_class(name)(tuple(students), num_classes, ignore_index, families=families, **options)


def parse_method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"ccl:hfd=false:lambda_pbsd=0.5"`` -> ``("ccl", {"hfd": False, "lambda_pbsd": 0.5})`` (YAML-typed values)."""
    import yaml

    name, *pairs = spec.strip().split(":")
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"method spec {spec!r}: {pair!r} is not key=value; expected e.g. 'ccl:hfd=false'")
        options[key.strip()] = yaml.safe_load(value)
    method_class(name)
    return name, options
