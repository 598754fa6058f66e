"""Co-training methods: the proposed ``ccl`` and the baselines of :mod:`baselines`, one registry by name."""
from .base import Method, MethodOutput, StudentOutput
from .registry import METHODS, build_method, method_class, method_names, parse_method_spec, register

__all__ = ["Method", "MethodOutput", "StudentOutput", "METHODS", "build_method", "method_class",
           "method_names", "parse_method_spec", "register"]
