"""NeuralGrok's amplifier: the MLP of one scalar, and its exact piecewise-linear table.

The amplifier maps each gradient entry ``x`` to a gain ``f(x)`` (docs/methods.md). A ReLU MLP
of one scalar is a continuous *piecewise-linear* function with at most ``h1 + (h1 + 1) * h2``
kinks, so :func:`piecewise_table` finds the kinks inside ``[lo, hi]`` and one affine piece
(intercept, slope) per interval, computed with the MLP's own weights (differentiable in them).
Each entry is then looked up, ``f = a[k] + s[k] * x`` with ``k`` its piece: the *same
function*, not an approximation, in O(P log K) elementwise work at most plus an
O(K * hidden^2) table independent of the number P of entries. (On a CPU only the entries off
the piece that holds 0 are binary-searched, see :data:`CENTRE_SPLIT`.) :class:`Gains`
evaluates the gain (by the table when there is one, else by the module in chunks) and its
vector-Jacobian product; every user of the gain goes through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ._checks import check_int, check_type, describe

__all__ = [
    "CENTRE_SPLIT",
    "Gains",
    "Located",
    "PiecewiseTable",
    "amplifier_dtype_device",
    "check_amplifier",
    "make_amplifier",
    "piecewise_plan",
    "piecewise_table",
]

Plan = list[tuple[str, Any]]


def make_amplifier(
    hidden: Sequence[int] = (128, 128),
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Sequential:
    """The paper's amplifier: ``Linear(1, h1)-ReLU-...-Linear(hn, 1)``, PyTorch default init.

    Example:
        >>> amp = make_amplifier((16, 16))
        >>> amp(torch.zeros(5, 1)).shape
        torch.Size([5, 1])
    """
    if not isinstance(hidden, Sequence) or isinstance(hidden, str):
        raise TypeError(f"hidden must be a non-empty sequence of ints >= 1, got {describe(hidden)}")
    hidden = tuple(hidden)
    if not hidden:
        raise ValueError("hidden must be a non-empty sequence of ints >= 1, got ()")
    for i, h in enumerate(hidden):
        check_int(f"hidden[{i}]", h, minimum=1)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {describe(dtype)}")
    if device is not None:
        # An int, an unknown string or an absent accelerator fails here with the argument's
        # name instead of inside nn.Linear.
        try:
            torch.empty(0, device=device)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ValueError(f"device must be a usable torch device or None, got {device!r}: {exc}") from exc
    layers: list[nn.Module] = []
    width = 1
    for h in hidden:
        layers += [nn.Linear(width, h, device=device, dtype=dtype), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, 1, device=device, dtype=dtype))
    return nn.Sequential(*layers)


def amplifier_dtype_device(amplifier: nn.Module, fallback: Tensor) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of the amplifier's parameters (fp32 on ``fallback``'s device if
    it has none)."""
    for p in amplifier.parameters():
        return p.dtype, p.device
    return torch.float32, fallback.device


def check_amplifier(amplifier: Any, device: torch.device) -> nn.Module:
    """``amplifier`` if it is a module that maps a (n, 1) tensor to a (n, 1) tensor."""
    check_type("amplifier", amplifier, nn.Module, "an nn.Module mapping (n, 1) to (n, 1)")
    dtype, dev = amplifier_dtype_device(amplifier, torch.empty(0, device=device))
    probe = torch.linspace(-1.0, 1.0, 3, dtype=dtype, device=dev)[:, None]
    with torch.no_grad():
        try:
            out = amplifier(probe)
        except Exception as exc:
            raise ValueError(
                f"amplifier must map a (n, 1) tensor to a (n, 1) tensor, got a module that "
                f"raised {type(exc).__name__} on a (3, 1) tensor: {exc}"
            ) from exc
    if not isinstance(out, Tensor) or tuple(out.shape) != (3, 1):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"amplifier must map a (n, 1) tensor to a (n, 1) tensor (one gain per gradient "
            f"entry), got a module that returned {shape} on a (3, 1) tensor"
        )
    return amplifier


# ---------------------------------------------------------------------------- the table


def piecewise_plan(amplifier: nn.Module) -> Plan | None:
    """The amplifier as ``[("linear", module) | ("act", negative_slope)]``, or None if it is
    not a ``Linear``/``ReLU``/``LeakyReLU``/``Identity`` stack (in ``nn.Sequential``), the
    stacks :func:`piecewise_table` represents exactly."""
    plan: Plan = []

    def walk(m: nn.Module) -> bool:
        if type(m) is nn.Sequential:
            return all(walk(child) for child in m)
        if type(m) is nn.Linear:
            plan.append(("linear", m))
        elif type(m) is nn.ReLU:
            plan.append(("act", 0.0))
        elif type(m) is nn.LeakyReLU:
            plan.append(("act", float(m.negative_slope)))
        elif type(m) is not nn.Identity:
            return False
        return True

    if not walk(amplifier) or not plan or plan[0][0] != "linear":
        return None
    return plan


def _dual(plan: Plan, x: Tensor) -> tuple[Tensor, Tensor]:
    """Values and d/dx of the (sub)network at points x (K,), shape (K, width) each.

    The activation pattern is read off the values at x, so on an interval where no unit
    changes sign this is the network's exact affine piece, differentiable in its weights.
    """
    h = x[:, None]
    d = torch.ones_like(h)
    for kind, layer in plan:
        if kind == "linear":
            h = nn.functional.linear(h, layer.weight, layer.bias)
            d = nn.functional.linear(d, layer.weight)
        else:
            # Built in h's dtype: a float32 0.1 would be off by 1e-9 in an fp64 network.
            gain = torch.where(h.detach() > 0, h.new_ones(()), h.new_full((), layer))
            h = h * gain
            d = d * gain
    return h, d


class PiecewiseTable(NamedTuple):
    """The amplifier on ``[lo, hi]`` as K affine pieces: ``f(x) = intercept[k] + slope[k] * x``
    where ``k`` is the number of ``kinks`` (sorted) below ``x``.

    Example:
        >>> amp = make_amplifier((8,), dtype=torch.float64)
        >>> table = piecewise_table(piecewise_plan(amp), -2.0, 2.0, torch.float64, torch.device("cpu"))
        >>> x = torch.linspace(-2, 2, 101, dtype=torch.float64)
        >>> torch.allclose(table.lookup(x), amp(x[:, None])[:, 0], rtol=0, atol=1e-12)
        True
    """

    kinks: Tensor
    intercept: Tensor
    slope: Tensor

    def locate(self, x: Tensor) -> Tensor | Located:
        """The piece of each entry of ``x``: an index per entry, or a :class:`Located` (on a
        CPU, see :data:`CENTRE_SPLIT`)."""
        split = CENTRE_SPLIT if CENTRE_SPLIT is not None else x.device.type == "cpu"
        # Under torch.compile the split's host values would be guarded on and recompile
        # every step; with another dtype than the kinks' its comparisons would round.
        if split and x.dtype == self.kinks.dtype and not torch.compiler.is_compiling():
            return self._locate_around_zero(x)
        return torch.searchsorted(self.kinks, x)  # int64: index_select is ~2x faster than with int32

    def _locate_around_zero(self, x: Tensor) -> Located:
        # searchsorted puts x on piece k when kinks[k-1] < x <= kinks[k]: the same test, in
        # x's dtype (the kinks'), against the ends (lo, hi] of the piece of 0 flags the
        # entries off it, and only those are searched.
        kinks = self.kinks
        centre = int(torch.searchsorted(kinks, kinks.new_zeros(1)))
        lo = kinks[centre - 1].item() if centre > 0 else None
        hi = kinks[centre].item() if centre < len(kinks) else None

        def off(lowest: Tensor, highest: Tensor) -> Tensor:
            # not provably on (lo, hi]: NaN is flagged too (and a row holding one is looked
            # into), as searchsorted places it by its own rule
            inside = torch.ones(lowest.shape, dtype=torch.bool, device=lowest.device)
            if lo is not None:
                inside.logical_and_(lowest > lo)
            if hi is not None:
                inside.logical_and_(highest <= hi)
            return inside.logical_not_()

        # Rows of 64 entries first: a row whose min and max are both on the piece of 0
        # needs no comparison per entry (two reductions and a short list of rows cost about
        # half the comparisons and the scan of a mask over every entry).
        n = len(x) - len(x) % _ROW
        rows = x[:n].view(-1, _ROW)
        bad = (off(rows.amin(1), rows.amax(1)).nonzero().view(-1) if n
               else x.new_zeros(0, dtype=torch.long))
        if len(bad) > len(rows) // 4:  # off entries everywhere: test them all at once
            rest = off(x, x).nonzero().view(-1)
        else:
            picked = rows[bad]
            where = off(picked, picked).nonzero()
            tail = off(x[n:], x[n:]).nonzero().view(-1) + n
            rest = torch.cat([bad[where[:, 0]] * _ROW + where[:, 1], tail])
        return Located(centre, rest, torch.searchsorted(kinks, x[rest]))

    def lookup(self, x: Tensor, k: Tensor | Located | None = None) -> Tensor:
        """The gain of each entry of ``x`` (``k``: its pieces, if already located)."""
        k = self.locate(x) if k is None else k
        if isinstance(k, Located):
            # 0-dim factors: a CPU kernel takes them as scalars (addcmul would broadcast)
            f = (x * self.slope[k.centre]).add_(self.intercept[k.centre])
            f[k.rest] = self.lookup(x[k.rest], k.rest_pieces)
            return f
        return torch.addcmul(self.intercept.index_select(0, k), self.slope.index_select(0, k), x)

    def pullback(self, x: Tensor, df: Tensor, out: list[Tensor],
                 k: Tensor | Located | None = None) -> None:
        """Add d<df, lookup(x)>/d(intercept, slope) into ``out`` = [d_intercept, d_slope].
        ``df`` may be overwritten."""
        k = self.locate(x) if k is None else k
        if isinstance(k, Located):
            self.pullback(x[k.rest], df[k.rest], out, k.rest_pieces)
            df = df.index_fill_(0, k.rest, 0)
            sums = torch.stack([df.sum(), torch.dot(df, x.to(df.dtype))]).to(out[0].dtype)
            out[0][k.centre] += sums[0]
            out[1][k.centre] += sums[1]
            return
        # Both sums in one pass: most entries fall on a few pieces, and index_add_ spends
        # its time on the chain of additions into the same entry, not on the columns.
        both = torch.stack([df, df * x], 1).to(out[0].dtype)
        sums = torch.zeros(len(out[0]), 2, dtype=both.dtype, device=both.device).index_add_(0, k, both)
        out[0].add_(sums[:, 0])
        out[1].add_(sums[:, 1])


_ROW = 64

CENTRE_SPLIT: bool | None = None
"""How :meth:`PiecewiseTable.locate` finds the pieces. Most gradient entries lie near zero,
on the one piece that holds 0; on a CPU the binary search per entry costs several times a
comparison, so there (None, the default) two comparisons with the ends of that piece find
the entries off it and only those are searched (a :class:`Located`; the pullback then sums
the piece of 0 with one reduction instead of a scatter). A GPU searches every entry (its
search is bound by memory, and finding the few others would synchronise it), and so does
code being compiled by ``torch.compile`` and an input whose dtype is not the table's. True
or False forces one way: the tests check each against the other."""


class Located(NamedTuple):
    """The pieces of a flat tensor's entries: all on piece ``centre`` but those at positions
    ``rest``, which are on ``rest_pieces``."""

    centre: int
    rest: Tensor
    rest_pieces: Tensor


def piecewise_table(plan: Plan, lo: float, hi: float, dtype: torch.dtype,
                    device: torch.device) -> PiecewiseTable:
    """The kinks inside ``(lo, hi)`` and every piece's intercept and slope; the pieces are
    differentiable in the amplifier's weights while grad mode is on.

    Kinks come layer by layer: once all kinks of the layers below are known, every unit of
    the next activation is affine on each interval, so its zero there is one division.
    """
    with torch.no_grad():
        kinks = torch.empty(0, dtype=dtype, device=device)
        ends = torch.tensor([lo, hi], dtype=dtype, device=device)
        for i, (kind, _) in enumerate(plan):
            if kind != "act":
                continue
            edges = torch.cat([ends[:1], kinks, ends[1:]])
            mids = (edges[:-1] + edges[1:]) / 2
            z, dz = _dual(plan[:i], mids)
            roots = mids[:, None] - z / dz  # dz == 0 gives inf/nan, dropped by the test below
            inside = (roots > edges[:-1, None]) & (roots < edges[1:, None])
            kinks = torch.unique(torch.cat([kinks, roots[inside]]))  # sorted
        edges = torch.cat([ends[:1], kinks, ends[1:]])
        mids = (edges[:-1] + edges[1:]) / 2
    value, slope = _dual(plan, mids)
    value, slope = value[:, 0], slope[:, 0]
    return PiecewiseTable(kinks, value - slope * mids, slope)


# ---------------------------------------------------------------------------- the gain


class Gains:
    """The gain ``f`` of flat tensors of gradient entries, and its vector-Jacobian product.

    By ``table`` when there is one (the amplifier's exact pieces), else by the module itself,
    in chunks of ``chunk_size`` entries (None: all at once) so that the module's activations
    take O(chunk_size x hidden) memory. Inputs are cast to ``dtype`` on ``device``.
    :meth:`pullback` accumulates into the gradients of :meth:`params`: the table's
    (intercept, slope), or the module's parameters.

    Example:
        >>> amp = make_amplifier((4,))
        >>> gains = Gains(amp, None, 2, torch.float32, torch.device("cpu"))
        >>> x = torch.tensor([0.5, -1.0, 2.0])
        >>> torch.allclose(gains(x), amp(x[:, None])[:, 0])  # in chunks of 2, the same function
        True
    """

    def __init__(self, amplifier: nn.Module | None, table: PiecewiseTable | None,
                 chunk_size: int | None, dtype: torch.dtype, device: torch.device) -> None:
        if amplifier is None and table is None:
            raise ValueError("Gains needs an amplifier or a table, got neither")
        self.amplifier, self.table, self.chunk_size = amplifier, table, chunk_size
        self.dtype, self.device = dtype, device

    def params(self) -> list[Tensor]:
        if self.table is not None:
            return [self.table.intercept, self.table.slope]
        return list(self.amplifier.parameters())  # type: ignore[union-attr]

    def _cast(self, x: Tensor) -> Tensor:
        return x.to(device=self.device, dtype=self.dtype)

    def _chunks(self, x: Tensor) -> Sequence[Tensor]:
        return x.split(self.chunk_size) if self.chunk_size is not None else (x,)

    def locate(self, x: Tensor) -> Tensor | Located | None:
        """The table's piece of each entry (:meth:`PiecewiseTable.locate`; None without a
        table): pass it to :meth:`__call__` and :meth:`pullback` to search once for both."""
        return None if self.table is None else self.table.locate(self._cast(x))

    def __call__(self, x: Tensor, where: Tensor | Located | None = None) -> Tensor:
        x = self._cast(x)
        if where is not None:
            return self.table.lookup(x, where)  # type: ignore[union-attr]
        parts = self._chunks(x)
        if self.table is not None:
            out = [self.table.lookup(part) for part in parts]
        else:
            out = [self.amplifier(part[:, None]).reshape(-1) for part in parts]  # type: ignore[misc]
        return out[0] if len(out) == 1 else torch.cat(out)

    def pullback(self, x: Tensor, df: Tensor, out: list[Tensor],
                 where: Tensor | Located | None = None) -> None:
        """Add d<df, self(x)>/d params() into ``out`` (one tensor per parameter). ``df``
        may be overwritten."""
        x = self._cast(x)
        if self.table is not None:
            self.table.pullback(x, df, out, where)
            return
        params = self.params()
        for part, d in zip(self._chunks(x), self._chunks(df)):
            with torch.enable_grad():
                f = self.amplifier(part[:, None]).reshape(-1)  # type: ignore[misc]
            found = torch.autograd.grad(f, params, d.to(f.dtype), allow_unused=True)
            for acc, g in zip(out, found):
                if g is not None:
                    acc.add_(g)
