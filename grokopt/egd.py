"""Egalitarian Gradient Descent (Pasand and Dohmatob 2025): equalise every 2-D gradient's
singular values.

Each matrix gradient ``G = U S V^T`` (thin SVD) is replaced by ``U V^T`` = ``(G G^T)^(-1/2) G``:
all its directions move at the same speed, so the slow directions that keep a network on
its grokking plateau are no longer starved. Tensors that are not 2-D are left as they are.

``method="svd"`` (default, the paper's) is exact. ``method="newton-schulz"`` approximates
the same polar factor with matrix products only (faster on a GPU): the cubic iteration
``X <- 1.5 X - 0.5 X X^T X`` from ``X = G / ||G||_F``, which drives every non-zero singular
value to 1; singular values far below ``||G||_F`` need more ``ns_steps`` to get there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._checks import check_choice, check_int
from ._distributed import is_dtensor
from .wrapper import GradientTransform

__all__ = ["EGD", "polar_factor"]

_METHODS = ("svd", "newton-schulz")


def polar_factor(g: Tensor, *, method: str = "svd", ns_steps: int = 30) -> Tensor:
    """``U V^T`` of a matrix ``g = U S V^T``, in ``g``'s dtype (computed in at least fp32).

    Args:
        g: a 2-D tensor.
        method: ``"svd"`` (exact) or ``"newton-schulz"`` (iterative, ``ns_steps`` steps).
        ns_steps: iterations of the Newton-Schulz method.

    Example:
        >>> polar_factor(torch.tensor([[3.0, 0.0], [0.0, -0.5]]))
        tensor([[ 1.,  0.],
                [ 0., -1.]])
    """
    _check(method=method, ns_steps=ns_steps)
    if g.ndim != 2:
        raise ValueError(f"g must be a 2-D tensor, got shape {tuple(g.shape)}")
    work = torch.promote_types(g.dtype, torch.float32)
    x = g.to(work)
    if method == "svd":
        u, _, vh = torch.linalg.svd(x, full_matrices=False)
        return (u @ vh).to(g.dtype)
    tall = x.shape[0] > x.shape[1]
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    x = x / (torch.linalg.matrix_norm(x) + torch.finfo(work).tiny)
    for _ in range(ns_steps):
        x = 1.5 * x - 0.5 * (x @ x.T) @ x
    return (x.T if tall else x).to(g.dtype)


def _check(**options: Any) -> None:
    check_choice("method", options.get("method", "svd"), _METHODS)
    check_int("ns_steps", options.get("ns_steps", 1), minimum=1)


class EGD(GradientTransform):
    """Wrap any optimizer so that every 2-D gradient is replaced by its polar factor ``U V^T``.

    Vectors (biases, norms) and tensors of other ranks keep their gradients. The reference
    switches back to the plain update once test accuracy passes 95%; here that is the
    caller's decision: ``group["egd_enabled"] = False`` turns the transform off for a group
    (the wrapper then steps exactly as the bare optimizer). The formula, defaults and
    references: docs/methods.md.

    Args:
        optimizer: the optimizer to wrap (the paper: plain SGD).
        method: ``"svd"`` (default, exact) or ``"newton-schulz"``.
        ns_steps: Newton-Schulz iterations (default 30).
        restore_grad: ``True`` (default): after ``step()`` each ``p.grad`` is the gradient
            backward produced, as with any torch optimizer (the transform works on a
            scratch copy: one extra gradient-sized buffer during the step). ``False``: the
            transformed gradient is written into ``p.grad`` in place, with no extra buffer.

    Example:
        >>> import torch
        >>> from grokopt import EGD
        >>> model = torch.nn.Linear(4, 3)
        >>> opt = EGD(torch.optim.SGD(model.parameters(), lr=0.1))
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()
        >>> opt.step(); opt.zero_grad()
    """

    _prefix = "egd_"

    def __init__(
        self, optimizer: Optimizer, *, method: str = "svd", ns_steps: int = 30,
        restore_grad: bool = True,
    ) -> None:
        super().__init__(optimizer, dict(method=method, ns_steps=ns_steps, enabled=True),
                         restore_grad=restore_grad)

    def _validate_group(self, options: dict[str, Any]) -> None:
        _check(**{k[len(self._prefix):]: v for k, v in options.items()})
        if "egd_enabled" in options and not isinstance(options["egd_enabled"], bool):
            raise TypeError(f"enabled must be a bool, got {options['egd_enabled']!r}")

    def _transform_gradients(self) -> None:
        for group in self.param_groups:
            if not group["egd_enabled"]:
                continue
            for _, g in self._grads(group):
                if g.ndim != 2:
                    continue
                if is_dtensor(g):
                    raise NotImplementedError(
                        "EGD needs whole matrices: sharded (DTensor, e.g. FSDP2) gradients are "
                        "not supported"
                    )
                g.copy_(polar_factor(g, method=group["egd_method"], ns_steps=group["egd_ns_steps"]))
