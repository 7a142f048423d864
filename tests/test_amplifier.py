"""The amplifier: make_amplifier, its exact piecewise-linear table (against the MLP, brute
force and autograd) and the gain evaluation with its vector-Jacobian product."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from grokopt import amplifier
from grokopt.amplifier import Gains, check_amplifier, make_amplifier, piecewise_plan, piecewise_table

F64 = torch.float64


def amp64(hidden=(16, 16), seed=0):
    torch.manual_seed(seed)
    return make_amplifier(hidden, dtype=F64)


# ---------------------------------------------------------------- the piecewise-linear table


def rounding_bound(amp: nn.Module, x_max: float, dtype: torch.dtype) -> float:
    """A priori bound on |f_pwl(x) - f_exact(x)| for |x| <= x_max, both in ``dtype``.

    Both paths evaluate the same affine piece of the ReLU MLP. Evaluating Linear layers
    y = W h + b in floating point errs by at most gamma_n (|W||h| + |b|) (Higham, Thm 3.5),
    ReLU is 1-Lipschitz and exact, so a whole forward errs by at most gamma_N * M(x), N the
    summed fan-ins (+1 each), M(x) = M(0) + M_s |x| the network with |W|, |b| and no
    activation (M_s: its slope). The pwl path evaluates value and slope at an interval's
    midpoint m (|m| <= x_max) and extrapolates with three more roundings, so it errs by at
    most gamma_{N+3} (M(0) + 3 M_s x_max); the exact path by less. A point next to a kink
    can be given the neighbouring piece when the kink itself is off by rounding, which costs
    at most the same again. Hence 4 gamma_{N+3} (M(0) + 3 M_s x_max).
    """
    u = torch.finfo(dtype).eps / 2
    linears = [m for m in amp if isinstance(m, nn.Linear)]
    n = sum(m.in_features + 1 for m in linears) + 3
    gamma = n * u / (1 - n * u)
    m0 = torch.zeros(1, dtype=F64)
    ms = torch.ones(1, dtype=F64)
    for m in linears:
        w = m.weight.detach().double().abs()
        m0 = w @ m0 + m.bias.detach().double().abs()
        ms = w @ ms
    return 4 * gamma * (m0.item() + 3 * ms.item() * x_max)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("scale", [1e-4, 1e-1, 30.0])
def test_pwl_gains_equal_the_mlp_within_the_rounding_bound(dtype, scale):
    torch.manual_seed(3)
    amp = make_amplifier((128, 128), dtype=dtype)
    x = torch.randn(20_000, dtype=dtype) * scale
    kinks, a, s = piecewise_table(piecewise_plan(amp), x.min().item(), x.max().item(), dtype, x.device)
    with torch.no_grad():
        fast = torch.addcmul(a[torch.searchsorted(kinks, x)], s[torch.searchsorted(kinks, x)], x)
        exact = amp(x[:, None])[:, 0]
    bound = rounding_bound(amp, x.abs().max().item(), dtype)
    err = (fast - exact).abs().max().item()
    assert err <= bound, (err, bound)
    # A ReLU MLP (128, 128) has at most 128 + 129 * 128 kinks on the whole line.
    assert kinks.numel() <= 128 + 129 * 128


def test_kinks_are_where_the_mlp_bends():
    """Brute force on a fine grid: the second difference of the MLP is non-zero exactly
    in grid cells that contain a computed kink."""
    amp = amp64((6, 5), seed=4)
    lo, hi = -3.0, 3.0
    kinks, _, _ = piecewise_table(piecewise_plan(amp), lo, hi, F64, torch.device("cpu"))
    grid = torch.linspace(lo, hi, 60_001, dtype=F64)
    with torch.no_grad():
        f = amp(grid[:, None])[:, 0]
    bend = (f[2:] - 2 * f[1:-1] + f[:-2]).abs() > 1e-9
    h = grid[1] - grid[0]
    near = torch.zeros_like(bend)
    for k in kinks:
        near |= (grid[1:-1] - k).abs() < h
    assert torch.equal(bend & ~near, torch.zeros_like(bend))  # every bend is a found kink
    for k in kinks:  # and every found kink bends (no spurious ones)
        assert bend[((grid[1:-1] - k).abs() < h)].any()


@pytest.fixture(params=[True, False], ids=["centre-split", "search-all"])
def split(request, monkeypatch):
    """Both ways of locating the pieces (amplifier.CENTRE_SPLIT)."""
    monkeypatch.setattr(amplifier, "CENTRE_SPLIT", request.param)
    return request.param


def brute_force_pieces(table, x):
    """Each entry's piece by counting the kinks strictly below it (searchsorted's rule)."""
    return (x[:, None] > table.kinks[None, :]).sum(1)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("span", [(-1.5, 1.5), (0.6, 1.5), (-1.5, -0.6), (0.01, 0.02)],
                         ids=["0-between-kinks", "0-below-all", "0-above-all", "no-kinks"])
def test_table_lookup_finds_every_entrys_piece(dtype, span, split):
    """The lookup against the pieces counted by brute force, with entries on the piece of 0,
    on every other piece, outside the range, exactly on kinks, and NaN; all entries off the
    piece of 0, and none; with 0 between two kinks, below or above all, and no kinks at all.
    Up to the rounding of one multiply-add (the piece of 0 is not evaluated by addcmul)."""
    amp = amp64((6, 5), seed=2).to(dtype)
    table = piecewise_table(piecewise_plan(amp), *span, dtype, torch.device("cpu"))
    assert (table.kinks.numel() == 0) == (span == (0.01, 0.02))
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(300, generator=gen, dtype=dtype), table.kinks,
                   torch.tensor([-3.0, 4.0, 0.0], dtype=dtype)])
    k = brute_force_pieces(table, x)
    centre = brute_force_pieces(table, torch.zeros(1, dtype=dtype)).item()
    on_centre = k == centre
    eps = torch.finfo(dtype).eps
    for part in (slice(None), ~on_centre, on_centre):
        xs, ks = x[part], k[part]
        if not xs.numel():
            continue
        expected = torch.addcmul(table.intercept[ks], table.slope[ks], xs)
        scale = (table.intercept[ks].abs() + (table.slope[ks] * xs).abs()).max().item()
        torch.testing.assert_close(table.lookup(xs), expected, rtol=2 * eps, atol=2 * eps * scale)
    assert 0 < on_centre.sum() < len(x) or table.kinks.numel() == 0
    if split:  # exactly the entries off the piece of 0 are searched
        searched = torch.zeros(len(x), dtype=torch.bool)
        searched[table.locate(x).rest] = True
        assert torch.equal(searched, ~on_centre)
    nan = table.lookup(torch.tensor([0.5, torch.nan, -0.5], dtype=dtype))
    assert nan[1].isnan() and nan[[0, 2]].isfinite().all()


def expand(located, n):
    """The piece of each of n entries from a Located."""
    pieces = torch.full((n,), located.centre, dtype=torch.int64)
    pieces[located.rest] = located.rest_pieces
    return pieces


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
@pytest.mark.parametrize("kinks", [
    lambda i: [-1.0, -0.25, 0.5, 2.0], lambda i: [0.25, 0.5], lambda i: [-0.5, -0.25],
    lambda i: [0.0], lambda i: [-0.5, 0.0, 0.5], lambda i: [],
    lambda i: [-3 * i.tiny, -i.tiny / 4, 0.0], lambda i: [-i.max / 2, i.max / 2],
    lambda i: [i.tiny / 2, i.max],
], ids=["between", "all-above-0", "all-below-0", "at-0", "one-at-0", "none",
        "subnormal", "huge", "subnormal-and-max"])
def test_centre_split_pieces_equal_brute_force_next_to_every_kink(dtype, kinks, monkeypatch):
    """Every entry's piece from the centre split, against the kinks counted by brute force,
    for entries on each kink and 1-4 ulps either side, 0, -0, +-inf and the extremes of the
    dtype; with tables whose kinks are subnormal or near the largest finite value (``kinks``
    gives them from the dtype's limits)."""
    monkeypatch.setattr(amplifier, "CENTRE_SPLIT", True)
    info = torch.finfo(dtype)
    k = torch.tensor(sorted(kinks(info)), dtype=dtype)
    table = amplifier.PiecewiseTable(k, torch.zeros(len(k) + 1, dtype=dtype),
                                     torch.zeros(len(k) + 1, dtype=dtype))
    xs = [torch.tensor([0.0, -0.0, math.inf, -math.inf, info.max, -info.max, info.tiny,
                        -info.tiny], dtype=dtype)]
    for point in k:
        for direction in (math.inf, -math.inf):
            step = point.clone()
            for _ in range(4):
                step = torch.nextafter(step, torch.tensor(direction, dtype=dtype))
                xs.append(step.view(1))
        xs.append(point.view(1))
    x = torch.cat(xs)
    located = table.locate(x)
    assert isinstance(located, amplifier.Located)
    torch.testing.assert_close(expand(located, len(x)), brute_force_pieces(table, x), rtol=0, atol=0)


@pytest.mark.parametrize("n", [0, 5, 64, 64 * 40 + 17])
@pytest.mark.parametrize("offs", ["none", "few", "row-ends", "tail", "many", "nan-rows"])
def test_centre_split_finds_off_entries_wherever_they_sit(n, offs, monkeypatch):
    """The split looks at rows of entries first and only then at single entries: off-centre
    entries at the first and last place of a row, in the tail after the last whole row, in
    a few rows or in most (where it tests every entry at once), or nowhere, and rows that
    hold a NaN beside an off entry (a NaN min or max rules nothing out); against brute
    force and against searching every entry (NaN included), each off entry found once, in
    order."""
    monkeypatch.setattr(amplifier, "CENTRE_SPLIT", True)
    table = amplifier.PiecewiseTable(torch.tensor([-0.5, 0.25, 1.0], dtype=F64),
                                     torch.zeros(4, dtype=F64), torch.zeros(4, dtype=F64))
    gen = torch.Generator().manual_seed(n)
    x = torch.rand(n, generator=gen, dtype=F64) * 0.7 - 0.45  # inside (-0.5, 0.25]
    places = {"none": [], "few": [3, 700, 1500], "row-ends": [0, 63, 64, 127, 2559],
              "tail": [n - 1, n - 17], "many": list(range(0, n, 50)),
              "nan-rows": [2, 40, 130, 129, n - 2, n - 1]}[offs]
    values = [-0.5, 0.2500001, 3.0, -7.0] if offs != "nan-rows" else [math.nan, 3.0]
    for i, place in enumerate(p for p in places if 0 <= p < n):
        x[place] = values[i % len(values)]
    located = table.locate(x)
    pieces = expand(located, n)
    assert torch.equal(pieces, torch.searchsorted(table.kinks, x))
    k = brute_force_pieces(table, x)
    finite = ~x.isnan()
    assert torch.equal(pieces[finite], k[finite])
    assert torch.equal(located.rest, ((k != 1) | ~finite).nonzero().view(-1))


def test_compiled_code_and_other_dtypes_search_every_entry(monkeypatch):
    """Inside torch.compile the split's host reads would be guarded on (a recompile each
    step) and break the graph: the search of every entry is traced instead, in one graph.
    An input of another dtype than the kinks is searched too (no rounded comparisons)."""
    monkeypatch.setattr(amplifier, "CENTRE_SPLIT", True)
    amp = amp64((6, 5), seed=2)
    table = piecewise_table(piecewise_plan(amp), -1.5, 1.5, F64, torch.device("cpu"))
    x = torch.randn(100, generator=torch.Generator().manual_seed(0), dtype=F64)
    k = brute_force_pieces(table, x)
    expected = torch.addcmul(table.intercept[k], table.slope[k], x).detach()
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: table.lookup(t), fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), expected, rtol=0, atol=0)
        assert torch.equal(table.locate(x.float()), brute_force_pieces(table, x.float()))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("span", [(-1.5, 1.5), (0.6, 1.5), (-1.5, -0.6)],
                         ids=["0-between-kinks", "0-below-all", "0-above-all"])
def test_table_pullback_equals_autograd_through_the_lookup(dtype, span, split):
    """The table's own vector-Jacobian product against autograd through a plain lookup
    (index_select at brute-force pieces) on leaf copies of the pieces, with repeated pieces,
    entries exactly on kinks (each belongs to the piece below it) and entries outside the
    table's range (they extend the end pieces). Searching every entry sums in autograd's
    order (equal); the centre split sums the piece of 0 with one
    reduction (rounding)."""
    amp = amp64((6, 5), seed=2).to(dtype)
    table = piecewise_table(piecewise_plan(amp), *span, dtype, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(200, generator=gen, dtype=dtype), table.kinks,
                   torch.tensor([-3.0, 4.0], dtype=dtype)])
    df = torch.randn(x.shape, generator=gen, dtype=dtype)
    leaves = [table.intercept.detach().clone().requires_grad_(), table.slope.detach().clone().requires_grad_()]
    k = brute_force_pieces(table, x)
    expected = torch.autograd.grad((torch.addcmul(leaves[0][k], leaves[1][k], x) * df).sum(), leaves)
    got = [torch.zeros_like(t) for t in leaves]
    table.pullback(x, df.clone(), got)
    tol = 0 if not split else len(x) * torch.finfo(dtype).eps
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=tol, atol=tol * (df * x).abs().max().item())
        assert g.count_nonzero() >= 3  # several pieces take part


@pytest.mark.parametrize("chunk", [None, 1, 7])
@pytest.mark.parametrize("use_table", [False, True])
def test_gains_and_their_pullback_equal_the_mlp_under_autograd(use_table, chunk, split):
    """Gains (table or module, any chunking) give the MLP's values, and their pullback into
    the amplifier's weights (through the table's pieces when there is one) is autograd's
    d<df, amp(x)>/dphi; fp64, summed in another order: rounding only."""
    amp = amp64((6, 6), seed=3)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, generator=gen, dtype=F64)
    df = torch.randn(40, generator=gen, dtype=F64)
    params = list(amp.parameters())
    expected_f = amp(x[:, None])[:, 0]
    expected = torch.autograd.grad((expected_f * df).sum(), params)
    table = (piecewise_table(piecewise_plan(amp), x.min().item(), x.max().item(), F64, x.device)
             if use_table else None)
    gains = Gains(amp, table, chunk, F64, x.device)
    torch.testing.assert_close(gains(x), expected_f.detach(), rtol=1e-12, atol=1e-12)
    acc = [torch.zeros_like(p) for p in gains.params()]
    gains.pullback(x, df, acc, gains.locate(x))
    if use_table:
        acc = torch.autograd.grad(gains.params(), params, acc)
    for g, e in zip(acc, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize("kw, error, message", [
    (dict(hidden=4), TypeError, "hidden must be a non-empty sequence of ints >= 1, got int: 4"),
    (dict(hidden=()), ValueError, r"hidden must be a non-empty sequence of ints >= 1, got \(\)"),
    (dict(hidden=(8, 0)), ValueError, "hidden\\[1\\] must be an int >= 1, got 0"),
    (dict(hidden=(8, 2.0)), TypeError, "hidden\\[1\\] must be an int >= 1, got float: 2.0"),
    (dict(dtype=torch.int64), TypeError, "dtype must be a floating-point torch.dtype, got dtype: torch.int64"),
    (dict(device="nowhere"), ValueError, "device must be a usable torch device or None, got 'nowhere'"),
])
def test_make_amplifier_rejects_bad_arguments_by_name_allowed_values_and_value(kw, error, message):
    with pytest.raises(error, match=message):
        make_amplifier(**kw)


def test_check_amplifier_names_the_argument_and_what_it_must_map():
    with pytest.raises(TypeError, match="amplifier must be an nn.Module mapping \\(n, 1\\) to \\(n, 1\\), got str: 'mlp'"):
        check_amplifier("mlp", torch.device("cpu"))
    with pytest.raises(ValueError, match=r"amplifier must map .* returned \(3, 2\)"):
        check_amplifier(nn.Linear(1, 2), torch.device("cpu"))
    with pytest.raises(ValueError, match="amplifier must map .* raised RuntimeError"):
        check_amplifier(nn.Linear(2, 1), torch.device("cpu"))
    amp = make_amplifier((3,))
    assert check_amplifier(amp, torch.device("cpu")) is amp
