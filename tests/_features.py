"""torch features newer than grokopt's floor (2.5) that some tests need: one check each."""

from __future__ import annotations

import pytest
import torch

HAS_MUON = hasattr(torch.optim, "Muon")
"""Whether this torch has ``torch.optim.Muon`` (2.9 and later)."""

needs_muon = pytest.mark.skipif(
    not HAS_MUON, reason=f"torch {torch.__version__} has no torch.optim.Muon (2.9+)")
