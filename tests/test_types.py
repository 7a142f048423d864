"""The package type-checks: it ships py.typed, so its annotations are what users' type
checkers read."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_grokopt_type_checks_clean(tmp_path):
    api = pytest.importorskip("mypy.api")
    stdout, stderr, status = api.run([
        "--config-file", str(ROOT / "pyproject.toml"),
        "--cache-dir", str(tmp_path),  # (nothing written into the checkout)
        str(ROOT / "grokopt"),
    ])
    assert status == 0, stdout + stderr
    assert "Success: no issues found" in stdout, stdout
