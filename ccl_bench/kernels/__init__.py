"""Kernel benchmarking: ``ccl-bench kernels`` (:mod:`.bench` times, :mod:`.cli` runs and writes the tables) and
the Liger-Kernel peer (:mod:`.liger_peer`). The inputs come from :mod:`ccl_ops.testing`."""
from .bench import (
    DEFAULT_SHAPES,
    KL_OPS,
    OPS,
    BenchArgumentError,
    Case,
    Timed,
    implementations,
    interleaved_ms,
    machine_description,
    make_case_inputs,
    peak_extra_bytes,
    run,
    students_of,
)
from .cli import add_parser, main

__all__ = [
    "DEFAULT_SHAPES",
    "KL_OPS",
    "OPS",
    "BenchArgumentError",
    "Case",
    "Timed",
    "add_parser",
    "implementations",
    "interleaved_ms",
    "machine_description",
    "main",
    "make_case_inputs",
    "peak_extra_bytes",
    "run",
    "students_of",
]
