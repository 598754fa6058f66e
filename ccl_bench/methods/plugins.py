"""Co-training methods from outside the package, registered with :func:`~.registry.register` like the built-in ones.

* Installed plugins: a distribution declares an entry point of the group ``ccl_bench.methods`` naming a module
  (whose import registers its methods) or a :class:`~.base.Method` subclass; the registry
  (:func:`~.registry.load_entry_points`) loads them all the first time it is consulted, so every command sees
  them without a flag.
* ``--plugin MODULE_OR_FILE.py`` (the config key ``plugins``): a dotted module name is imported, a path to a
  ``.py`` file is imported from that file. The config records file paths as absolute paths, so that
  ``--resume`` and ``compare``'s reuse of a run load the same plugins again.

Each problem is one ValueError line naming the plugin: :class:`PluginError` when it cannot be loaded,
:class:`~.registry.RegistrationError` when a class it registers is not a valid method.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
import types
from .registry import PLUGIN_MODULE_PREFIX, PluginError, RegistrationError, error_line
_LOADED: dict[str, types.ModuleType] = {}  # normalised spec -> module, so that a plugin runs once per process


def is_file(spec: str) -> bool:
    """A path to a .py file (rather than a dotted module name)."""
    return spec.endswith(".py") or "/" in spec or os.sep in spec


def normalise(spec: str) -> str:
    """A file's absolute path, or the module name."""
    return os.path.abspath(os.path.expanduser(spec)) if is_file(spec) else spec


def _import_file(path: str) -> types.ModuleType:
    if not os.path.isfile(path):
        raise PluginError(f"plugin {path!r}: no such file; expected a path to a .py file or a dotted module name")
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    name = f"{PLUGIN_MODULE_PREFIX}{stem}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"plugin {path!r}: not a Python source file; expected a path to a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it, like an import (dataclasses, pickling look it up)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_plugin(spec: str) -> types.ModuleType:
    """Import one plugin (a module name or a .py file), once."""
    key = normalise(spec)
    if key not in _LOADED:
        try:
            _LOADED[key] = _import_file(key) if is_file(key) else importlib.import_module(key)
        except (PluginError, RegistrationError):
            raise
        except Exception as exc:  # SyntaxError, ImportError, anything its import raises
            expected = "a Python file that imports cleanly" if is_file(key) else (
                "an importable module name or a path to a .py file")
            raise PluginError(f"plugin {key!r}: cannot import it ({error_line(exc)}); expected {expected}") from None
    return _LOADED[key]


def load_plugins(specs) -> list[str]:
    """Import each plugin of ``specs``; return them normalised (absolute file paths, no repeats)."""
    keys = list(dict.fromkeys(normalise(spec) for spec in specs))
    for key in keys:
        load_plugin(key)
    return keys
