"""``ccl-bench`` subcommands of the co-training benchmark: train, compare, report, export, methods, overhead."""
from __future__ import annotations

import argparse
import os
import sys

from .student_names import ENSEMBLE, student_label

EXIT_BAD_INPUT = 2
EXIT_NON_FINITE = 3


def split_method_specs(text: str) -> list[str]:
    """Split at the commas outside brackets, so that a method spec may hold a YAML list: ``ccl:region=[8,8],dml``."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text + ","):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth <= 0:
            parts.append(text[start:i].strip())
            start = i + 1
    return [part for part in parts if part]


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None


def _method_spec(spec: str):
    """``parse_method_spec`` with its errors (a bad name, a pair that is not key=value, a value that is not YAML)
    as ConfigErrors naming the spec."""
    import yaml

    from .config import ConfigError
    from .methods import parse_method_spec

    try:
        return parse_method_spec(spec)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"method spec {spec!r}: {' '.join(str(exc).split())}") from None


def _check_data(configs) -> None:
    """Build the datasets of each distinct data config and read their files' headers before any run directory
    is written: a missing folder, a bad option value or a broken file is one error line and leaves nothing
    behind (the training builds them again: a cache hit for digits, a file listing for the benchmarks)."""
    import json

    from .data import build_dataset

    seen = set()
    for config in configs:
        d = config["data"]
        key = json.dumps(d, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        for split, extra in ((d["train_split"], d["train_options"]), (d["val_split"], d["val_options"])):
            dataset = build_dataset(d["dataset"], split, d["root"], **{**d["options"], **extra})
            dataset.check_files()


def _overrides(args) -> list[str]:
    return [item for group in (args.set or []) for item in group]


def _plugin_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plugin", action="append", metavar="MODULE_OR_FILE.py",
                        help="import a module (dotted name) or a .py file that registers methods (repeatable); "
                             "recorded in the run's config (plugins), so --resume loads it again. Installed "
                             "plugins (entry points of the group ccl_bench.methods) need no flag")


def _load_plugins(args, recorded=()) -> None:
    """Import the --plugin modules and files (and a resumed run's ``recorded`` ones) before any method spec is
    parsed, so that a plugin's method names are known to it."""
    from .methods.plugins import load_plugins

    load_plugins([p for p in recorded if isinstance(p, str)] + (getattr(args, "plugin", None) or []))


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help="preset name (see `ccl-bench methods`), e.g. quick, voc, cityscapes, camvid")
    parser.add_argument("--config", help="YAML config file applied after the preset")
    parser.add_argument("--iters", type=int, help="training iterations (train.iters)")
    parser.add_argument("--set", action="append", nargs="+", metavar="KEY=VALUE",
                        help="override a config key with a YAML value, e.g. --set train.amp=off methods.ccl.hfd=false; "
                             "KEY={} or KEY=null resets a mapping (students.cnn.options, optim.vit, ...) to its "
                             "default, KEY={a: 1} replaces it, KEY.a=1 updates one entry; switching data.dataset "
                             "drops the preset's dataset options")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars (train.progress=false)")
    _plugin_argument(parser)


def _load(args, method: str | None, seed: int | None, label: str | None = None, method_options=None,
          config_files: list[str] | None = None, preset: str | None = "") -> dict:
    from .config import load_config

    direct = {"method": method, "seed": seed, "train.iters": args.iters, "label": label,
              "train.progress": False if args.no_progress else None, "plugins": args.plugin}
    for key, value in (method_options or {}).items():
        direct[f"methods.{method}.{key}"] = value
    return load_config(args.preset if preset == "" else preset,
                       config_files if config_files is not None else args.config, _overrides(args), **direct)


def _message(exc: BaseException) -> str:
    """The error's own text; for an error re-raised from a DataLoader worker (its text carries the worker's
    traceback) only the last line, the original error, without its class name."""
    text = str(exc)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        name, sep, rest = last.partition(": ")
        text = rest if sep and " " not in name else last
    return text


def _fail(command: str, exc: BaseException, code: int = EXIT_BAD_INPUT) -> int:
    print(f"ccl-bench {command}: error: {_message(exc)}", file=sys.stderr)
    return code


def _guarded(command: str, fn):
    """Run ``fn``; turn the errors a user can cause into a message and an exit code (no traceback)."""
    from .config import ConfigError
    from .engine import CheckpointError, NonFiniteLossError, RunDirError, TrainingInterrupted

    try:
        return fn() or 0
    except TrainingInterrupted as exc:
        print(f"ccl-bench {command}: interrupted: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training loop: no checkpoint
        print(f"ccl-bench {command}: interrupted (no checkpoint written by this interruption)", file=sys.stderr)
        return 130
    except NonFiniteLossError as exc:
        return _fail(command, exc, EXIT_NON_FINITE)
    except (ConfigError, RunDirError, CheckpointError, ValueError, OSError) as exc:  # OSError: files, folders
        return _fail(command, exc)


# -- train ----------------------------------------------------------------------------------------------------
def train_config(args) -> dict:
    """The validated config of a ``train`` command (what the property tests exercise, without training)."""
    from .config import load_file
    from .engine import RunDirError

    saved = os.path.join(args.out, "config.yaml")
    tree = load_file(saved) if args.resume and os.path.isfile(saved) else None
    recorded = (tree or {}).get("plugins")
    _load_plugins(args, recorded if isinstance(recorded, list) else [])
    name, options = _method_spec(args.method) if args.method else (None, {})
    label = args.label or (args.method if options else None)
    if tree is not None:
        # the run's own config, then what this command states explicitly (checked against it on resume)
        preset = tree.get("preset")
        if args.preset and args.preset != preset:
            raise RunDirError(f"--resume {args.out!r}: the run used --preset {preset!r}, not {args.preset!r}")
        files = [saved] + ([args.config] if args.config else [])
        return _load(args, name, args.seed, label, options, config_files=files, preset=None)
    return _load(args, name, args.seed, label, options)


def cmd_train(args) -> int:
    def run():
        from .engine import run_training

        config = train_config(args)
        _check_data([config])
        metrics = run_training(config, args.out, resume=args.resume, overwrite=args.overwrite)
        if "miou" in metrics and int(os.environ.get("RANK", "0")) == 0:
            scores = ", ".join(f"{student_label(k, metrics['students'].get(k)) if k != ENSEMBLE else k} {v:.4f}"
                               for k, v in metrics["miou"].items())
            print(f"{metrics['method']} seed {metrics['seed']} step {metrics['step']}: mIoU {scores} -> "
                  f"{os.path.join(args.out, 'metrics.json')}")
    return _guarded("train", run)


# -- compare --------------------------------------------------------------------------------------------------
QUICK_METHODS = "independent,dml,kdcl-minlogit,ccl"


def cmd_compare(args) -> int:
    def run():
        import time

        from .config import ConfigError
        from .engine import distributed
        from .engine.compare import run_dir_name, train_or_reuse
        from .report import write_report

        _load_plugins(args)
        specs = split_method_specs(args.methods)
        if not specs or not args.seeds:
            raise ConfigError(f"--methods {args.methods!r} --seeds {args.seeds!r}: expected at least one method "
                              f"and one seed, e.g. --methods {QUICK_METHODS} --seeds 0")
        parsed = [_method_spec(s) for s in specs]
        configs = [(spec, seed, _load(args, name, seed, spec, options))  # every config checked before any run
                   for spec, (name, options) in zip(specs, parsed) for seed in args.seeds]
        _check_data([config for _, _, config in configs])
        info = distributed.setup(configs[0][2]["train"]["device"])
        start = time.perf_counter()

        def say(text: str) -> None:
            if info.is_main:
                print(text, file=sys.stderr)

        try:
            for spec, seed, config in configs:
                train_or_reuse(config, os.path.join(args.out, run_dir_name(spec), f"seed{seed}"), say)
        finally:
            distributed.teardown(info)
        if info.is_main:
            written = write_report([args.out], args.out, baseline=args.baseline, plots=not args.no_plots,
                                   order=specs)
            with open(written["markdown"]) as f:
                print(f.read())
            print(f"compare: {len(configs)} runs in {time.perf_counter() - start:.0f} s; tables and plots in "
                  f"{args.out}", file=sys.stderr)
    return _guarded("compare", run)


# -- tune -----------------------------------------------------------------------------------------------------
def _same_validation_data(a: dict, b: dict) -> bool:
    """Whether two data configs validate on the same images (same count, same first and last item): what
    ``tune`` refuses, since a knob chosen on the reported validation split biases the report."""
    import torch

    from .data import build_dataset

    def val(d):
        return build_dataset(d["dataset"], d["val_split"], d["root"], **{**d["options"], **d["val_options"]})

    if a == b:
        return True
    va, vb = val(a), val(b)
    return len(va) == len(vb) and all(torch.equal(torch.as_tensor(va[i][0]), torch.as_tensor(vb[i][0]))
                                      for i in (0, len(va) - 1))


def cmd_tune(args) -> int:
    """Equal-budget tuning of one method's knobs on a held-out copy of the data (:mod:`ccl_bench.tune`)."""
    def run():
        from .config import ConfigError
        from .engine.compare import train_or_reuse
        from .engine.run_dir import read_metrics
        from .methods import method_class
        from .tune import check_recorded, run_study

        _load_plugins(args)
        name, fixed = _method_spec(args.method)
        cls = method_class(name)
        tuned_and_fixed = sorted(set(fixed) & set(cls.search_space))
        if tuned_and_fixed:
            raise ConfigError(f"--method {args.method!r} fixes {tuned_and_fixed}, which tune searches; expected "
                              f"fixed options outside the search space {sorted(cls.search_space)}")
        not_data = [item for item in args.held_out if not item.startswith("data.")]
        if not_data:
            raise ConfigError(f"--held-out {not_data}: expected data.KEY=VALUE items that select the held-out copy")
        held = argparse.Namespace(**{**vars(args), "set": (args.set or []) + [args.held_out]})
        if _same_validation_data(_load(args, name, args.seed, None, fixed)["data"],
                                 _load(held, name, args.seed, None, fixed)["data"]):
            raise ConfigError(f"--held-out {' '.join(args.held_out)}: the validation images are the same as "
                              f"without it; expected a copy the reports never show (e.g. data.options.seed=1 "
                              f"for the digits data)")

        def train_trial(options: dict, folder: str) -> dict:
            check_recorded(name, options, folder)
            config = _load(held, name, args.seed, None, {**fixed, **options})
            _check_data([config])
            train_or_reuse(config, folder, lambda text: print(text, file=sys.stderr))
            return read_metrics(folder)

        os.makedirs(args.out, exist_ok=True)
        table = run_study(cls, args.trials, args.sampler_seed, args.out, train_trial)
        print(table.astype({"trial": str}).to_markdown(index=False, floatfmt=".4f"))
        print(f"tune: {args.trials} trials of {name}; the best options in {os.path.join(args.out, 'best.yaml')}",
              file=sys.stderr)
    return _guarded("tune", run)


# -- report ---------------------------------------------------------------------------------------------------
def cmd_report(args) -> int:
    def run():
        from .report import write_report

        _load_plugins(args)  # for symmetry: a report reads only the runs' metrics.json
        out = args.out or (args.dirs[0] if len(args.dirs) == 1 else "report")
        written = write_report(args.dirs, out, baseline=args.baseline, plots=not args.no_plots,
                               complete_only=args.complete_only, order=args.order)
        with open(written["markdown"]) as f:
            print(f.read())
        print("written: " + ", ".join(sorted(written.values())), file=sys.stderr)
    return _guarded("report", run)


# -- export ---------------------------------------------------------------------------------------------------
def cmd_export(args) -> int:
    def run():
        from .engine import export_student

        path = export_student(args.checkpoint, args.student, args.out)
        print(f"exported the {args.student} student of {args.checkpoint} as a plain state dict: {path}")
    return _guarded("export", run)


# -- methods --------------------------------------------------------------------------------------------------
def cmd_methods(args) -> int:
    def run():
        from .config import preset_names
        from .methods import method_class, method_names
        from .methods.registry import origin

        _load_plugins(args)
        for name in method_names():
            cls = method_class(name)
            print(f"{name:15s} {cls.description}")
            if not origin(cls).startswith("ccl_bench."):
                print(" " * 16 + f"plugin: {origin(cls)}")
            if cls.defaults:
                print(" " * 16 + "options: " + ", ".join(f"{k}={v!r}" for k, v in cls.defaults.items()))
            if cls.search_space:
                print(" " * 16 + "tune searches: " + ", ".join(
                    f"{k} in [{s.low:g}, {s.high:g}]{' (log)' if s.log else ''}" for k, s in cls.search_space.items()))
        print("presets: " + ", ".join(preset_names()))
    return _guarded("methods", run)


# -- overhead -------------------------------------------------------------------------------------------------
def cmd_overhead(args) -> int:
    """The median seconds of a training step per method (:mod:`ccl_bench.engine.overhead`), as a table."""
    def run():
        import pandas as pd

        from .config import ConfigError
        from .engine import Trainer, distributed
        from .engine.overhead import median_step_seconds

        _load_plugins(args)
        specs = split_method_specs(args.methods)
        if not specs:
            raise ConfigError(f"--methods {args.methods!r}: expected at least one method, e.g. independent,ccl")
        trainers, info = [], None
        for spec in specs:
            name, options = _method_spec(spec)
            config = _load(args, name, 0, spec, options)
            info = distributed.setup(config["train"]["device"])
            trainers.append(Trainer(config, None, info, quiet=True))
        batch = trainers[0].fixed_batch()
        medians = median_step_seconds(trainers, batch, args.warmup, args.steps)
        # The reference (first method) is the students' CE step, so what a method adds over it is the cost of
        # its distillation terms; `extra_share` is that cost as a share of the method's own step.
        table = pd.DataFrame({"method": specs, "ms_per_step": [1000 * m for m in medians],
                              f"x_vs_{specs[0]}": [m / medians[0] for m in medians],
                              "extra_share": [1 - medians[0] / m for m in medians]})
        print(f"device: {info.device}, preset {args.preset}, batch {tuple(batch[0].shape)}, median of {args.steps} "
              f"interleaved steps on one fixed batch (data loading excluded); extra_share: the part of the "
              f"step that the method adds over {specs[0]}")
        print(table.to_markdown(index=False, floatfmt=".3f"))
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            table.assign(device=str(info.device), batch=str(tuple(batch[0].shape)), steps=args.steps).to_csv(
                args.out, index=False)
    return _guarded("overhead", run)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train one method with one seed into a run directory")
    p.add_argument("--method", help="method name, optionally with options: ccl, dml, ccl:hfd=false, ...")
    p.add_argument("--seed", type=int, help="seed of the students' init and of the data order")
    p.add_argument("--out", required=True, help="run directory (never overwritten silently)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument("--label", help="the method's name in reports (default: --method)")
    _config_arguments(p)
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("compare", help="several methods x seeds, then the comparison table")
    p.add_argument("--methods", default=QUICK_METHODS,
                   help=f"comma-separated method specs (default {QUICK_METHODS}); ablations: ccl:hfd=false")
    p.add_argument("--seeds", type=_seeds, default=[0], help="comma-separated seeds (default 0)")
    p.add_argument("--out", default="runs/compare", help="folder of the runs and the report (default runs/compare)")
    p.add_argument("--baseline", default="independent", help="method the deltas refer to")
    p.add_argument("--no-plots", action="store_true")
    _config_arguments(p)
    p.set_defaults(func=cmd_compare, preset="quick")

    p = subparsers.add_parser("tune", help="tune one method's own knobs with a fixed trial budget on held-out data")
    p.add_argument("--method", required=True, help="method name, optionally with fixed options outside its knobs")
    from .tune import TRIALS

    p.add_argument("--trials", type=int, default=TRIALS, help=f"trial budget, the same for every method (default {TRIALS})")
    p.add_argument("--sampler-seed", type=int, default=0, help="seed of the trial sampler (default 0)")
    p.add_argument("--seed", type=int, default=0, help="training seed of every trial (default 0)")
    p.add_argument("--held-out", required=True, nargs="+", metavar="data.KEY=VALUE",
                   help="what makes the trials' data a held-out copy, never the reported split, e.g. "
                        "data.options.seed=1")
    p.add_argument("--out", required=True, help="folder of the study (trial<k> runs, trials.csv, best.yaml)")
    _config_arguments(p)
    p.set_defaults(func=cmd_tune)

    p = subparsers.add_parser("report", help="aggregate run directories into tables (md, csv, tex) and plots")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run directories or folders holding runs")
    p.add_argument("--out", help="where to write (default: DIR when one is given, else ./report)")
    p.add_argument("--baseline", default="independent")
    p.add_argument("--complete-only", action="store_true", help="leave out runs that have not finished")
    p.add_argument("--order", type=split_method_specs, default=[],
                   help="comma-separated methods listed first, in this order")
    p.add_argument("--no-plots", action="store_true")
    _plugin_argument(p)
    p.set_defaults(func=cmd_report)

    p = subparsers.add_parser("export", help="write one student of a run as a plain state dict")
    p.add_argument("checkpoint", help="run directory or checkpoint file")
    p.add_argument("--student", required=True, help="the student's slot: a, b, ... (cnn and vit name a and b)")
    p.add_argument("--out", required=True, help="output .pt file")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser("methods", help="list the methods (plugins included), their options and the presets")
    _plugin_argument(p)
    p.set_defaults(func=cmd_methods)

    p = subparsers.add_parser("overhead", help="time a training step of each method (CCL vs CE co-training)")
    p.add_argument("--methods", default="independent,ccl", help="first one is the reference")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", help="also write the table to this CSV file")
    _config_arguments(p)
    p.set_defaults(func=cmd_overhead, preset="quick")
