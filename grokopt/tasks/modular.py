"""Modular-arithmetic datasets of the grokking literature, generated in memory.

Each equation is a short token sequence whose answer is the class to predict. Two-operand
tasks read ``a <op> b =`` (4 tokens; the operator and ``=`` are the extra tokens ``p`` and
``p + 1``, so the vocabulary has ``p + 2`` entries); the five-operand mod-7 task reads the
operands ``a b c d e`` (5 tokens, same vocabulary size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .._checks import check_float, check_int

__all__ = [
    "MODULAR_TASKS",
    "ModularData",
    "ModularSplit",
    "modular_dataset",
    "grokfast_split",
    "neuralgrok_split",
    "canonical_task",
]

_TWO_OPERAND: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "a+b": lambda a, b: a + b,
    "a-b": lambda a, b: a - b,
    "a*b": lambda a, b: a * b,
    "a*a-b": lambda a, b: a * a - b,
}
_FIVE_OPERAND = "a*c+b*d-e"

#: Task names accepted by :func:`modular_dataset` (aliases map onto these).
MODULAR_TASKS: tuple[str, ...] = (*_TWO_OPERAND, _FIVE_OPERAND)

_ALIASES = {
    "add": "a+b",
    "sub": "a-b",
    "mul": "a*b",
    "sqsub": "a*a-b",
    "poly": "a*c+b*d-e",
    "poly7": "a*c+b*d-e",
}


def canonical_task(name: str) -> str:
    """Return the canonical spelling of a modular task name (``"mul"`` -> ``"a*b"``)."""
    key = name.replace(" ", "").lower()
    key = _ALIASES.get(key, key)
    if key not in MODULAR_TASKS:
        allowed = ", ".join(MODULAR_TASKS + tuple(_ALIASES))
        raise ValueError(f"task: unknown modular task {name!r}; allowed: {allowed}")
    return key


@dataclass(frozen=True)
class ModularData:
    """All equations of one task: ``inputs`` (N, seq_len) int64 tokens, ``labels`` (N,)."""

    task: str
    p: int
    inputs: Tensor
    labels: Tensor

    @property
    def vocab_size(self) -> int:
        return self.p + 2

    @property
    def seq_len(self) -> int:
        return int(self.inputs.shape[1])

    @property
    def num_classes(self) -> int:
        return self.p

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class ModularSplit:
    """Index tensors into a :class:`ModularData`.

    ``train`` is the whole training half; ``inner``/``outer`` split it further for NeuralGrok
    (``outer`` is empty for the Grokfast 50/50 split, where ``inner == train``).
    """

    train: Tensor
    test: Tensor
    inner: Tensor
    outer: Tensor


def modular_dataset(task: str, p: int | None = None) -> ModularData:
    """Every equation of ``task`` with the operand ranges of the published setups.

    Two-operand tasks: ``a`` in [0, p), ``b`` in [1, p) (9,312 equations at p = 97).
    ``a*c+b*d-e``: modulus 7, ``c, d`` in [1, 7) and ``a, b, e`` in [0, 7) (12,348 equations).

    Example:
        >>> data = modular_dataset("a*b", 97)
        >>> len(data), data.inputs[0].tolist(), int(data.labels[0])
        (9312, [0, 97, 1, 98], 0)
    """
    name = canonical_task(task)
    if name == _FIVE_OPERAND:
        if p is None:
            p = 7
        _check_modulus(p)
        full = torch.arange(p)
        nonzero = torch.arange(1, p)
        a, b, c, d, e = torch.cartesian_prod(full, full, nonzero, nonzero, full).unbind(1)
        inputs = torch.stack([a, b, c, d, e], dim=1)
        labels = torch.remainder(a * c + b * d - e, p)
    else:
        if p is None:
            p = 97
        _check_modulus(p)
        a, b = torch.cartesian_prod(torch.arange(p), torch.arange(1, p)).unbind(1)
        op = torch.full_like(a, p)
        eq = torch.full_like(a, p + 1)
        inputs = torch.stack([a, op, b, eq], dim=1)
        labels = torch.remainder(_TWO_OPERAND[name](a, b), p)
    return ModularData(name, p, inputs.contiguous(), labels)


def _check_modulus(p: object) -> None:
    check_int("p", p, minimum=2)


def _permutation(n: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=gen)


def grokfast_split(n: int, seed: int, train_fraction: float = 0.5) -> ModularSplit:
    """Seeded split into ``round(train_fraction * n)`` training and the rest test indices.

    Example:
        >>> s = grokfast_split(9312, seed=0)
        >>> len(s.train), len(s.test), len(s.outer)
        (4656, 4656, 0)
    """
    check_float("train_fraction", train_fraction, minimum=0, maximum=1, min_open=True, max_open=True)
    perm = _permutation(n, seed)
    n_train = round(train_fraction * n)
    train = perm[:n_train]
    return ModularSplit(train=train, test=perm[n_train:], inner=train, outer=perm[:0])


def neuralgrok_split(
    n: int, seed: int, test_fraction: float = 0.5, outer_fraction: float = 0.01
) -> ModularSplit:
    """NeuralGrok's seeded split: test (50%), inner training (49%), outer held-out (1%).

    Fractions are of the whole dataset; the outer slice comes out of the training half, never
    out of the test set. Sizes: ``test = round(test_fraction*n)``,
    ``outer = max(1, round(outer_fraction*n))``, ``inner`` the rest.

    Example:
        >>> s = neuralgrok_split(9312, seed=0)
        >>> len(s.test), len(s.inner), len(s.outer), len(s.train)
        (4656, 4563, 93, 4656)
    """
    check_float("test_fraction", test_fraction, minimum=0, maximum=1, min_open=True, max_open=True)
    if not 0.0 < outer_fraction < 1.0 - test_fraction:
        raise ValueError(
            f"outer_fraction: expected a value in (0, 1 - test_fraction), got {outer_fraction!r}"
        )
    perm = _permutation(n, seed)
    n_test = round(test_fraction * n)
    n_outer = max(1, round(outer_fraction * n))
    test = perm[:n_test]
    outer = perm[n_test : n_test + n_outer]
    inner = perm[n_test + n_outer :]
    train = perm[n_test:]
    return ModularSplit(train=train, test=test, inner=inner, outer=outer)
