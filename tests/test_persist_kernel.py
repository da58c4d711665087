"""The kernel side of kernels.persist (the cases in persist_kernel_cases.py), run in a pytest
process of their own.

Those cases launch, let go and take back kernels from the test process itself, with event
loops of their own test by test and one ZMQ context for all: run in the suite's process,
they share that process's state with every test before and after them. Here each run starts
clean, and the output of any failing case is shown whole.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
CASES = Path(__file__).parent / "persist_kernel_cases.py"


def test_persist_kernel_cases() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", str(CASES)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert result.returncode == 0, result.stdout[-30000:] + result.stderr[-5000:]
    # Every case ran and passed: none was skipped or deselected on the way.
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-3000:]
