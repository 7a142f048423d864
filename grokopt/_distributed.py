"""Private helpers for sharded (DTensor) and data-parallel (DDP) training, shared by every
module that needs them. Nothing here is public API.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "all_reduce_mean", "dtensor_type", "is_dtensor", "local_shard", "local_shards", "shard_groups", "unwrap_ddp",
    "world_size",
]


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a :class:`torch.distributed.tensor.DTensor` (see :func:`dtensor_type`)."""
    dtensor = dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def local_shard(t: Tensor) -> Tensor:
    """A DTensor's local shard (a view: in-place changes reach the DTensor); else ``t``."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


def dtensor_type() -> type[Any] | None:
    """The DTensor class if ``torch.distributed.tensor`` is imported, else None.

    No DTensor can exist before that module is imported (by FSDP2, or by the user), so it
    is looked up, never imported, here: importing it costs about 0.4 s, which
    ``import grokopt`` must not pay. For hot loops: one lookup, then a plain
    ``isinstance`` per tensor.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def local_shards(tensors: Sequence[Tensor]) -> list[Tensor]:
    """:func:`local_shard` of each tensor, with one lookup for the whole list."""
    dtensor = dtensor_type()
    if dtensor is None:
        return list(tensors)
    return [t.to_local() if isinstance(t, dtensor) else t for t in tensors]


def shard_groups(g: Tensor) -> tuple[Any, ...]:
    """Process groups of the mesh dimensions along which a DTensor is split.

    Reducing a shard-local sum (or max) over each of them in turn gives the sum (max) over
    the whole tensor; replicated dimensions hold copies and need no reduction.
    """
    if not is_dtensor(g):
        return ()
    groups = []
    for dim, placement in enumerate(g.placements):  # type: ignore[attr-defined]
        if placement.is_partial():
            raise ValueError(
                f"a gradient has a Partial placement ({g.placements}); reduce it first "  # type: ignore[attr-defined]
                f"(FSDP2 does this in backward), the amplifier needs its final values"
            )
        if placement.is_shard():
            groups.append(g.device_mesh.get_group(dim))  # type: ignore[attr-defined]
    return tuple(groups)


def world_size() -> int:
    """The default process group's size; 1 when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_mean(tensors: Iterable[Tensor]) -> None:
    """Average each tensor in place over the default process group (no-op on one process)."""
    world = world_size()
    if world == 1:
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(world)


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper; other modules as they are.

    A DDP wrapper's forward expects a backward() that syncs gradients, which
    ``torch.autograd.grad`` never triggers, so evaluations outside training use the plain
    module.
    """
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model
