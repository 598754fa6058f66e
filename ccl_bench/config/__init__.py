"""Run configuration: YAML presets beside this file, ``--set key.sub=value`` overrides, validation.

``defaults.yaml`` lists every valid key with its default; a preset (``<name>.yaml``) overrides some of them.
A key that is not in the defaults, a value of the wrong type or outside its choices is a :class:`ConfigError`
raised before anything trains, naming the key, the value and what is valid.
"""
from __future__ import annotations

import copy
import math
import os
from importlib import resources
from typing import Any, Iterable

import yaml

# keys whose default is null: the type a value must have when it is set
NULLABLE = {"preset": str, "label": str, "data.root": str, "data.val_limit": int}
# keys holding free-form mappings (checked by the code they are passed to)
FREE_FORM = {"data.options", "data.train_options", "data.val_options", "students.cnn.options",
             "students.vit.options"}
CHOICES = {
    "train.amp": ("off", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
    "optim.cnn.optimizer": ("sgd", "adamw", "adam"),
    "optim.vit.optimizer": ("sgd", "adamw", "adam"),
}
POSITIVE = {"train.iters", "train.eval_interval", "train.checkpoint_interval", "train.log_interval",
            "data.batch_size", "data.eval_batch_size", "optim.cnn.lr", "optim.vit.lr", "data.val_limit"}
NON_NEGATIVE = {"data.num_workers", "train.cpu_threads", "optim.grad_clip", "train.overlays", "optim.cnn.warmup_iters",
                "optim.vit.warmup_iters", "optim.cnn.weight_decay", "optim.vit.weight_decay",
                "optim.cnn.min_lr", "optim.vit.min_lr", "optim.cnn.power", "optim.vit.power"}


class ConfigError(ValueError):
    """A bad configuration key or value."""


def _read_yaml(text: str, where: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def _package_file(name: str):
    return resources.files(__name__).joinpath(name)


def defaults() -> dict:
    return _read_yaml(_package_file("defaults.yaml").read_text(), "defaults.yaml")


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir()
                  if p.name.endswith(".yaml") and p.name != "defaults.yaml")


def load_preset(name: str) -> dict:
    names = preset_names()
    if name not in names:
        raise ConfigError(f"preset={name!r} is unknown; expected one of {names}")
    return _read_yaml(_package_file(f"{name}.yaml").read_text(), f"preset {name!r}")


def load_file(path: str | os.PathLike) -> dict:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config={path!r}: no such file (expected a YAML config)")
    with open(path) as f:
        return _read_yaml(f.read(), f"config {path!r}")


def merge(base: dict, update: dict) -> dict:
    """Deep-merge ``update`` into a copy of ``base`` (keys are checked by :func:`validate`)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_key(config: dict, key: str, value: Any) -> dict:
    """``config`` with the dotted ``key`` set to ``value``."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return merge(config, value)


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", value)`` with ``value`` parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected key.sub=value, e.g. train.iters=100")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({exc})") from exc
    return key, value


def _flatten(tree: dict, prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path not in FREE_FORM and path != "methods":
            yield from _flatten(value, path + ".")
        else:
            yield path, value


def _check_type(path: str, value: Any, default: Any) -> None:
    expected = NULLABLE.get(path, type(default))
    if value is None:
        if path in NULLABLE:
            return
        raise ConfigError(f"{path}=null; expected a {expected.__name__} (default {default!r})")
    if expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is list:
        ok = isinstance(value, list) and len(value) == len(default)
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise ConfigError(f"{path}={value!r}; expected a {expected.__name__}"
                          + (f" like the default {default!r}" if default is not None else ""))


def validate(config: dict) -> dict:
    """Check every value; return the config with the chosen method's options resolved (all of them)."""
    from ..data import DATASETS
    from ..methods import method_class, method_names
    from ..methods.base import resolve_options

    base = dict(_flatten(defaults()))
    flat = dict(_flatten(config))
    for path, value in flat.items():
        if path not in base:
            parent = path.rpartition(".")[0]
            valid = sorted(k[len(parent) + 1:] if parent else k for k in base
                           if (k.startswith(parent + ".") if parent else True))
            valid = sorted({k.split(".")[0] for k in valid})
            raise ConfigError(f"unknown config key {path!r}; valid keys{' under ' + parent if parent else ''}: "
                              f"{', '.join(valid)}")
        _check_type(path, value, base[path])
        if path in CHOICES and value not in CHOICES[path]:
            raise ConfigError(f"{path}={value!r}; expected one of {list(CHOICES[path])}")
        if path in POSITIVE and value is not None and not value > 0:
            raise ConfigError(f"{path}={value!r}; expected a number > 0")
        if path in NON_NEGATIVE and value < 0:
            raise ConfigError(f"{path}={value!r}; expected a number >= 0")
    if config["data"]["dataset"] not in DATASETS:
        raise ConfigError(f"data.dataset={config['data']['dataset']!r}; expected one of {list(DATASETS)}")
    names = method_names()
    if config["method"] not in names:
        raise ConfigError(f"method={config['method']!r} is unknown; expected one of {names}")
    for name, options in config["methods"].items():
        if name not in names:
            raise ConfigError(f"methods.{name}: unknown method; expected one of {names}")
        if not isinstance(options, dict):
            raise ConfigError(f"methods.{name}={options!r}; expected a mapping of that method's options")
        try:
            resolved = resolve_options(method_class(name), options)
        except ValueError as exc:
            raise ConfigError(f"methods.{name}: {exc}") from exc
        config["methods"][name] = resolved
    chosen = config["method"]
    # the resolved config keeps the options of its own method only
    config["methods"] = {chosen: config["methods"].get(chosen) or dict(method_class(chosen).defaults)}
    if config.get("label") is None:
        config["label"] = chosen
    return config


def load_config(preset: str | None = None, config_file: str | list[str] | None = None,
                overrides: Iterable[str] = (), **direct: Any) -> dict:
    """Defaults <- preset <- config file(s) <- ``direct`` (``{"train.iters": 100}``, None skipped) <- ``--set``
    overrides (``"key.sub=value"``); validated."""
    config = defaults()
    if preset:
        config = merge(config, load_preset(preset))
        config["preset"] = preset
    for path in [config_file] if isinstance(config_file, str) else (config_file or []):
        config = merge(config, load_file(path))
    for key, value in direct.items():
        if value is not None:
            config = set_key(config, key, value)
    for text in overrides:
        config = set_key(config, *parse_override(text))
    return validate(config)


def method_options(config: dict) -> dict:
    """The resolved options of the config's method."""
    return dict(config["methods"][config["method"]])


def dump(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None)
