"""The examples a user copies from run as they are (so they cannot rot): the losses in a plain loop."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("method", ["ccl", "dml"])
def test_own_loop_trains_a_few_steps(method):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "own_loop.py"), "--method", method,
                             "--steps", "3"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    losses = [float(v) for v in re.findall(rf"^step \d+: loss (\S+) \(CE \S+, {method} \S+\)$", result.stdout,
                                           flags=re.MULTILINE)]
    assert len(losses) == 3 and all(math.isfinite(v) and v > 0 for v in losses), result.stdout
