"""benchmarks/cuda.sh, where torch sees no GPU: it must stop at once with a clear message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cuda.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would run")
def test_cuda_script_refuses_without_a_gpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=150)
    assert proc.returncode == 3, proc.stderr
    assert "sees no CUDA GPU" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing was run, nothing written
