"""grokopt: make networks grok sooner, inside an ordinary PyTorch training loop.

Grokfast (gradient filters), AmplifiedOptimizer (NeuralGrok's learned amplifier) and
GrokAlignLoss (Jacobian regularisation), plus the diagnostics and the grokking race.
What each method computes, its defaults and how it differs from the papers' code:
docs/methods.md.

``import grokopt`` loads the library only. The tools' names exported here (the race's
``RaceConfig``/``RaceResult``/``run_race``, the tasks' datasets and reference models) are
imported on first use, so that neither the race nor its optional packages (rich,
matplotlib, scikit-learn) load with the library.
"""

from __future__ import annotations

from typing import Any

from ._compat import check_torch_floor as _check_torch_floor

# Before anything else imports torch APIs that an older torch lacks: one clear error naming
# the required version instead of an ImportError from deep inside a submodule.
_check_torch_floor()

from .diagnostics import CentroidStats, absolute_gradient_entropy, centroid_alignment, centroids, jacobian_pc1_share
from .egd import EGD, polar_factor
from .grokalign import GrokAlignLoss
from .grokfast import Grokfast, NonFiniteGradientError, grokfast_
from .amplifier import make_amplifier
from .gphi import amplify_gradients
from .neuralgrok import AmplifiedOptimizer
from .orthograd import OrthoGrad, orthogonalize_
from .stablemax import StableMaxCrossEntropyLoss, log_stablemax, stablemax, stablemax_cross_entropy
from .jacobian import (
    FrobeniusEstimate,
    is_piecewise_linear,
    jacobian_frobenius_norm,
    per_sample_jacobian,
)
from .wrapper import GradientTransform

__version__ = "0.2.0"

# Tool names, resolved by __getattr__ on first use: name -> the module that defines it.
_LAZY = {
    "RaceConfig": "grokopt.race",
    "RaceResult": "grokopt.race",
    "run_race": "grokopt.race",
    "DecoderTransformer": "grokopt.tasks",
    "EmbeddingMLP": "grokopt.tasks",
    "OmnigrokMLP": "grokopt.tasks",
    "grokfast_split": "grokopt.tasks",
    "load_digits_task": "grokopt.tasks",
    "modular_dataset": "grokopt.tasks",
    "neuralgrok_split": "grokopt.tasks",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'grokopt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "AmplifiedOptimizer",
    "CentroidStats",
    "EGD",
    "DecoderTransformer",
    "EmbeddingMLP",
    "FrobeniusEstimate",
    "GradientTransform",
    "GrokAlignLoss",
    "Grokfast",
    "NonFiniteGradientError",
    "OmnigrokMLP",
    "OrthoGrad",
    "RaceConfig",
    "RaceResult",
    "StableMaxCrossEntropyLoss",
    "absolute_gradient_entropy",
    "amplify_gradients",
    "centroid_alignment",
    "centroids",
    "grokfast_",
    "grokfast_split",
    "is_piecewise_linear",
    "jacobian_frobenius_norm",
    "jacobian_pc1_share",
    "load_digits_task",
    "log_stablemax",
    "make_amplifier",
    "modular_dataset",
    "neuralgrok_split",
    "orthogonalize_",
    "per_sample_jacobian",
    "polar_factor",
    "run_race",
    "stablemax",
    "stablemax_cross_entropy",
]
