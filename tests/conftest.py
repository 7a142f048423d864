"""Hygiene shared by every test."""

from __future__ import annotations

import pytest

from grokopt.grokfast import _keep_subnormals, _subnormals_kept


@pytest.fixture(autouse=True)
def _subnormals_as_they_were():
    """A test that compiles with Inductor must not change how the tests after it round.
    torch 2.5's CPU kernels were built with -ffast-math and switch the thread to flushing
    subnormal numbers to zero as they load (hypothesis then refuses to draw floats); later
    torch leaves the setting alone, and then this does nothing. The same undo as
    Grokfast(fused=True)'s own."""
    kept = _subnormals_kept()
    yield
    _keep_subnormals(kept)
