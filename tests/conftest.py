"""Hygiene shared by every test."""

from __future__ import annotations

import sys

import pytest
import torch


@pytest.fixture(autouse=True)
def _subnormals_as_they_were():
    """A test that compiles with Inductor must not change how the tests after it round.
    torch 2.5's CPU kernels were built with -ffast-math and switch the thread to flushing
    subnormal numbers to zero as they load (hypothesis then refuses to draw floats); later
    torch leaves the setting alone, and then this does nothing."""
    kept = sys.float_info.min / 2 > 0
    yield
    if kept and not sys.float_info.min / 2 > 0:
        torch.set_flush_denormal(False)
