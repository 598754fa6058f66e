"""Run configuration: YAML presets beside this file, ``--set key.sub=value`` overrides, validation.

``defaults.yaml`` lists every valid key with its default; a preset (``<name>.yaml``) overrides some of them.
A key that is not in the defaults, a value of the wrong type or outside its choices is a :class:`ConfigError`
raised before anything trains, naming the key, the value and what is valid.

Layers (defaults <- preset <- config files <- command-line options <- ``--set``) merge key by key, with three
rules for keys whose value is a mapping (sections such as ``optim.cnn``, ``methods`` and ``methods.<name>``,
and the option mappings ``data.options``, ``students.cnn.options``, ...):

* ``KEY={}`` or ``KEY=null`` resets KEY to its default (``{}`` for the option mappings): an empty mapping that
  merged would change nothing, which is never what it is written for.
* ``--set KEY={a: 1}`` replaces KEY by its default updated with the mapping; ``--set KEY.a=1`` updates one
  entry and keeps the others. In presets and ``--config`` files a nested mapping updates (deep merge).
* A layer that switches ``data.dataset`` drops the dataset option mappings (``data.options``,
  ``data.train_options``, ``data.val_options``) of the layers before it, keeping those it sets itself: a
  preset's options describe the preset's dataset.

Option mappings are checked against the signatures of the functions they are passed to (:mod:`.options`).
"""
from __future__ import annotations

import copy
import functools
import math
import os
from importlib import resources
from typing import Any, Iterable

import yaml

from ..student_names import LETTERS, MAX_STUDENTS, student_label
from .options import check_options, signature_options

# keys whose default is null: the type a value must have when it is set
NULLABLE = {"preset": str, "label": str, "data.root": str, "data.val_limit": int}
# keys holding lists of non-empty strings
STRING_LISTS = {"plugins": "a list of module names or .py file paths"}
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
NON_NEGATIVE = {"data.num_workers", "data.train_eval_images", "train.cpu_threads", "optim.grad_clip", "train.overlays",
                "optim.cnn.method_lr_scale", "optim.vit.method_lr_scale", "optim.cnn.warmup_iters", "optim.vit.warmup_iters", "optim.cnn.weight_decay", "optim.vit.weight_decay",
                "optim.cnn.min_lr", "optim.vit.min_lr", "optim.cnn.power", "optim.vit.power", "seed",
                "optim.cnn.momentum", "optim.vit.momentum"}
# [low, high] (closed) or [low, high) for each element of a list
INTERVALS = {"data.holdout": (0, 1, ")"), "train.distill_ramp": (0, 1, "]"),
             "optim.cnn.warmup_ratio": (0, 1, "]"), "optim.vit.warmup_ratio": (0, 1, "]"),
             "optim.cnn.betas": (0, 1, ")"), "optim.vit.betas": (0, 1, ")")}
# integers end up in C ints (thread counts) and int64 seeds (seed * 1000 + k)
INT_LIMIT = 2**31
DATASET_OPTIONS = ("options", "train_options", "val_options")


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


@functools.lru_cache(maxsize=1)
def _defaults() -> dict:
    return _read_yaml(_package_file("defaults.yaml").read_text(), "defaults.yaml")


def defaults() -> dict:
    return copy.deepcopy(_defaults())


def mapping_default(path: tuple[str, ...] | list[str]) -> dict | None:
    """The default of a mapping-valued key (a section, ``methods.<name>``, an option mapping); None for any
    other key, including the entries inside an option mapping (their values are the constructor's business)."""
    if len(path) == 2 and path[0] == "methods":
        return {}
    node: Any = _defaults()
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return copy.deepcopy(node) if isinstance(node, dict) else None


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir()
                  if p.name.endswith(".yaml") and p.name != "defaults.yaml")


def load_preset(name: str, _seen: tuple[str, ...] = ()) -> dict:
    """A preset's tree; ``inherit: OTHER`` at its top puts it over preset OTHER (deep merge)."""
    names = preset_names()
    if name not in names:
        raise ConfigError(f"preset={name!r} is unknown; expected one of {names}")
    tree = _read_yaml(_package_file(f"{name}.yaml").read_text(), f"preset {name!r}")
    base = tree.pop("inherit", None)
    if base is None:
        return tree
    if base in _seen + (name,):
        raise ConfigError(f"preset {name!r}: inherit={base!r} makes a cycle ({' -> '.join(_seen + (name, base))})")
    return merge(load_preset(base, _seen + (name,)), tree)


def load_file(path: str | os.PathLike) -> dict:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config={path!r}: no such file (expected a YAML config)")
    with open(path) as f:
        return _read_yaml(f.read(), f"config {path!r}")


def merge(base: dict, update: dict, _path: tuple[str, ...] = ()) -> dict:
    """Deep-merge ``update`` into a copy of ``base``; ``{}`` or ``None`` for a mapping-valued key resets it to its
    default (keys are checked by :func:`validate`)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        path = _path + (key,)
        default = mapping_default(path)
        if default is not None and (value is None or value == {}):
            out[key] = default
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value, path)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_key(config: dict, key: str, value: Any) -> dict:
    """``config`` with the dotted ``key`` set to ``value``: a mapping given for a mapping-valued key replaces it
    (the key's default updated with the mapping), anything else merges as in :func:`merge`."""
    parts = key.split(".")
    default = mapping_default(parts)
    if default is None or not isinstance(value, dict) or not value:
        for part in reversed(parts):
            value = {part: value}
        return merge(config, value)
    out = copy.deepcopy(config)
    node = out
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = merge(default, value, tuple(parts))
    return out


def _dataset(config: dict) -> Any:
    data = config.get("data")
    return data.get("dataset") if isinstance(data, dict) else None


def apply_layer(config: dict, items: Iterable[tuple[str | None, Any]]) -> dict:
    """Apply one layer: ``(None, tree)`` merges a preset or file, ``(key, value)`` is a ``--set``-style item.
    A layer that switches ``data.dataset`` drops the earlier layers' dataset options (see the module doc)."""
    items = list(items)

    def apply(base: dict) -> dict:
        for key, value in items:
            base = merge(base, value) if key is None else set_key(base, key, value)
        return base

    out = apply(config)
    if _dataset(out) != _dataset(config) and isinstance(config.get("data"), dict):
        fresh = copy.deepcopy(config)  # the same layer on top of option mappings emptied: keeps its own entries
        fresh["data"].update({name: {} for name in DATASET_OPTIONS})
        out = apply(fresh)
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", value)`` with ``value`` parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected key.sub=value, e.g. train.iters=100")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({' '.join(str(exc).split())})") from None
    return key, value


def _flatten(tree: dict, sections: dict, prefix: str = "") -> Iterable[tuple[str, Any]]:
    """(dotted key, value) pairs, descending into the mappings that are sections of ``sections`` (the defaults)."""
    for key, value in tree.items():
        path = f"{prefix}{key}"
        section = sections.get(key) if isinstance(sections, dict) else None
        if isinstance(value, dict) and isinstance(section, dict) and path not in FREE_FORM and path != "methods":
            yield from _flatten(value, section, path + ".")
        else:
            yield path, value


def _type_name(value: Any) -> str:
    return {"dict": "mapping", "list": "list", "NoneType": "null"}.get(type(value).__name__, type(value).__name__)


def _check_type(path: str, value: Any, default: Any) -> None:
    expected = NULLABLE.get(path, type(default))
    if value is None:
        if path in NULLABLE:
            return
        raise ConfigError(f"{path}=null; expected a {_type_name(default)} (default {default!r})")
    if expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif path in STRING_LISTS:
        ok = isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value)
    elif expected is list:  # lists of numbers (betas): the same length and element types as the default
        ok = isinstance(value, list) and len(value) == len(default) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    else:
        ok = isinstance(value, expected)
    if not ok:
        what = STRING_LISTS.get(path) or ("a mapping" if expected is dict else "an int" if expected is int
                                          else f"a {expected.__name__}")
        raise ConfigError(f"{path}={value!r}; expected {what}"
                          + (f" like the default {default!r}" if default not in (None, {}) else ""))
    if expected is int and not -INT_LIMIT < value < INT_LIMIT:
        raise ConfigError(f"{path}={value!r}; expected an int of magnitude < 2**31")


def _check_range(path: str, value: Any) -> None:
    if path in CHOICES and value not in CHOICES[path]:
        raise ConfigError(f"{path}={value!r}; expected one of {list(CHOICES[path])}")
    if path in POSITIVE and value is not None and not value > 0:
        raise ConfigError(f"{path}={value!r}; expected a number > 0")
    if path in NON_NEGATIVE and value < 0:
        raise ConfigError(f"{path}={value!r}; expected a number >= 0")
    if path in INTERVALS:
        low, high, end = INTERVALS[path]
        for v in value if isinstance(value, list) else [value]:
            if not (low <= v <= high if end == "]" else low <= v < high):
                raise ConfigError(f"{path}={value!r}; expected {'each value' if isinstance(value, list) else 'a value'}"
                                  f" in [{low}, {high}{end}")


def _unknown_key(path: str, base: dict) -> ConfigError:
    parent = path.rpartition(".")[0]
    while parent and not any(k.startswith(parent + ".") for k in base):
        parent = parent.rpartition(".")[0]  # the deepest known section above the unknown key
    valid = sorted({k[len(parent) + 1:].split(".")[0] if parent else k.split(".")[0] for k in base
                    if (k.startswith(parent + ".") if parent else True)})
    return ConfigError(f"unknown config key {path!r}; valid keys{' under ' + parent if parent else ''}: "
                       f"{', '.join(valid)}")


def _check_keys(config: dict) -> None:
    tree = _defaults()
    base = dict(_flatten(tree, tree))
    sections = {k.rsplit(".", i)[0] for k in base for i in range(1, k.count(".") + 1)}
    for path, value in _flatten(config, tree):
        if path in sections:  # e.g. data=5: a section needs a mapping
            keys = sorted({k[len(path) + 1:].split(".")[0] for k in base if k.startswith(path + ".")})
            raise ConfigError(f"{path}={value!r}; expected a mapping of {', '.join(keys)} (or null for the defaults)")
        if path not in base:
            raise _unknown_key(path, base)
        _check_type(path, value, base[path])
        _check_range(path, value)


def _check_data(data: dict) -> None:
    from ..data import DATASETS, dataset_options

    name = data["dataset"]
    if name not in DATASETS:
        raise ConfigError(f"data.dataset={name!r}; expected one of {list(DATASETS)}")
    valid, open_ended = dataset_options(name)
    for key in DATASET_OPTIONS:
        check_options(f"data.{key}", f"dataset {name!r}", data[key], valid, open_ended)


def _student_chain(path: str, name: str) -> list:
    """The functions a student's options pass through: build_student -> the decoder's builder -> the encoder."""
    from ..models.backbone import CNN_BACKBONES, VIT_BACKBONES, create_encoder
    from ..models.students import STUDENTS as DECODERS, build_student

    decoder, _, backbone = name.partition("_")
    if decoder not in DECODERS or not backbone:
        raise ConfigError(f"{path}={name!r}; expected '<decoder>_<timm backbone>' with decoder in "
                          f"{sorted(DECODERS)}, e.g. 'deeplabv3plus_resnet18' or 'segformer_pvt_v2_b0'")
    import timm

    if not timm.is_model(backbone):
        raise ConfigError(f"{path}={name!r}: {backbone!r} is not a timm model; tested backbones: "
                          f"{', '.join(CNN_BACKBONES + VIT_BACKBONES)} (any timm model with 4+ feature levels)")
    return [(build_student, ("name", "num_classes")), (DECODERS[decoder], ("backbone", "num_classes")),
            (create_encoder, ("backbone",))]


LEGACY_KEYS = ("cnn", "vit")  # the two-student configs' sections: students.cnn/vit, optim.cnn/vit
ENTRY_KEYS = ("name", "options", "optim", "family")
FAMILIES = ("cnn", "vit")
# timm backbones whose name starts so are transformers (the family decides a list entry's default optimizer
# and CCL's default HFD pairs); an entry's `family` overrides the guess
TRANSFORMER_PREFIXES = ("pvt", "vit", "deit", "swin", "twins", "mit", "beit", "eva", "cait", "xcit", "levit")
LEGACY_NOTE = ("students: the two-student keys students.cnn/students.vit and optim.cnn/optim.vit mapped onto "
               "students[0] (A) and students[1] (B)")


def student_family(name: str) -> str:
    """``"vit"`` for a student on a transformer backbone (by its timm name), else ``"cnn"``."""
    backbone = name.partition("_")[2]
    return "vit" if backbone.startswith(TRANSFORMER_PREFIXES) else "cnn"


def _check_optim(where: str, optim: Any) -> None:
    """A student's optimizer section, checked with the rules of ``optim.cnn`` (errors name ``where``)."""
    try:
        _check_keys({"optim": {"cnn": optim}})
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("optim.cnn", where)) from None


def normalize_students(config: dict) -> dict:
    """The config with ``students`` as a list of ``{name, family, options, optim}`` (2 to 8 entries) and
    ``optim`` holding ``grad_clip`` only. The two-student form (``students.cnn``/``vit`` with ``optim.cnn``/
    ``vit``) maps onto entries 0 and 1 (``legacy_students: true`` says so); a list entry without its
    own ``optim`` takes the ``optim`` section of its family (``optim.cnn`` or ``optim.vit``, the preset's),
    updated by the entry's own keys."""
    students, optim = config["students"], config["optim"]
    legacy = isinstance(students, dict)
    if legacy:  # its keys were checked with the defaults' (students.cnn, students.vit)
        entries = [{**students[k], "optim": optim[k]} for k in LEGACY_KEYS]
    elif isinstance(students, list):
        entries = students
    else:
        raise ConfigError(f"students={students!r}; expected a list of 2 to {MAX_STUDENTS} students "
                          f"({{name: ..., options: ..., optim: ...}}) or the two-student mapping cnn/vit")
    if not 2 <= len(entries) <= MAX_STUDENTS:
        raise ConfigError(f"students: {len(entries)} given; expected 2 to {MAX_STUDENTS}")
    resolved = []
    for i, entry in enumerate(entries):
        where = f"students[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ConfigError(f"{where}={entry!r}; expected a mapping with a name, e.g. "
                              f"{{name: deeplabv3plus_resnet18, options: {{}}}}")
        unknown = sorted(set(entry) - set(ENTRY_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {', '.join(ENTRY_KEYS)}")
        family = entry.get("family") or student_family(entry["name"])
        if family not in FAMILIES:
            raise ConfigError(f"{where}.family={family!r}; expected one of {list(FAMILIES)}")
        options = entry.get("options") or {}
        if not isinstance(options, dict):
            raise ConfigError(f"{where}.options={options!r}; expected a mapping of build_student options")
        own = entry.get("optim") or {}
        if not isinstance(own, dict):
            raise ConfigError(f"{where}.optim={own!r}; expected a mapping like optim.{family}")
        _check_optim(f"{where}.optim", own)
        resolved.append({"name": entry["name"], "family": family, "options": options,
                         "optim": own if legacy else merge(optim[family], own)})
    out = dict(config)
    out["students"] = resolved
    out["optim"] = {"grad_clip": optim["grad_clip"]}
    out["legacy_students"] = legacy or bool(config.get("legacy_students"))  # kept when a resumed run reloads
    return out


def _check_students(students: list, legacy: bool) -> None:
    for i, student in enumerate(students):
        name = student["name"]
        where = f"students.{LEGACY_KEYS[i]}" if legacy else f"students[{i}]"  # as the config wrote it
        chain = _student_chain(f"{where}.name", name)
        valid, open_ended = signature_options(chain)
        check_options(f"{where}.options", f"student {student_label(LETTERS[i], name)!r}", student["options"],
                      valid, open_ended)


def _load_plugins(plugins: list[str]) -> list[str]:
    """Import the plugins (:mod:`ccl_bench.methods.plugins`); the list with file paths made absolute."""
    from ..methods.plugins import load_plugins

    try:
        return load_plugins(plugins)
    except ValueError as exc:
        raise ConfigError(f"plugins: {exc}") from None


def _check_methods(config: dict) -> None:
    from ..methods import method_class, method_names
    from ..methods.base import resolve_options

    names = method_names()
    if config["method"] not in names:
        raise ConfigError(f"method={config['method']!r} is unknown; expected one of {names}")
    for name, options in config["methods"].items():
        if name not in names:
            # the value does not matter (and null was already reset to {}): the section's name is the error
            raise ConfigError(f"unknown method {name!r} in the section methods.{name}; expected one of {names}")
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


def validate(config: dict) -> dict:
    """Check every value; return the config with the chosen method's options resolved (all of them)."""
    students = config.get("students")
    _check_keys({**config, "students": {}} if isinstance(students, list) else config)
    config = merge(defaults(), config)  # a section reset by null in a file was filled in by merge; be sure
    config = normalize_students(config)
    _check_data(config["data"])
    _check_students(config["students"], legacy=not isinstance(students, list))
    config["plugins"] = _load_plugins(config["plugins"])  # before the methods: a plugin's method names validate
    _check_methods(config)
    from ..methods import method_class
    from ..methods.base import HOLDOUT_NEEDED

    if method_class(config["method"]).needs_holdout and not config["data"]["holdout"] > 0:
        raise ConfigError(HOLDOUT_NEEDED.format(name=config["method"]))
    if config.get("label") is None:
        config["label"] = config["method"]
    ramp = config["train"]["distill_ramp"]
    if ramp > 0 and "ramp" not in config["label"]:  # METHOD.md §8: a run with a ramp says so wherever it is named
        config["label"] += f"+ramp{ramp:g}"
    return config


def load_config(preset: str | None = None, config_file: str | list[str] | None = None,
                overrides: Iterable[str] = (), **direct: Any) -> dict:
    """Defaults <- preset <- config file(s) <- ``direct`` (``{"train.iters": 100}``, None skipped but in
    ``methods.*``) <- ``--set``
    overrides (``"key.sub=value"``, one layer); validated."""
    config = defaults()
    if preset:
        config = apply_layer(config, [(None, load_preset(preset))])
        config["preset"] = preset
    for path in [config_file] if isinstance(config_file, str) else (config_file or []):
        config = apply_layer(config, [(None, load_file(path))])
    # None marks a command-line option not given, except in a method's options (``ccl:rule=`` is a value)
    config = apply_layer(config, [(key, value) for key, value in direct.items()
                                  if value is not None or key.startswith("methods.")])
    config = apply_layer(config, [parse_override(text) for text in overrides])
    return validate(config)


def method_options(config: dict) -> dict:
    """The resolved options of the config's method."""
    return dict(config["methods"][config["method"]])


def dump(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None)
