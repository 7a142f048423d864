"""The torch floor and the version checks of features newer than it (grokopt._compat)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _features import needs_muon

from grokopt import _compat
from grokopt._compat import TorchTooOldError, check_torch_floor, torch_version

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- version parsing


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2.5.0", (2, 5, 0)),
        ("2.14.1+cpu", (2, 14, 1)),
        ("2.13.0+cu130", (2, 13, 0)),
        ("2.6.0a0+git1a2b3c4", (2, 6, 0)),
        ("2.10.0.dev20251201", (2, 10, 0)),
        ("3.0", (3, 0, 0)),
    ],
)
def test_torch_version_parses_release_local_and_nightly_tags(text, expected):
    assert torch_version(text) == expected


def test_torch_version_defaults_to_the_installed_torch():
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    assert torch_version()[:2] == (major, minor)


@pytest.mark.parametrize("text", ["", "nightly", "v2.5.0"])
def test_torch_version_refuses_what_is_not_a_version(text):
    with pytest.raises(ValueError, match="version must look like"):
        torch_version(text)


# ---------------------------------------------------------------- the floor


def _pyproject_floor() -> tuple[int, int]:
    text = (ROOT / "pyproject.toml").read_text()
    found = re.findall(r'"torch>=(\d+)\.(\d+)"', text)
    assert len(found) == 1, f"expected one torch floor in pyproject.toml, found {found}"
    return int(found[0][0]), int(found[0][1])


def test_the_checked_floor_is_the_declared_one():
    assert _compat.MIN_TORCH == _pyproject_floor()


@pytest.mark.parametrize("version", ["2.5.0", "2.5.1+cu124", "2.6.0a0+git", "2.14.1", "3.0.0"])
def test_floor_accepts_the_floor_and_newer(version):
    check_torch_floor(version)


@pytest.mark.parametrize("version", ["2.4.1", "2.4.0+cu121", "2.0.0", "1.13.1"])
def test_floor_refuses_older_torch_naming_both_versions(version):
    with pytest.raises(TorchTooOldError) as info:
        check_torch_floor(version)
    message = str(info.value)
    floor = ".".join(map(str, _pyproject_floor()))
    assert f"torch>={floor}" in message and version in message
    assert isinstance(info.value, ImportError)


def test_importing_grokopt_under_an_old_torch_fails_with_the_floor_message():
    # A fresh interpreter: the check runs when grokopt is first imported.
    code = "import torch; torch.__version__ = '2.4.1'; import grokopt"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode != 0
    assert "TorchTooOldError: grokopt needs torch>=" in done.stderr
    assert "found torch 2.4.1" in done.stderr


# ---------------------------------------------------------------- features newer than the floor


@needs_muon
def test_muon_is_torch_optim_muon_where_present():
    assert _compat.muon() is torch.optim.Muon


def test_muon_missing_names_torch_2_9(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon", raising=False)
    with pytest.raises(TorchTooOldError) as info:
        _compat.muon()
    message = str(info.value)
    assert "torch.optim.Muon" in message and "2.9" in message
    assert torch.__version__ in message


def test_fully_shard_is_the_public_fsdp2_entry_point():
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip(f"torch {torch.__version__} has no public fully_shard")
    assert _compat.fully_shard() is fsdp.fully_shard


def test_fully_shard_missing_names_torch_2_6(monkeypatch):
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    monkeypatch.delattr(fsdp, "fully_shard", raising=False)
    with pytest.raises(TorchTooOldError) as info:
        _compat.fully_shard()
    message = str(info.value)
    assert "torch.distributed.fsdp.fully_shard" in message and "2.6" in message
    assert torch.__version__ in message
    assert isinstance(info.value.__cause__, ImportError)


def test_fully_shard_without_distributed_says_so(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    with pytest.raises(TorchTooOldError, match="built without torch.distributed"):
        _compat.fully_shard()
