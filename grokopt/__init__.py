"""grokopt: make networks grok sooner, inside an ordinary PyTorch training loop.

Grokfast (gradient filters), AmplifiedOptimizer (NeuralGrok's learned amplifier) and
GrokAlignLoss (Jacobian regularisation), plus the diagnostics and the grokking race.
What each method computes, its defaults and how it differs from the papers' code:
docs/methods.md.
"""

from ._compat import check_torch_floor as _check_torch_floor

# Before anything else imports torch APIs that an older torch lacks: one clear error naming
# the required version instead of an ImportError from deep inside a submodule.
_check_torch_floor()

from .centroids import CentroidStats, centroid_alignment, centroids, jacobian_pc1_share
from .egd import EGD, polar_factor
from .grokalign import GrokAlignLoss
from .grokfast import Grokfast, NonFiniteGradientError, grokfast_
from .metrics import absolute_gradient_entropy
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
from .race import RaceConfig, RaceResult, run_race
from .tasks import (
    DecoderTransformer,
    EmbeddingMLP,
    OmnigrokMLP,
    grokfast_split,
    load_digits_task,
    modular_dataset,
    neuralgrok_split,
)
from .wrapper import GradientTransform

__version__ = "0.1.0"

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
