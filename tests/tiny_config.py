"""The tests' seconds-long smoke-run configuration (tiny.yaml beside this file), as arguments and as a config.

It is a config file rather than a user-facing preset. ``--preset ""`` puts it straight over the defaults, also
for ``compare`` and ``overhead``, whose default preset (``quick``) would otherwise lie under it.
"""
from __future__ import annotations

import os

from ccl_bench.config import load_config

TINY_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.yaml")
TINY_ARGS = ["--preset", "", "--config", TINY_FILE]


def tiny_config(*overrides: str, **direct) -> dict:
    """``load_config`` of the tiny file over the defaults, then ``direct`` and ``--set``-style ``overrides``."""
    return load_config(None, TINY_FILE, list(overrides), **direct)
