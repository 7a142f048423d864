"""The one screen for inf/NaN gradients, shared by every wrapper's ``nonfinite`` option.

``nonfinite="error"`` raises :class:`NonFiniteGradientError` (naming the first offending
parameter) before anything changes; ``nonfinite="skip"`` skips the whole step, so every state
is as if ``step()`` had not been called. Both decide on the host (one sync); Grokfast alone
has a device-side path for fused inner optimizers (see its docstring).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._checks import check_choice
from ._compat import extremes
from ._distributed import dtensor_type, local_shards, shard_groups

__all__ = ["NonFiniteGradientError"]

NONFINITE_MODES = ("error", "skip")


class NonFiniteGradientError(FloatingPointError):
    """A gradient holds inf or NaN; the step was refused before any state changed.

    ``index`` is the parameter's index in the optimizer's ``state_dict`` numbering (its
    position over all param groups, in order) and ``shape`` its shape; both are None when
    the offending parameter could not be named.
    """

    def __init__(self, message: str, *, index: int | None = None,
                 shape: tuple[int, ...] | None = None) -> None:
        super().__init__(message)
        self.index = index
        self.shape = shape


def check_mode(nonfinite: Any) -> None:
    check_choice("nonfinite", nonfinite, NONFINITE_MODES)


def all_finite(grads: Sequence[Tensor]) -> Tensor:
    """One 0-d bool tensor (on the first grad's device): every entry of every grad is finite.

    The screen is torch's own multi-tensor inf/NaN check, the one GradScaler runs
    (``torch._amp_foreach_non_finite_check_and_unscale_`` with a scale of exactly 1, which
    leaves every value as it is): one pass over the bytes, exact (a huge but finite value
    passes), and its verdict stays on the device, so deciding on the host costs one sync
    and deciding on the device none.

    For DTensor gradients the check runs on the local shards and is then all-reduced over
    the mesh dimensions they are split along, so every rank takes the same decision (ranks
    that disagreed would fall out of step and deadlock in the next collective); that
    reduction costs a host sync.
    """
    device = grads[0].device
    by_group: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
    for g in local_shards(grads):
        by_group[(g.device, g.dtype)].append(g)
    found = None
    for tensors in by_group.values():
        flag = nonfinite_flag(tensors)
        found = flag if found is None else found + flag.to(device)
    finite = (found == 0).reshape(()) if found is not None else torch.ones(
        (), dtype=torch.bool, device=device)
    return _agree(finite.to(device), grads)


def nonfinite_flag(tensors: list[Tensor]) -> Tensor:
    """A 1-element float tensor on the tensors' device: nonzero iff some entry of some
    tensor is inf or NaN. The tensors are plain (local) tensors of one device and dtype;
    :func:`all_finite` is the general screen."""
    device = tensors[0].device
    if torch.compiler.is_compiling():
        # Traced, a reduction per tensor, which the compiler fuses: torch 2.5's Inductor
        # could not take the multi-tensor check's list argument (AttributeError in its
        # fake-tensor pass).
        bad = [(~torch.isfinite(t)).any() for t in tensors]
        return torch.stack(bad).any().to(torch.float32).reshape(1)
    # float32 whatever the default dtype: the check takes nothing else
    flag = torch.zeros(1, dtype=torch.float32, device=device)
    torch._amp_foreach_non_finite_check_and_unscale_(tensors, flag, _one(device))
    return flag


_ONES: dict[torch.device, Tensor] = {}


def _one(device: torch.device) -> Tensor:
    """A cached 1-element 1.0 on ``device`` (the check's scale)."""
    one = _ONES.get(device)
    if one is None:
        one = _ONES[device] = torch.ones(1, dtype=torch.float32, device=device)
    return one


def _local_flags(local: Sequence[Tensor], device: torch.device) -> Tensor:
    """Per tensor: every entry finite (exact; empty tensors count as finite)."""
    return torch.stack([
        extremes(g).isfinite().all().to(device) if g.numel()
        else torch.ones((), dtype=torch.bool, device=device)
        for g in local
    ])


def _agree(flags: Tensor, grads: Sequence[Tensor]) -> Tensor:
    """``flags`` AND-ed over the ranks that hold other shards of the DTensor ``grads``."""
    dtensor = dtensor_type()
    if dtensor is None or not any(isinstance(g, dtensor) for g in grads):
        return flags
    groups = {group for g in grads for group in shard_groups(g)}
    if not groups:
        return flags
    out = flags.to(torch.int32)
    for group in groups:
        dist.all_reduce(out, op=dist.ReduceOp.MIN, group=group)
    return out.bool()


def screen_step(optimizer: Any, mode: str, grads: Sequence[Tensor] | None = None) -> bool:
    """Decide on the host whether ``optimizer``'s step may go on: True if every gradient is
    finite.

    ``grads``: the gradients of its parameters, in order, when the caller has them at hand.
    A non-finite gradient returns False with ``mode="skip"`` and raises
    :class:`NonFiniteGradientError` naming the first offending parameter (numbered only
    then) with ``mode="error"``; nothing is changed either way. Under DTensor every rank
    takes part in the same collectives, so all ranks decide (and name) alike.
    """
    if grads is None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
    if not grads or bool(all_finite(grads)):
        return True
    if mode == "skip":
        return False
    params = (p for group in optimizer.param_groups for p in group["params"])
    indexed = [(i, p) for i, p in enumerate(params) if p.grad is not None]
    grads = [p.grad for _, p in indexed]
    flags = _agree(_local_flags(local_shards(grads), grads[0].device), grads).tolist()
    bad = next((k for k, ok in enumerate(flags) if not ok), None)
    if bad is None:  # not reached: the screen and the per-tensor flags agree
        where, index, shape = "a gradient", None, None
    else:
        index, shape = indexed[bad][0], tuple(indexed[bad][1].shape)
        where = f"the gradient of parameter {index} (shape {shape})"
    raise NonFiniteGradientError(
        f"{where} holds inf or NaN; {type(optimizer).__name__}.step() was refused and no "
        f"state changed (nonfinite='skip' skips such steps instead)",
        index=index, shape=shape,
    )
