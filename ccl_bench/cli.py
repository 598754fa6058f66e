"""The ``ccl-bench`` command (also ``python -m ccl_bench``).

Each subcommand lives in its own module, which provides ``add_parser(subparsers)``; the parser it adds sets
``func`` to the function that runs it. Modules are imported only when their subcommand is listed, so that
``ccl-bench --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# module providing add_parser(subparsers) for each subcommand group
SUBCOMMAND_MODULES = ("ccl_bench.kernels.cli", "ccl_bench.train_cli")


CONFIG_HELP = """configuration (train, compare, overhead):
  defaults <- --preset <- --config FILE <- --method/--seed/--iters <- --set KEY=VALUE (VALUE is YAML)
  --set KEY.sub=VALUE        set one key, e.g. --set train.iters=100 data.options.size=128
  --set KEY={}  or KEY=null  reset a mapping (an option mapping such as students.cnn.options, a section
                             such as optim.vit, methods.ccl) to its default: drops what a preset set there
  --set KEY={a: 1}           replace a mapping: its default updated with {a: 1}; KEY.a=1 updates one entry
  switching data.dataset (preset, file or --set) drops the dataset options (data.options, data.train_options,
  data.val_options) set before it; options given in the same layer are kept.
  Options are checked against the dataset's, student's and method's own parameters: an unknown one is an
  error listing the valid ones. `ccl-bench methods` lists methods, their options and the presets."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ccl-bench", description=__doc__.splitlines()[0], epilog=CONFIG_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
