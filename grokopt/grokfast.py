"""Grokfast: amplify the slow (low-frequency) part of the gradient (Lee et al. 2024).

EMA filter (per tensor): ``mu <- alpha*mu + (1-alpha)*g`` (``mu = g`` on first sight), then
``g <- g + lamb*mu``. MA filter: keep the last ``window`` raw gradients and add ``lamb`` times
their mean (or sum); with ``warmup`` nothing changes until the window is full.

With ``after_step=N`` a tensor's filter starts at its (N+1)-th gradient (the first N pass
unchanged). The filter runs inside ``step()`` so that, under GradScaler, it sees unscaled
gradients, is skipped together with the step on inf/NaN, and is saved with the optimizer's
state.
"""

from __future__ import annotations

import contextlib
import itertools
import operator
import os
import sys
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import FrameType
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._checks import check_bool, check_choice, check_float, check_int
from ._compat import Tensors
from ._nonfinite import NonFiniteGradientError, all_finite, check_mode, nonfinite_flag, screen_step
from ._distributed import dtensor_type, is_dtensor, local_shard, local_shards
from .wrapper import KEEP_SCRATCH_BYTES, SKIP_STEP, GradientTransform, TransformResult

__all__ = ["Grokfast", "NonFiniteGradientError", "grokfast_"]

_FILTERS = ("ema", "ma")
_REDUCTIONS = ("mean", "sum")
# The state entry whose presence means "this tensor's filter has started".
_STARTED = {"ema": "ema", "ma": "ma_buffer"}
_FILTER_KEYS = {"ema": ("ema",), "ma": ("ma_buffer", "ma_sum", "ma_count")}


class _GroupPlan(NamedTuple):
    """One param group's part of the steady plan: indices into the plan's gradients."""

    group: dict[str, Any]
    fresh: list[int]  # new output tensors each step
    kept: list[int]  # output scratch kept between steps (large gradients)
    flat: list[int]  # filtered in the flat buffers (small contiguous gradients)
    rest: list[int]  # fresh + kept: the per-tensor lerp
    pieces: tuple[Tensor, Tensor, list[Tensor]] | None  # its slice of the flat buffers


class _SteadyPlan(NamedTuple):
    """What :meth:`Grokfast._steady_step` needs, planned once (see _plan_steady_step)."""

    states: list[dict[str, Any]]  # per gradient, in the step's order
    params: list[Tensor]
    counts: list[int]  # gradients per param group
    param_groups: list[dict[str, Any]]  # the group dicts as planned
    groups: list[_GroupPlan]  # the groups with gradients
    kind: tuple[torch.device, torch.dtype]
    kept: dict[int, Tensor]  # the kept scratch, filled as steps go
    flat: list[int]
    others: list[int]  # every index not in flat
    summed: list[int]  # screened by their sums (with fused: the kept ones)
    checked: list[int]  # screened by torch's multi-tensor check
    buffers: tuple[Tensor, Tensor, list[Tensor]] | None  # flat EMA, flat output, its views
    places: list[int]  # where the flat EMAs were laid out (data pointers)


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    # Accumulating a low-pass filter in bf16/fp16 loses the slow signal to rounding.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_options(
    *, alpha: Any, lamb: Any, filter: Any, window: Any, reduction: Any, warmup: Any,
    after_step: Any = 0, normalize_lr: Any = False,
) -> None:
    check_choice("filter", filter, _FILTERS)
    check_choice("reduction", reduction, _REDUCTIONS)
    # A 0-d tensor is not range-checked here: that would force a host sync every step.
    check_float("alpha", alpha, minimum=0, maximum=1, max_open=True, allow_tensor=True)
    check_float("lamb", lamb, minimum=0, allow_tensor=True)
    check_int("window", window, minimum=1)
    check_bool("warmup", warmup)
    check_int("after_step", after_step, minimum=0)
    check_bool("normalize_lr", normalize_lr)


def _bucket(
    grads: Sequence[Tensor], states: Sequence[dict[str, Any]]
) -> dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[dict[str, Any]]]]:
    buckets: dict[Any, tuple[list[Tensor], list[dict[str, Any]]]] = defaultdict(lambda: ([], []))
    for g, s in zip(grads, states):
        bucket = buckets[(g.device, g.dtype)]
        bucket[0].append(g)
        bucket[1].append(s)
    return buckets


def grokfast_(
    grads: Sequence[Tensor],
    states: Sequence[dict[str, Any]],
    *,
    filter: str = "ema",
    alpha: float | Tensor = 0.98,
    lamb: float | Tensor = 2.0,
    window: int = 100,
    reduction: str = "mean",
    warmup: bool = True,
    after_step: int = 0,
    foreach: bool | None = None,
    finite: Tensor | None = None,
) -> None:
    """Apply the Grokfast filter to ``grads`` in place; the filter state is explicit.

    The functional form behind :class:`Grokfast`, for users who filter gradients by hand.

    Args:
        grads: gradient tensors, changed in place.
        states: one dict per gradient (start with empty dicts and pass the same dicts back
            every step); the EMA keeps ``"ema"``, the MA ``"ma_buffer"``, ``"ma_sum"`` and
            ``"ma_count"``; with ``after_step`` a state also keeps ``"step"`` (gradients
            counted while waiting) and ``"started"`` (0 or 1), and holds the filter's
            entries (zeros) from its first gradient on, so its keys never change. State
            of bf16/fp16 gradients is kept in fp32.
        filter: ``"ema"`` or ``"ma"``.
        alpha: EMA momentum in [0, 1).
        lamb: amplification factor >= 0. A float 0 leaves ``grads`` exactly as they are
            (the filter state still updates); a 0-d tensor is always applied, so at 0 it
            leaves the values but may turn a -0.0 into +0.0.
        window: MA window length >= 1.
        reduction: MA reduction, ``"mean"`` or ``"sum"``.
        warmup: MA only: leave gradients unchanged until the window is full.
        after_step: leave a tensor's first ``after_step`` gradients unchanged; its filter
            starts (from a fresh state) at the next one. Default 0.
        foreach: use the multi-tensor kernels (default) or the plain per-tensor reference.
        finite: optional 0-d bool tensor saying whether this call's gradients are all
            finite. Where it is False no state changes, exactly as if the call had not been
            made; the gradients are then left with unspecified (non-finite) values, so skip
            the optimizer step too. It is applied on the device (no host sync) when every
            state already holds a started EMA; otherwise (a first call, a filter waiting
            for ``after_step``, the MA filter) it is read on the host (one sync).

    Example:
        >>> import torch
        >>> g = [torch.ones(3)]
        >>> state = [{}]
        >>> grokfast_(g, state, alpha=0.98, lamb=2.0)
        >>> g[0]
        tensor([3., 3., 3.])
    """
    _check_options(alpha=alpha, lamb=lamb, filter=filter, window=window,
                   reduction=reduction, warmup=warmup, after_step=after_step)
    # Checked here so that a bad argument fails with its name, not deep inside a kernel
    # after some states were already updated.
    if foreach is not None and not isinstance(foreach, bool):
        raise TypeError(f"foreach must be None or a bool, got {type(foreach).__name__}: {foreach!r}")
    if finite is not None and not (
        isinstance(finite, Tensor) and finite.dtype == torch.bool and finite.ndim == 0
    ):
        raise TypeError(f"finite must be None or a 0-d bool tensor, got {finite!r}")
    for name, value in (("grads", grads), ("states", states)):
        if isinstance(value, (Tensor, Mapping, str, bytes)) or not isinstance(value, Iterable):
            raise TypeError(
                f"{name} must be a sequence with one entry per gradient tensor, got "
                f"{type(value).__name__}"
            )
    grads, states = list(grads), list(states)
    for i, (g, s) in enumerate(zip(grads, states)):
        if not isinstance(g, Tensor) or not g.is_floating_point():
            got = f"{g.dtype} tensor" if isinstance(g, Tensor) else type(g).__name__
            raise TypeError(f"grads[{i}] must be a floating-point tensor, got {got}")
        if not isinstance(s, dict):
            raise TypeError(f"states[{i}] must be a dict (start with {{}}), got {type(s).__name__}")
    if len(grads) != len(states):
        raise ValueError(f"grads and states must have equal lengths, got {len(grads)} and {len(states)}")
    _filter(grads, states, filter=filter, alpha=alpha, lamb=lamb, window=window,
            reduction=reduction, warmup=warmup, after_step=after_step, foreach=foreach,
            finite=finite)


def _filter(
    grads: list[Tensor], states: list[dict[str, Any]], *, filter: str, alpha: Any, lamb: Any,
    window: int, reduction: str, warmup: bool, after_step: int, foreach: bool | None,
    finite: Tensor | None, buckets: list[list[int]] | None = None,
) -> None:
    """:func:`grokfast_` on checked arguments (the wrapper checks its options when they
    change, not at every step). ``buckets``: indices of ``grads`` grouped by device and
    dtype, when the caller knows them."""
    if not grads:
        return
    if finite is not None and (filter != "ema" or any(_waiting(s, filter) for s in states)):
        # Creating a state (or counting towards after_step) cannot be undone on the device.
        if not bool(finite):
            return
        finite = None
    if after_step or any("step" in s for s in states):
        n = len(grads)
        grads, states = _past_after_step(grads, states, filter, after_step, window)
        if not grads:
            return
        if len(grads) != n:
            buckets = None
    foreach = True if foreach is None else foreach
    if buckets is None:
        split = list(_bucket(grads, states).values())
    elif len(buckets) == 1:
        split = [(grads, states)]
    else:
        split = [([grads[i] for i in b], [states[i] for i in b]) for b in buckets]
    if filter == "ema":
        kernel = _ema_foreach if foreach else _ema_reference
        for gs, ss in split:
            kernel(gs, ss, alpha, lamb, finite)
    else:
        kernel_ma = _ma_foreach if foreach else _ma_reference
        for gs, ss in split:
            kernel_ma(gs, ss, window, lamb, reduction, warmup)


def _past_after_step(
    grads: list[Tensor], states: list[dict[str, Any]], filter: str, after_step: int, window: int
) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """The (grad, state) pairs whose filter runs this call; the others count one more step.

    A filter that has started keeps running (raising ``after_step`` later does not stop
    it); one that has not counts its gradients in ``state["step"]``. From its first gradient
    on, such a state holds the same keys in every phase: ``"step"``, ``"started"`` (0 or 1)
    and the filter's entries (zeros until the start, then initialised from the gradient as
    usual). Checkpoint layouts rebuilt from the live optimizer's key names (DCP's flattened
    one) then carry every entry whichever phase the saved and the live optimizer are in.
    """
    keep_g, keep_s = [], []
    for g, s in zip(grads, states):
        if not _waiting(s, filter):
            keep_g.append(g)
            keep_s.append(s)
            continue
        count = s.get("step", 0) + 1
        s["step"] = count
        if count <= after_step:
            if "started" not in s:
                if filter == "ema":
                    s["ema"] = torch.zeros_like(g, dtype=_state_dtype(g.dtype))
                else:
                    _ma_prepare(g, s, window)
                s["started"] = 0
            continue
        for key in _FILTER_KEYS[filter]:  # the kernel initialises them from this gradient
            s.pop(key, None)
        s["started"] = 1
        keep_g.append(g)
        keep_s.append(s)
    return keep_g, keep_s


def _waiting(state: Mapping[str, Any], filter: str) -> bool:
    """Whether a tensor's filter waits for ``after_step`` (a state saved before the
    ``"started"`` flag existed waits while it has a ``"step"`` count and no filter entries)."""
    if "started" in state:
        return not state["started"]
    return _STARTED[filter] not in state


# ---------------------------------------------------------------------------- EMA


def _ema_init(g: Tensor, state: dict[str, Any]) -> None:
    # mu starts as a copy of g (never an alias of p.grad), so the first lerp returns g.
    if "ema" not in state:
        state["ema"] = g.detach().to(_state_dtype(g.dtype), copy=True)


def _maybe_nonfinite(summed: list[Tensor], checked: list[Tensor]) -> bool:
    """The steady step's screen, decided on the host (one sync): True if some entry of
    ``summed`` or of ``checked`` is inf or NaN.

    A tensor's sum is inf or NaN if one of its entries is (and also if finite entries
    overflow it: a false alarm that the general path's exact screen then clears). It reads
    each entry once, where torch's multi-tensor check (taken by ``checked``: plain tensors
    of one device and dtype) reads and writes each one, but it costs a call per tensor: it
    screens the flat buffer, and with ``fused=True`` the large gradients too.
    """
    bad = None
    if summed:
        sums = [t.sum() for t in summed]
        bad = (sums[0] if len(sums) == 1 else torch.stack(sums).sum()).mul_(0).reshape(1)
    if checked:
        flag = nonfinite_flag(checked)
        bad = flag if bad is None else bad + flag
    return bad is not None and bad.item() != 0  # NaN != 0 too


def _unshare(states: Iterable[dict[str, Any]], buffer: Tensor) -> None:
    """Give each state whose EMA lies in ``buffer`` a storage of its own (the same tensor
    object where it can, as :meth:`Grokfast._flatten` leaves it)."""
    ptr = buffer.untyped_storage().data_ptr()
    for st in states:
        mu = st.get("ema")
        if mu is not None and mu.untyped_storage().data_ptr() == ptr:
            if mu._base is None:
                mu.set_(mu.clone())
            else:
                st["ema"] = mu.clone()


def _update_where(finite: Tensor, dst: Tensor, new: Tensor) -> None:
    """``dst <- new`` where ``finite`` (a 0-d bool tensor), on the device, in place.

    Done on local shards: ``finite`` is a plain tensor (already agreed across ranks), and
    DTensor has no rule for mixing it with sharded tensors (nor for _foreach_copy_).
    """
    local_shard(dst).copy_(torch.where(finite, local_shard(new), local_shard(dst)))


def _ema_reference(
    grads: list[Tensor], states: list[dict[str, Any]], alpha: Any, lamb: Any, finite: Tensor | None
) -> None:
    for g, state in zip(grads, states):
        _ema_init(g, state)
        mu = state["ema"]
        g32 = g.to(mu.dtype)
        new = mu.lerp(g32, 1 - alpha)
        if finite is None:
            mu.copy_(new)
        else:
            _update_where(finite, mu, new)
        if _amplifies(lamb):
            g.copy_(g32 + lamb * mu)


def _ema_foreach(
    grads: list[Tensor], states: list[dict[str, Any]], alpha: Any, lamb: Any, finite: Tensor | None,
    out_of_place: bool = False,
) -> Tensors | None:
    """The EMA filter over one device/dtype bucket. With ``out_of_place`` the gradients are
    read only and the filtered ones are returned (None where lamb is 0: unchanged), so that
    a caller who must give the user's gradients back needs no copy of them."""
    for g, state in zip(grads, states):
        _ema_init(g, state)
    # Elementwise: run on the local shards of DTensors (FSDP2), as the MA path does; torch
    # before 2.11 has no DTensor rule for _foreach_lerp_.
    grads = local_shards(grads)
    mus = local_shards([s["ema"] for s in states])
    if finite is None and out_of_place:
        return _lerp_and_amplify(grads, mus, alpha, lamb)
    low_precision = mus[0].dtype != grads[0].dtype
    src = [g.to(mus[0].dtype) for g in grads] if low_precision else grads
    weight = _lerp_weight(alpha, len(mus))
    if finite is None:
        torch._foreach_lerp_(mus, src, weight)
    else:
        new = torch._foreach_lerp(mus, src, weight)
        if is_dtensor(mus[0]):
            for m, n in zip(mus, new):
                _update_where(finite, m, n)
        else:
            torch._foreach_copy_(mus, [torch.where(finite, n, m) for n, m in zip(new, mus)])
    if not _amplifies(lamb):
        return None
    if out_of_place:  # plain tensors of the state's dtype only (see Grokfast._filter)
        return _amplified(grads, mus, lamb)
    if low_precision:
        torch._foreach_copy_(grads, _add_scaled(src, mus, lamb))
    elif isinstance(lamb, Tensor):
        torch._foreach_add_(grads, torch._foreach_mul(mus, lamb))
    else:
        torch._foreach_add_(grads, mus, alpha=lamb)
    return None


def _lerp_weight(alpha: Any, n: int) -> Any:
    """The lerp weight ``1 - alpha``: a float, or a list of ``n`` 0-d tensors."""
    weight = 1 - alpha
    return [weight] * n if isinstance(weight, Tensor) else weight


def _amplified(grads: list[Tensor], mus: list[Tensor], lamb: Any) -> Tensors:
    """``g + lamb * mu`` as new tensors (plain tensors of one dtype)."""
    if isinstance(lamb, Tensor):
        return torch._foreach_add(grads, torch._foreach_mul(mus, lamb))
    return torch._foreach_add(grads, mus, alpha=lamb)


def _amplify_into(g: Tensor, mu: Tensor, lamb: Any, out: Tensor) -> None:
    """``out <- g + lamb * mu``, rounded as :func:`_amplified` rounds it."""
    if isinstance(lamb, Tensor):
        torch.mul(mu, lamb, out=out)
        out.add_(g)
    else:
        torch.add(g, mu, alpha=lamb, out=out)


def _lerp_amplify_into(g: Tensor, mu: Tensor, out: Tensor, weight: Tensor, lamb: Tensor) -> None:
    """``mu <- lerp(mu, g, weight)`` and ``out <- g + lamb * mu``: the EMA step that
    ``fused=True`` compiles into one pass (read g and mu, write mu and out). Flat
    contiguous tensors; ``weight`` and ``lamb`` are 0-d tensors, so that new values do not
    recompile."""
    mu.lerp_(g, weight)
    out.copy_(g + mu * lamb)


def _lerp_amplify_flat(mu: Tensor, out: Tensor, weight: Tensor, lamb: Tensor) -> None:
    """As :func:`_lerp_amplify_into` where ``out`` holds the gradient (the flat buffer)."""
    mu.lerp_(out, weight)
    out.copy_(out + mu * lamb)


_KERNELS = (_lerp_amplify_into, _lerp_amplify_flat)
_COMPILED: dict[Any, Any] = {}
_READY: set[tuple[torch.device, torch.dtype]] = set()  # compiled and run once
_COMPILE_FAILED: list[str] = []  # why torch.compile failed, once it has: eager from then on


def _subnormals_kept() -> bool:
    """Whether this thread's floating point still represents subnormal numbers (no
    flush-to-zero): half the smallest normal double is not zero."""
    return sys.float_info.min / 2 > 0


def _keep_subnormals(kept_before: bool) -> None:
    """Undo a flush-to-zero that loading a compiled kernel turned on. Inductor's CPU
    kernels in torch 2.5 were built with -ffast-math, and loading one switches the whole
    thread to flushing subnormal numbers to zero (measured on 2.5.1; not on 2.13): the
    fused option must not change how every later computation rounds."""
    if kept_before and not _subnormals_kept():
        torch.set_flush_denormal(False)


def _fused_ready(kind: tuple[torch.device, torch.dtype]) -> bool:
    """Whether the fused kernels run compiled for gradients of ``kind`` (device, dtype):
    compiled by torch.compile (Inductor: C++ on CPU, Triton on CUDA) and run once on small
    tensors of that kind on first use. Called before a step changes anything, so that a
    failure (no C++ compiler, no Triton, a Python torch.compile does not support), and
    its one warning (which a warnings filter may turn into an error), leave every state
    as it was; the eager kernels run from then on."""
    if kind in _READY or torch.compiler.is_compiling():  # (traced: see _run_fused)
        return True
    if not _COMPILE_FAILED:
        device, dtype = kind
        kept = _subnormals_kept()
        try:
            for kernel in _KERNELS:
                compiled = _COMPILED.get(kernel)
                if compiled is None:
                    compiled = _COMPILED[kernel] = torch.compile(kernel, dynamic=True)
                x = [torch.zeros(2, device=device, dtype=dtype) for _ in range(3)]
                one = torch.ones((), device=device, dtype=dtype)
                compiled(*x[:2 if kernel is _lerp_amplify_flat else 3], one, one.clone())
            _READY.add(kind)
            return True
        except Exception as exc:  # the eager kernels still work
            _COMPILE_FAILED.append(f"{type(exc).__name__}: {exc}")
            warnings.warn(
                f"Grokfast(fused=True): torch.compile could not build the fused filter "
                f"({_COMPILE_FAILED[0][:300]}); running the eager kernels instead",
                RuntimeWarning, stacklevel=_caller_level(),
            )
        finally:
            _keep_subnormals(kept)
    return False


def _caller_level() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside grokopt and
    torch (the user's ``step()`` call), whatever decorators torch wraps around it."""
    skip = tuple(os.path.dirname(f) + os.sep for m in (sys.modules["grokopt"], torch)
                 if (f := m.__file__) is not None)
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


def _run_fused(kernel: Any, *args: Tensor) -> None:
    """Run ``kernel`` as :func:`_fused_ready` compiled it (inside a graph that
    torch.compile is tracing, it is traced with that graph instead)."""
    if torch.compiler.is_compiling():
        kernel(*args)
    else:
        kept = _subnormals_kept()
        try:
            _COMPILED[kernel](*args)  # (a new shape or layout may load another kernel)
        finally:
            _keep_subnormals(kept)


def _lerp_and_amplify(
    grads: list[Tensor], mus: list[Tensor], alpha: Any, lamb: Any
) -> Tensors | None:
    """The out-of-place EMA step on started filters of plain tensors of one dtype:
    ``mu <- lerp(mu, g, 1 - alpha)`` in place, then ``g + lamb * mu`` returned as new
    tensors (None where a float ``lamb`` is 0); ``grads`` are only read."""
    torch._foreach_lerp_(mus, grads, _lerp_weight(alpha, len(mus)))
    return _amplified(grads, mus, lamb) if _amplifies(lamb) else None


def _amplifies(lamb: Any) -> bool:
    """Whether the filter writes ``g + lamb * filtered``. A Python ``lamb`` of 0 leaves the
    gradients bit for bit (``g + 0 * mu`` would turn -0.0 into +0.0, and inf into NaN);
    a 0-d tensor is applied as it is, since reading it would cost a host sync."""
    return isinstance(lamb, Tensor) or lamb != 0


def _add_scaled(xs: list[Tensor], ys: list[Tensor], scale: Any) -> Tensors:
    """Out of place ``x + scale * y`` for a float or 0-d tensor scale."""
    if isinstance(scale, Tensor):
        return torch._foreach_add(xs, torch._foreach_mul(ys, scale))
    return torch._foreach_add(xs, ys, alpha=scale)


# ---------------------------------------------------------------------------- MA


def _ma_prepare(g: Tensor, state: dict[str, Any], window: int) -> None:
    dtype = _state_dtype(g.dtype)
    if "ma_buffer" not in state:
        local = local_shard(g)
        state["ma_buffer"] = _like_sharded(
            g, torch.zeros((window, *local.shape), dtype=dtype, device=local.device), lead=1)
        state["ma_sum"] = _like_sharded(g, torch.zeros(local.shape, dtype=dtype, device=local.device))
        state["ma_count"] = 0
    elif state["ma_buffer"].shape[0] != window:
        _resize_window(state, window)


def _like_sharded(g: Tensor, local: Tensor, lead: int = 0) -> Tensor:
    """``local`` as the shard of a tensor laid out like ``g`` (plain if ``g`` is plain).

    ``lead`` extra leading dimensions (the MA window) are unsplit: each ``Shard(d)`` of
    ``g`` becomes ``Shard(d + lead)``, so the state holds exactly the entries of the local
    gradient shard and torch.distributed.checkpoint saves and reshards it like the parameter.
    """
    if not is_dtensor(g):
        return local
    from torch.distributed.tensor import DTensor, Shard

    placements = [Shard(p.dim + lead) if p.is_shard() else p
                  for p in g.placements]  # type: ignore[attr-defined]
    shape = (*local.shape[:lead], *g.shape)
    return DTensor.from_local(local, g.device_mesh, placements, run_check=False,  # type: ignore[attr-defined]
                              shape=torch.Size(shape), stride=_contiguous_stride(shape))


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


def _resize_window(state: dict[str, Any], window: int) -> None:
    """Keep the most recent min(count, window) gradients when the window length changes."""
    old_t, count = state["ma_buffer"], state["ma_count"]
    old = local_shard(old_t)
    keep = min(count, old.shape[0], window)
    new = torch.zeros((window, *old.shape[1:]), dtype=old.dtype, device=old.device)
    for age in range(1, keep + 1):  # age 1 = newest
        new[(count - age) % window] = old[(count - age) % old.shape[0]]
    total = new.sum(0)
    if is_dtensor(old_t):
        from torch.distributed.tensor import DTensor

        shape = torch.Size((window, *old_t.shape[1:]))
        new = DTensor.from_local(new, old_t.device_mesh, old_t.placements, run_check=False,
                                 shape=shape, stride=_contiguous_stride(shape))
        local_shard(state["ma_sum"]).copy_(total)
    else:
        state["ma_sum"] = total
    state["ma_buffer"] = new
    # Past the new window the count only matters modulo window and for "is it full".
    state["ma_count"] = count


def _ma_filled(count: int, window: int) -> int:
    return min(count, window)


# The MA kernels work on local shards: every operation is elementwise or along the window
# dimension, which is never split, so a sharded (FSDP2) gradient is filtered exactly as the
# unsharded one, with no collective.


def _ma_reference(
    grads: list[Tensor], states: list[dict[str, Any]], window: int, lamb: Any,
    reduction: str, warmup: bool,
) -> None:
    for g_t, state in zip(grads, states):
        _ma_prepare(g_t, state, window)
        g, buf, total = local_shard(g_t), local_shard(state["ma_buffer"]), local_shard(state["ma_sum"])
        buf[state["ma_count"] % window].copy_(g)
        state["ma_count"] += 1
        n = _ma_filled(state["ma_count"], window)
        total.copy_(buf.sum(0))
        if (warmup and n < window) or not _amplifies(lamb):
            continue
        avg = total / n if reduction == "mean" else total
        g.copy_(g.to(avg.dtype) + avg * lamb)


def _ma_foreach(
    grads: list[Tensor], states: list[dict[str, Any]], window: int, lamb: Any,
    reduction: str, warmup: bool,
) -> None:
    for g, state in zip(grads, states):
        _ma_prepare(g, state, window)
    local = local_shards(grads)
    bufs = local_shards([s["ma_buffer"] for s in states])
    sums = local_shards([s["ma_sum"] for s in states])
    dtype = sums[0].dtype
    src = [g.to(dtype) for g in local] if dtype != local[0].dtype else local
    slots = [b[s["ma_count"] % window] for b, s in zip(bufs, states)]
    # A running sum makes the step O(P) instead of O(window * P); it is recomputed exactly
    # each time the window wraps, so rounding error cannot build up beyond one window.
    torch._foreach_sub_(sums, slots)
    torch._foreach_add_(sums, src)
    torch._foreach_copy_(slots, src)
    for b, total, s in zip(bufs, sums, states):
        s["ma_count"] += 1
        if s["ma_count"] % window == 0:
            torch.sum(b, 0, out=total)
    ready = [i for i, s in enumerate(states) if not (warmup and _ma_filled(s["ma_count"], window) < window)]
    if not ready or not _amplifies(lamb):
        return
    # Filled counts are equal within a bucket unless some parameters skipped steps.
    by_n: dict[int, list[int]] = defaultdict(list)
    for i in ready:
        by_n[_ma_filled(states[i]["ma_count"], window)].append(i)
    for n, idx in by_n.items():
        scale = lamb / n if reduction == "mean" else lamb
        out = _add_scaled([src[i] for i in idx], [sums[i] for i in idx], scale)
        torch._foreach_copy_([local[i] for i in idx], out)


# ---------------------------------------------------------------------------- wrapper


class Grokfast(GradientTransform):
    """Wrap any optimizer so that it steps on Grokfast-filtered gradients.

    Hyperparameters live in each param group under ``grokfast_``-prefixed keys
    (``grokfast_alpha``, ``grokfast_lamb``, ``grokfast_filter``, ``grokfast_window``,
    ``grokfast_reduction``, ``grokfast_warmup``, ``grokfast_after_step``,
    ``grokfast_normalize_lr``), so they can be set per group and changed during training;
    the prefix keeps them apart from the inner optimizer's own keys (RMSprop has an
    ``alpha`` of its own).

    Args:
        optimizer: the optimizer to wrap (any first-order ``torch.optim.Optimizer``;
            optimizers whose step needs a re-evaluated closure, such as LBFGS, and
            SparseAdam are refused).
        alpha: EMA momentum in [0, 1) (default 0.98).
        lamb: amplification >= 0 (default 2.0; ``lamb=0`` is exactly the bare optimizer).
        filter: ``"ema"`` (default) or ``"ma"`` (moving average over ``window`` steps).
        window: MA window length (default 100).
        reduction: MA reduction, ``"mean"`` (default) or ``"sum"``.
        warmup: MA only: no amplification until the window is full (default True).
        after_step: leave each parameter's first ``after_step`` gradients unfiltered; its
            filter starts, from a fresh state, at the next one (default 0). Counted per
            parameter, over the steps in which it had a gradient; once started, a filter
            keeps running if ``after_step`` is raised later.
        normalize_lr: step the inner optimizer with ``lr / (1 + lamb)`` (the group's own
            ``lr`` is restored after the step, so schedulers keep working on it), at every
            step, also before ``after_step``. Off by default: Adam-family optimizers are
            invariant to the gradient's scale, so the filter's gain of up to ``1 + lamb``
            does not change their step size; for SGD it does. A float ``lr`` with a tensor
            ``lamb`` costs a host sync; give both as tensors to avoid it.
        foreach: multi-tensor kernels (default) or the per-tensor reference loop.
        nonfinite: what a step with an inf/NaN gradient does.
            ``"error"`` (default): raise :class:`NonFiniteGradientError`, naming the first
            offending parameter, before anything changes (one host sync per step).
            ``"skip"``: skip the whole step: parameters, the filter state and the inner
            optimizer's state (Adam's step counts included) are exactly as if ``step()``
            had not been called. Where the inner optimizer is a fused torch optimizer
            (``fused=True``: it takes a ``found_inf`` flag) whose state and the EMA of
            every parameter with a gradient already exist, the decision stays on the
            device (no host sync; the screen is exact there too). Every other case decides
            on the host (one
            sync per step): the first step, a filter waiting for ``after_step``, the MA
            filter, and every non-fused or nested inner optimizer.
        restore_grad: ``True`` (default): after ``step()`` each ``p.grad`` is the gradient
            backward produced, as with any torch optimizer (the filter works on a
            scratch copy: one extra gradient-sized buffer during the step). On CPU, once
            the filter runs steadily, that buffer is kept from step to step: gradients of
            256 KiB and more keep their own (fresh CPU memory of that size costs a page
            fault per 4 KiB, several times the filter itself), and the smaller contiguous
            ones share one flat buffer, filtered in a few flat operations instead of a few
            per tensor, with their EMAs laid out in one flat EMA buffer (the same tensor
            objects, re-pointed; ``torch.save`` of one EMA alone writes the whole
            buffer, a whole ``state_dict`` writes it once). An inner
            optimizer or hook that keeps a reference to ``p.grad`` across steps must copy
            it. ``False``: the transformed gradient is written into ``p.grad`` in place,
            with no extra buffer. With ``lamb=0`` the gradient is left untouched in both
            modes.
        fused: ``False`` (default): the eager kernels above. ``True``: in steady steps
            (every EMA running, ``restore_grad``, the foreach path) the EMA update and the
            filtered output are one kernel per large gradient and one per param group's
            flat buffer, compiled by ``torch.compile`` (Inductor: C++ on CPU, Triton on
            CUDA); it reads g and mu and writes mu and the output (four passes over the
            bytes where the eager kernels take six), and the large gradients are screened
            for inf/NaN by their sums. On every device the small contiguous gradients then
            take the flat buffers and the large ones scratch kept between steps. The first
            steady step compiles (seconds, once per process, dtype and device); new
            alpha/lamb/lr values do not recompile. Results agree with the eager kernels to
            rounding (the compiled kernel may contract a multiply and an add). Where
            compiling fails (no C++ compiler, no Triton) it warns once and runs the eager
            kernels. Where loading a compiled CPU kernel turns on flushing subnormal
            numbers to zero (torch 2.5), the setting is put back after the kernel runs.

    A checkpoint of the bare optimizer upgrades to Grokfast: load it into the inner
    optimizer before wrapping, or into ``grokfast.optimizer`` after; groups that lack the
    ``grokfast_*`` keys get this wrapper's defaults, and the filter starts fresh.

    Example:
        >>> import torch
        >>> from grokopt import Grokfast
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = Grokfast(torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.005))
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     model(torch.randn(8, 4)).pow(2).mean().backward()
        ...     opt.step()
        >>> sorted(opt.state[model.weight])
        ['exp_avg', 'exp_avg_sq', 'grokfast_ema', 'step']
    """

    _prefix = "grokfast_"
    # The flat buffers (see _flatten): EMA buffer, output buffer (None once released), the
    # output's views, the states laid out in them. Set in the instance's __dict__ only.
    _flat_buffers: tuple[Tensor, Tensor | None, list[Tensor], list[dict[str, Any]]]

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        alpha: float = 0.98,
        lamb: float = 2.0,
        filter: str = "ema",
        window: int = 100,
        reduction: str = "mean",
        warmup: bool = True,
        after_step: int = 0,
        normalize_lr: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "error",
        restore_grad: bool = True,
        fused: bool = False,
    ) -> None:
        check_mode(nonfinite)
        check_bool("foreach", foreach, allow_none=True)
        check_bool("fused", fused)
        # 0-d tensor hyperparameters are range-checked here, once (at every step that would
        # cost a host sync); a value assigned to a group later is the caller's to keep sane.
        for name, value in (("alpha", alpha), ("lamb", lamb)):
            if isinstance(value, Tensor) and value.numel() == 1 and value.is_floating_point():
                _check_options(**{**dict(alpha=0.5, lamb=1.0, filter="ema", window=1,
                                         reduction="mean", warmup=True), name: value.item()})
        if isinstance(optimizer, Optimizer):
            _check_lr(optimizer.param_groups, normalize_lr)
        self.foreach = foreach
        self.fused = fused
        self.nonfinite = nonfinite
        super().__init__(
            optimizer,
            dict(alpha=alpha, lamb=lamb, filter=filter, window=window, reduction=reduction,
                 warmup=warmup, after_step=after_step, normalize_lr=normalize_lr),
            restore_grad=restore_grad,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("fused", False)  # pickled before the option existed

    def _validate_group(self, options: dict[str, Any]) -> None:
        merged = {**self._own_defaults(), **options} if hasattr(self, "defaults") else options
        _check_options(**{k[len(self._prefix):]: v for k, v in merged.items()})

    def _state_edited(self) -> None:
        self.__dict__.pop("_fast_plan", None)

    def _transform_gradients(self) -> TransformResult:
        _check_lr(self.param_groups)
        if self._steady_step():
            return None
        pairs, counts = self._gradients_at_step()
        groups, start = [], 0
        for group, n in zip(self.param_groups, counts):
            groups.append((group, pairs[start:start + n]))
            start += n
        grads = [grad for _, grad in pairs]
        if not grads:
            return None
        if self._skips_on_device(groups):
            # The fused kernels read found_inf on the device and then leave parameters and
            # state (step counts included) as they were.
            finite = all_finite(grads)
            self._filter(groups, finite)
            return ~finite
        if not screen_step(self, self.nonfinite, grads):
            return SKIP_STEP
        self._filter(groups, None)
        self._plan_steady_step(groups)
        return None

    # The steady state (every EMA running, the same parameters with gradients as in the
    # last step, restore_grad's out-of-place filter, a host-side screen) is most steps of a
    # run. It is planned once, from a step of the general path, and then costs one pass
    # over cached lists instead of per-parameter lookups and checks.

    def _steady_ok(self) -> bool:
        """Whether this step may take the steady path at all (the plan aside)."""
        inner = self.optimizer
        device_skip = (self.nonfinite == "skip" and not isinstance(inner, GradientTransform)
                       and getattr(inner, "_step_supports_amp_scaling", False))
        return self._making_scratch() and self.foreach is not False and not device_skip

    def _plan_steady_step(
        self, groups: list[tuple[dict[str, Any], list[tuple[Tensor, Tensor]]]]
    ) -> None:
        """Cache what the steady path needs when every group with gradients takes the
        out-of-place EMA (see :meth:`_out_of_place_ok`) and all gradients share one device
        and dtype. On CPU (on every device with ``fused``) each gradient gets one of three
        treatments: small contiguous ones are filtered in the flat buffers (see
        :meth:`_flatten`), large ones in scratch kept between steps (with ``fused``, the
        contiguous large ones only), the rest (non-contiguous small ones; all of them off
        CPU without ``fused``) in fresh outputs per step."""
        self._state_edited()
        if not self._steady_ok():
            return self._release_flat_output()
        states: list[dict[str, Any]] = []
        splits = []
        kinds: list[tuple[torch.device, torch.dtype]] = []  # (a set of them: see below)
        for group, pairs in groups:
            if not pairs:
                continue
            group_states = [self.own_state[p] for p, _ in pairs]
            if not self._out_of_place_ok(group, pairs, group_states):
                return self._release_flat_output()
            start = len(states)
            states += group_states
            kinds += [(g.device, g.dtype) for _, g in pairs]
            fresh: list[int] = []
            kept: list[int] = []
            here: list[int] = []
            for i, (_, g) in enumerate(pairs, start):
                if g.device.type != "cpu" and not self.fused:
                    fresh.append(i)
                elif g.numel() * g.element_size() >= KEEP_SCRATCH_BYTES:
                    (kept if not self.fused or g.is_contiguous() else fresh).append(i)
                elif g.is_contiguous():
                    here.append(i)
                else:
                    fresh.append(i)
            splits.append((group, fresh, kept, here))
        kind = kinds[0] if kinds else None
        # Compared one by one, not gathered in a set: torch 2.5's compiler handed a set's
        # (device, dtype) tuple on as the device alone, where the step is compiled.
        if kind is None or any(k != kind for k in kinds):
            return self._release_flat_output()
        flat = [i for *_, here in splits for i in here]
        buffers = self._flatten([states[i] for i in flat], kind)
        plans, at = [], 0  # at: position in flat
        for group, fresh, kept, here in splits:
            pieces = None
            if here and buffers is not None:
                ema, out, views, starts = buffers
                lo, hi = starts[at], starts[at + len(here)]
                pieces = (ema[lo:hi], out[lo:hi], views[at:at + len(here)])
            at += len(here)
            plans.append(_GroupPlan(group, fresh, kept, here, sorted(fresh + kept), pieces))
        others = sorted(set(range(len(states))).difference(flat))
        # The screen: with fused, the large ones by their sums (see _maybe_nonfinite)
        summed = [i for plan in plans for i in plan.kept] if self.fused else []
        self._fast_plan = _SteadyPlan(
            states=states,
            params=[p for _, pairs in groups for p, _ in pairs],
            counts=list(self._gradients_at_step()[1]),
            param_groups=list(self.param_groups),
            groups=plans,
            kind=kind,
            kept={},
            flat=flat,
            others=others,
            summed=summed,
            checked=sorted(set(others).difference(summed)),
            buffers=buffers[:3] if buffers is not None else None,
            places=[states[i]["ema"].data_ptr() for i in flat],
        )

    def _release_flat_output(self) -> None:
        """No plan this step: free the flat output buffer (the EMA buffer holds the state
        and stays)."""
        last = self.__dict__.get("_flat_buffers")
        if last is not None:
            self._flat_buffers = (last[0], None, [], last[3])

    def _flatten(
        self, states: list[dict[str, Any]], kind: tuple[torch.device, torch.dtype]
    ) -> tuple[Tensor, Tensor, list[Tensor], list[int]] | None:
        """Lay the EMAs of ``states`` out in one flat buffer and give them a flat output
        buffer of the same size: the steady step then filters many small tensors in a few
        flat operations instead of a few operations per tensor. Returns (ema buffer,
        output buffer, output views shaped as the EMAs, each EMA's start offset and the
        total), or None for no states.

        Each EMA tensor is re-pointed into its piece of the buffer (``set_``): the state
        keeps the same tensor object, so a reference to it stays the live state. The
        buffers outlive the plan: a re-plan with the EMAs where they are reuses them, a
        new layout copies the EMAs once, and an EMA left out of it (a parameter without a
        gradient at that step) gets a storage of its own again, so that it does not keep
        the old buffer alive."""
        last = self.__dict__.pop("_flat_buffers", None)
        if not states:
            if last is not None:
                _unshare(last[3], last[0])
            return None
        device, dtype = kind
        emas = [st["ema"] for st in states]
        starts = list(itertools.accumulate((m.numel() for m in emas), initial=0))
        total = starts[-1]
        ema = None
        if last is not None and last[0].numel() == total and last[0].dtype == dtype:
            base, size = last[0].data_ptr(), last[0].element_size()
            if all(m.is_contiguous() and m.data_ptr() == base + at * size
                   for m, at in zip(emas, starts)):  # already laid out in this order
                ema = last[0]
        if ema is None:
            ema = torch.empty(total, device=device, dtype=dtype)
            for st, m, at in zip(states, emas, starts):
                piece = ema[at:at + m.numel()].view(m.shape)
                piece.copy_(m)
                if m._base is None:
                    m.set_(ema.untyped_storage(), at, m.shape, _contiguous_stride(m.shape))
                else:  # a view: set_ would leave it pointing at its old base
                    st["ema"] = piece
            if last is not None:
                planned = set(map(id, states))
                _unshare([st for st in last[3] if id(st) not in planned], last[0])
        out = last[1] if last is not None else None
        if out is None or out.numel() != total or (out.dtype, out.device) != (dtype, device):
            out = torch.empty_like(ema)
        views = [out[at:at + m.numel()].view(m.shape) for m, at in zip(emas, starts)]
        self._flat_buffers = (ema, out, views, states)
        return ema, out, views, starts

    def _steady_step(self) -> bool:
        """The planned steady step; False (nothing changed) when the plan does not hold
        for this step, which then takes the general path."""
        plan = self.__dict__.get("_fast_plan")
        if plan is None or not self._steady_ok():
            return False
        states, kind, kept, flat, others, buffers = (
            plan.states, plan.kind, plan.kept, plan.flat, plan.others, plan.buffers)
        pairs, now = self._gradients_at_step()
        # The same group dicts, each still filtering by EMA (the options read at every step,
        # alpha, lamb and normalize_lr, may change; after_step no longer matters once every
        # filter runs, and window, reduction and warmup are the MA's)...
        current, planned = self.param_groups, plan.param_groups
        if not (len(current) == len(planned) and all(map(operator.is_, current, planned))
                and all(g.group["grokfast_filter"] == "ema" for g in plan.groups)):
            return False
        # ...with the same gradients per group (a parameter moved to another group changes
        # them)...
        if now != plan.counts:
            return False
        ps, gs = zip(*pairs)
        # ...of the same parameters (a state replaced or reloaded ends the plan: see
        # _state_edited).
        if not (all(map(operator.is_, ps, plan.params))
                and all((g.device, g.dtype) == kind for g in gs)):
            return False
        grads = list(gs)
        # ...and the flat EMAs still where they were laid out (`.data = ...` or set_ on
        # one moves it without passing through `state`).
        if buffers is not None and plan.places != list(
                map(Tensor.data_ptr, [states[i]["ema"] for i in flat])):
            return False
        # The screen, before anything changes (the small gradients are copied first).
        summed = [grads[i] for i in plan.summed]
        if buffers is not None:
            torch._foreach_copy_(buffers[2], [grads[i] for i in flat])
            summed.append(buffers[1])
        if _maybe_nonfinite(summed, [grads[i] for i in plan.checked]):
            return False  # the general path screens again, and names the parameter
        mus = dict(zip(others, [states[i]["ema"] for i in others]))
        fused = self.fused and _fused_ready(kind)  # before anything changes
        for group, fresh, kept_here, here, rest, pieces in plan.groups:
            alpha, lamb = group["grokfast_alpha"], group["grokfast_lamb"]
            amplifies = _amplifies(lamb)
            fuse = fused and amplifies
            if fuse:
                # (one cache per role: the same tensor as both inputs would recompile)
                weight = self._scalar("weight", 1 - alpha, kind)
                lamb_t = self._scalar("lamb", lamb, kind)
                rest = fresh  # the kept ones are filtered below, in one kernel each
            if rest:
                torch._foreach_lerp_([mus[i] for i in rest], [grads[i] for i in rest],
                                     _lerp_weight(alpha, len(rest)))
            if pieces is not None:
                ema, out, views = pieces  # out holds the gradients (copied above)
                if fuse:
                    if out.numel():
                        _run_fused(_lerp_amplify_flat, ema, out, weight, lamb_t)
                else:
                    ema.lerp_(out, 1 - alpha)
                    if isinstance(lamb, Tensor):
                        out.add_(ema * lamb)
                    elif amplifies:
                        out.add_(ema, alpha=lamb)
                if amplifies:
                    for i, view in zip(here, views):
                        ps[i].grad = view
            if not amplifies:
                continue
            if fresh:
                outs = _amplified([grads[i] for i in fresh], [mus[i] for i in fresh], lamb)
                for i, o in zip(fresh, outs):
                    ps[i].grad = o
            for i in kept_here:
                g, mu = grads[i], mus[i]
                scratch = kept.get(i)
                if scratch is None or scratch.stride() != g.stride():
                    # the gradient's own layout (channels_last, a transposed view...), as the
                    # general path's new tensors have it
                    scratch = kept[i] = torch.empty_like(g)
                if not fuse:
                    _amplify_into(g, mu, lamb, scratch)
                elif g.is_contiguous() and mu.is_contiguous():
                    _run_fused(_lerp_amplify_into, g.view(-1), mu.view(-1), scratch.view(-1),
                               weight, lamb_t)
                else:  # its layout changed since the plan
                    mu.lerp_(g, weight)
                    _amplify_into(g, mu, lamb_t, scratch)
                ps[i].grad = scratch
        return True

    def _scalar(self, role: str, value: Any, kind: tuple[torch.device, torch.dtype]) -> Tensor:
        """``value`` as a 0-d tensor of the gradients' dtype and device (the fused kernels'
        hyperparameters: a tensor is an input, where a float would be compiled in), cached
        per value."""
        device, dtype = kind
        if isinstance(value, Tensor):
            return value.to(device=device, dtype=dtype)
        cache = self.__dict__.setdefault("_scalars", {})
        key = (role, float(value), device, dtype)
        found = cache.get(key)
        if found is None:
            if len(cache) > 16:  # values that change every step: keep the cache small
                cache.clear()
            found = cache[key] = torch.tensor(float(value), device=device, dtype=dtype)
        return found

    def _skips_on_device(self, groups: list[tuple[dict[str, Any], list[tuple[Tensor, Tensor]]]]) -> bool:
        """Whether a "skip" step can leave every state unchanged without a host sync.

        Only a fused torch optimizer takes found_inf, and it cannot undo creating its state
        (nor can the filter undo creating its EMA), so each must already exist.
        """
        inner = self.optimizer
        if (self.nonfinite != "skip" or isinstance(inner, GradientTransform)
                or not getattr(inner, "_step_supports_amp_scaling", False)):
            return False
        for group, pairs in groups:
            if pairs and group["grokfast_filter"] != "ema":
                return False
            for p, _ in pairs:
                own = self.own_state.get(p, {})
                if "ema" not in own or own.get("started", 1) == 0 or not inner.state.get(p):
                    return False
        return True

    # With restore_grad the filter gives the user's gradients back itself: the EMA writes
    # its output to new tensors (one pass, where a copy and then an in-place add take two);
    # other paths copy first.
    _makes_scratch = True

    def _filter(
        self, groups: list[tuple[dict[str, Any], list[tuple[Tensor, Tensor]]]], finite: Tensor | None
    ) -> None:
        scratch = self._making_scratch()
        for group, pairs in groups:
            if not pairs:
                continue
            params = [p for p, _ in pairs]
            if scratch:
                states = [self.own_state[p] for p in params]
                if self._out_of_place_ok(group, pairs, states):
                    for bucket in self._buckets(params):
                        out = _ema_foreach([pairs[i][1] for i in bucket],
                                           [states[i] for i in bucket],
                                           group["grokfast_alpha"], group["grokfast_lamb"],
                                           finite, out_of_place=True)
                        if out is not None:
                            for i, o in zip(bucket, out):
                                params[i].grad = o
                    continue
                pairs = [(p, g.clone()) for p, g in pairs]
                for p, g in pairs:
                    p.grad = g
            _filter(
                [grad for _, grad in pairs],
                [self.own_state[p] for p in params],
                buckets=self._buckets(params),
                filter=group["grokfast_filter"],
                alpha=group["grokfast_alpha"],
                lamb=group["grokfast_lamb"],
                window=group["grokfast_window"],
                reduction=group["grokfast_reduction"],
                warmup=group["grokfast_warmup"],
                after_step=group["grokfast_after_step"],
                foreach=self.foreach,
                finite=finite,
            )

    def _out_of_place_ok(self, group: dict[str, Any], pairs: list[tuple[Tensor, Tensor]],
                         states: list[dict[str, Any]]) -> bool:
        """Whether a group takes the out-of-place EMA: the foreach EMA on plain tensors
        of the state's dtype, every filter already running (none new, none waiting for
        after_step: those take the general path, which creates or starts them)."""
        if group["grokfast_filter"] != "ema" or self.foreach is False:
            return False
        if not all("ema" in st and st.get("started", 1) for st in states):
            return False
        dtensor = dtensor_type()
        if dtensor is not None and any(isinstance(g, dtensor) for _, g in pairs):
            return False
        return all(st["ema"].dtype == g.dtype and g.dtype not in (torch.float16, torch.bfloat16)
                   for st, (_, g) in zip(states, pairs))

    def _buckets(self, params: list[Tensor]) -> list[list[int]]:
        """Indices of ``params`` grouped by device and dtype (a gradient has its
        parameter's), cached for the set of parameters that have gradients."""
        key = tuple(map(id, params))
        cache = self.__dict__.setdefault("_bucket_cache", {})
        found = cache.get(key)
        if found is None:
            groups: dict[Any, list[int]] = defaultdict(list)
            for i, p in enumerate(params):
                groups[(p.device, p.dtype)].append(i)
            if len(cache) > 8:  # parameter sets that come and go: keep the cache small
                cache.clear()
            found = cache[key] = list(groups.values())
        return found

    @contextlib.contextmanager
    def _inner_step_context(self) -> Iterator[None]:
        saved = []
        for group in self.param_groups:
            if group["grokfast_normalize_lr"]:
                lr, lamb = group["lr"], group["grokfast_lamb"]
                if isinstance(lamb, Tensor) and not isinstance(lr, Tensor):
                    lamb = lamb.item()  # a tensor lr would change the inner optimizer's path
                saved.append((group, lr))
                group["lr"] = lr / (1 + lamb)
        try:
            yield
        finally:
            for group, lr in saved:
                group["lr"] = lr  # the same object: a scheduler's in-place updates still land

    def _validate_param_state(self, param: Tensor, state: dict[str, Any]) -> None:
        for key in ("ema", "ma_sum"):
            if key in state and tuple(state[key].shape) != tuple(param.shape):
                raise ValueError(
                    f"state_dict's grokfast {key} has shape {tuple(state[key].shape)}, "
                    f"the parameter has {tuple(param.shape)}"
                )
        if "ma_buffer" in state:
            if tuple(state["ma_buffer"].shape[1:]) != tuple(param.shape):
                raise ValueError(
                    f"state_dict's grokfast ma_buffer has shape "
                    f"{tuple(state['ma_buffer'].shape)}, expected (window, *{tuple(param.shape)})"
                )
            if "ma_sum" not in state or "ma_count" not in state:
                raise ValueError("state_dict's grokfast MA state lacks ma_sum or ma_count")
        if "step" in state:
            step = state["step"]
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise ValueError(
                    f"state_dict's grokfast step (gradients counted towards after_step) must "
                    f"be an int >= 0, got {state['step']!r}"
                )
        if "started" in state and (isinstance(state["started"], bool)
                                   or state["started"] not in (0, 1)):
            raise ValueError(
                f"state_dict's grokfast started (whether the filter has passed after_step) "
                f"must be 0 or 1, got {state['started']!r}"
            )


def _check_lr(groups: Sequence[Mapping[str, Any]], default: bool = False) -> None:
    """normalize_lr needs an ``lr`` in each group it applies to."""
    for i, group in enumerate(groups):
        if group.get("grokfast_normalize_lr", default) is True and "lr" not in group:
            raise ValueError(
                f"normalize_lr=True needs an 'lr' in every param group it applies to; "
                f"param group {i} has none (keys: {sorted(k for k in group if k != 'params')})"
            )
