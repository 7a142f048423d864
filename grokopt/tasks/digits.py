"""scikit-learn's bundled 8x8 handwritten digits as a small MNIST-like grokking task.

The data ship inside scikit-learn (no download). The Omnigrok recipe makes a network grok on
such data: a small training set, a bias-free ReLU MLP and a large initialisation scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._checks import check_int
from .._extras import require_race_extra

__all__ = ["DigitsData", "load_digits_task"]


@dataclass(frozen=True)
class DigitsData:
    """Train/test tensors: ``x`` float32 (N, 64) scaled to [0, 1], ``y`` int64 labels 0..9."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def input_dim(self) -> int:
        return int(self.x_train.shape[1])

    num_classes: int = 10


def load_digits_task(train_size: int = 1024, seed: int = 0) -> DigitsData:
    """Seeded split of the 1,797 digits into ``train_size`` training and the rest test images.

    Example:
        >>> d = load_digits_task(train_size=1024, seed=0)
        >>> tuple(d.x_train.shape), tuple(d.x_test.shape), d.num_classes
        ((1024, 64), (773, 64), 10)
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        require_race_extra("scikit-learn")
    bunch = load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    n = int(y.shape[0])
    check_int("train_size", train_size, minimum=1, maximum=n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    tr, te = perm[:train_size], perm[train_size:]
    return DigitsData(x[tr].contiguous(), y[tr], x[te].contiguous(), y[te])
