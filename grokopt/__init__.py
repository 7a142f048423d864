"""grokopt: make networks grok sooner, inside an ordinary PyTorch training loop."""

__version__ = "0.1.0"

from .grokfast import Grokfast, NonFiniteGradientError, grokfast_
from .wrapper import GradientTransform

__all__ = ["GradientTransform", "Grokfast", "NonFiniteGradientError", "grokfast_"]
