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
SUBCOMMAND_MODULES = ("ccl_bench.kernels", "ccl_bench.train_cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ccl-bench", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
