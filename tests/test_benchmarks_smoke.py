"""The benchmark suites still run (timing off): a slow test, outside the default run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")


@pytest.mark.slow
def test_every_benchmark_suite_runs_with_timing_off() -> None:
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
         # the per-element reference and the 50M memory probe take minutes; the rest runs
         "-k", "not paper-per-element and not memory", "benchmarks"],
        cwd=root, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout
