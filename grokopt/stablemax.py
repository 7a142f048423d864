"""StableMax: a softmax replacement that cannot collapse (Prieto et al. 2025).

``s(x) = x + 1`` for ``x >= 0`` and ``1 / (1 - x)`` for ``x < 0``; the probabilities are
``s(x_i) / sum_j s(x_j)`` and the loss ``-log p_y``. Softmax's ``exp`` lets the correct logit
dominate so far that the others round away (floating-point absorption, "Softmax Collapse"),
after which the gradient is zero and grokking stalls; ``s`` grows only linearly.

Computed here in log space, ``log s(x) = log1p(x)`` or ``-log1p(-x)``, with ``logsumexp``
over classes, so logits of any size and sign give finite values and gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._checks import check_choice

__all__ = ["StableMaxCrossEntropyLoss", "log_stablemax", "stablemax", "stablemax_cross_entropy"]

_REDUCTIONS = ("mean", "sum", "none")


def _log_s(x: Tensor) -> Tensor:
    # Each branch sees its own side of 0 and a harmless 0 elsewhere, so neither is NaN where
    # it is not selected (a NaN there would leak into the gradient through torch.where).
    # Selecting with where, not clamp: the gradient of clamp at its bound is a torch detail
    # (1 in torch 2.13, 0 in 2.14), and x = 0 is exactly such a point.
    nonneg = x >= 0
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.where(nonneg, torch.log1p(torch.where(nonneg, x, zero)),
                       -torch.log1p(torch.where(nonneg, zero, -x)))


def log_stablemax(logits: Tensor, dim: int = -1) -> Tensor:
    """``log`` of :func:`stablemax`, computed without forming the probabilities.

    Example:
        >>> log_stablemax(torch.tensor([0.0, 1.0])).exp()
        tensor([0.3333, 0.6667])
    """
    log_s = _log_s(logits)
    return log_s - torch.logsumexp(log_s, dim=dim, keepdim=True)


def stablemax(logits: Tensor, dim: int = -1) -> Tensor:
    """StableMax probabilities ``s(x_i) / sum_j s(x_j)`` along ``dim``.

    Example:
        >>> stablemax(torch.tensor([-1.0, 0.0, 1.0]))
        tensor([0.1429, 0.2857, 0.5714])
    """
    return log_stablemax(logits, dim).exp()


def stablemax_cross_entropy(logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy with StableMax in place of softmax: ``-log p_target`` per sample.

    Args:
        logits: ``(batch, classes)`` scores (or ``(classes,)`` for one sample).
        target: class indices, ``(batch,)`` (or a 0-d tensor).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.

    Example:
        >>> logits = torch.tensor([[0.0, 1.0], [1e6, -1e6]])  # finite where softmax's is inf
        >>> stablemax_cross_entropy(logits, torch.tensor([1, 1]), reduction="none")
        tensor([ 0.4055, 27.6310])
    """
    check_choice("reduction", reduction, _REDUCTIONS)
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.ndim not in (1, 2):
        raise ValueError(
            f"logits must be a float tensor of shape (batch, classes) or (classes,), got "
            f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}"
        )
    if not isinstance(target, Tensor) or target.dtype not in (torch.int64, torch.int32, torch.uint8):
        raise ValueError(f"target must be an integer tensor of class indices, got {target!r}")
    batched = logits.ndim == 2
    if not batched:
        logits, target = logits[None], target.reshape(1)
    if target.shape != logits.shape[:1]:
        raise ValueError(f"target has shape {tuple(target.shape)}, expected ({logits.shape[0]},)")
    loss = -log_stablemax(logits, dim=1).gather(1, target.long()[:, None]).squeeze(1)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss if batched else loss[0]


class StableMaxCrossEntropyLoss(nn.Module):
    """:func:`stablemax_cross_entropy` as a module, like ``nn.CrossEntropyLoss``.

    Example:
        >>> loss = StableMaxCrossEntropyLoss()
        >>> round(loss(torch.tensor([[0.0, 1.0]]), torch.tensor([1])).item(), 4)
        0.4055
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        check_choice("reduction", reduction, _REDUCTIONS)
        self.reduction = reduction

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return stablemax_cross_entropy(logits, target, self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"
