"""⊥Grad: step on the part of the gradient orthogonal to the weights (Prieto et al. 2025).

Per parameter tensor, with ``w`` and ``g`` flattened::

    g_perp = g - (w.g) / (w.w + eps) * w
    g_out  = g_perp * ||g|| / (||g_perp|| + eps)

The component of ``g`` along ``w`` only grows or shrinks the weight norm ("naive loss
minimisation"); removing it lets a network grok without weight decay. The rescaling keeps
the gradient's length, so the inner optimizer's learning rate keeps its meaning.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._checks import check_float
from ._distributed import is_dtensor
from .wrapper import GradientTransform

__all__ = ["OrthoGrad", "orthogonalize_"]


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    # A dot product of a bf16 tensor in bf16 loses the small projection entirely.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _reference(w: Tensor, g: Tensor, eps: float) -> None:
    acc = _accumulate_dtype(g.dtype)
    wf, gf = w.reshape(-1).to(acc), g.reshape(-1).to(acc)
    coef = torch.dot(wf, gf) / (torch.dot(wf, wf) + eps)
    perp = gf - coef * wf
    out = perp * (torch.linalg.vector_norm(gf) / (torch.linalg.vector_norm(perp) + eps))
    g.copy_(out.view_as(g))


def _foreach(ws: list[Tensor], gs: list[Tensor], eps: float) -> None:
    """All tensors of one (device, dtype) at once: a handful of multi-tensor kernels plus
    one dot product per tensor, and one gradient-sized temporary."""
    acc = _accumulate_dtype(gs[0].dtype)
    wf = [w.reshape(-1).to(acc) for w in ws]
    gf = [g.reshape(-1).to(acc) for g in gs]
    dots = torch.stack([torch.dot(w, g) for w, g in zip(wf, gf)])
    w_norms = torch.stack(torch._foreach_norm(wf))
    g_norms = torch.stack(torch._foreach_norm(gf))
    coefs = dots / (w_norms * w_norms + eps)
    perp = torch._foreach_mul(wf, list(coefs.neg().unbind()))
    torch._foreach_add_(perp, gf)
    scales = g_norms / (torch.stack(torch._foreach_norm(perp)) + eps)
    torch._foreach_mul_(perp, list(scales.unbind()))
    torch._foreach_copy_(gs, [p.view_as(g) for p, g in zip(perp, gs)])


def orthogonalize_(
    params: list[Tensor], grads: list[Tensor], *, eps: float = 1e-30, foreach: bool | None = None
) -> None:
    """Replace each ``grads[i]`` in place by its ⊥Grad transform against ``params[i]``.

    Args:
        params: the weights ``w`` (read only).
        grads: their gradients, changed in place (same shapes as ``params``).
        eps: added to ``w.w`` and to ``||g_perp||``; keeps an all-zero weight or gradient
            from dividing by zero (default 1e-30, the paper's).
        foreach: multi-tensor kernels (default) or the plain per-tensor reference.

    Example:
        >>> w, g = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
        >>> orthogonalize_([w], [g])
        >>> g  # the part along w removed, the length sqrt(2) kept
        tensor([0.0000, 1.4142])
    """
    _check_eps(eps)
    if len(params) != len(grads):
        raise ValueError(f"params has {len(params)} tensors, grads has {len(grads)}")
    for i, (w, g) in enumerate(zip(params, grads)):
        if w.shape != g.shape:
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)}, params[{i}] {tuple(w.shape)}")
        if is_dtensor(w) or is_dtensor(g):
            # A shard-local dot product and norms would give a wrong, rank-dependent result.
            raise NotImplementedError(
                f"OrthoGrad needs whole tensors: params[{i}] or grads[{i}] is sharded "
                f"(DTensor, e.g. FSDP2), which is not supported"
            )
    if foreach is False:
        for w, g in zip(params, grads):
            if g.numel():
                _reference(w, g, eps)
        return
    buckets: dict[Any, tuple[list[Tensor], list[Tensor]]] = defaultdict(lambda: ([], []))
    for w, g in zip(params, grads):
        if g.numel():
            bucket = buckets[(g.device, g.dtype)]
            bucket[0].append(w)
            bucket[1].append(g)
    for ws, gs in buckets.values():
        _foreach(ws, gs, eps)


def _check_eps(eps: Any) -> None:
    check_float("eps", eps, minimum=0)


class OrthoGrad(GradientTransform):
    """Wrap any optimizer so that it steps on ⊥Grad gradients (orthogonal to the weights).

    Every parameter tensor's gradient loses its component along the tensor's own weights
    and is rescaled to its original length; the inner optimizer then steps as usual. Meant
    for training without weight decay (the paper's setting), often with
    :func:`stablemax_cross_entropy`. The formula, defaults and references: docs/methods.md.

    Sharded (FSDP2) parameters are not supported: the dot product and norms would span ranks.

    Args:
        optimizer: the optimizer to wrap (any ``torch.optim.Optimizer``).
        eps: guard added to ``w.w`` and ``||g_perp||`` (default 1e-30).
        foreach: multi-tensor kernels (default) or the per-tensor reference loop.
        restore_grad: ``True`` (default): after ``step()`` each ``p.grad`` is the gradient
            backward produced, as with any torch optimizer (the transform works on a
            scratch copy: one extra gradient-sized buffer during the step). ``False``: the
            transformed gradient is written into ``p.grad`` in place, with no extra buffer.

    Example:
        >>> import torch
        >>> from grokopt import OrthoGrad
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = OrthoGrad(torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0))
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()
        >>> opt.step(); opt.zero_grad()
    """

    _prefix = "orthograd_"

    def __init__(
        self, optimizer: Optimizer, *, eps: float = 1e-30, foreach: bool | None = None,
        restore_grad: bool = True,
    ) -> None:
        if foreach is not None and not isinstance(foreach, bool):
            raise TypeError(f"foreach must be None or a bool, got {foreach!r}")
        self.foreach = foreach
        super().__init__(optimizer, dict(eps=eps), restore_grad=restore_grad)

    def _validate_group(self, options: dict[str, Any]) -> None:
        if "orthograd_eps" in options:
            _check_eps(options["orthograd_eps"])

    def _transform_gradients(self) -> None:
        for group in self.param_groups:
            pairs = list(self._grads(group))
            if pairs:
                orthogonalize_([p.detach() for p, _ in pairs], [g for _, g in pairs],
                               eps=group["orthograd_eps"], foreach=self.foreach)
