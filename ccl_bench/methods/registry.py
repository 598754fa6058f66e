"""One registry of co-training methods, chosen by name (``build_method``).

A leaf module: each method's module fills ``METHODS`` on import with :func:`register`, and importing
:mod:`ccl_bench.methods` imports all of them, so the registry is complete whenever it can be reached.
"""
from __future__ import annotations

from typing import Any

METHODS: dict[str, type] = {}


def register(cls):
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is registered twice")
    METHODS[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(METHODS)


def method_class(name: str):
    if name not in METHODS:
        raise ValueError(f"method={name!r} is unknown; expected one of {sorted(METHODS)}")
    return METHODS[name]


def build_method(name: str, students, num_classes: int, ignore_index: int = 255, **options: Any):
    """Build method ``name`` for the pair ``students`` = (CNN, ViT) with its ``options`` (checked)."""
    return method_class(name)(tuple(students), num_classes, ignore_index, **options)


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
