"""CUDA: every method on the GPU agrees with a CPU reference, and GradScaler's fp16 skip.

Marked ``cuda`` and skipped where torch sees no GPU (CI has none); ``benchmarks/cuda.sh``
runs them on a machine that has one (``python -m pytest -m cuda tests/test_cuda.py``).
The CPU side of each comparison is either a plain formula written here or the same public
call on the CPU, which the rest of the suite checks against closed forms.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import grokopt

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CUDA = "cuda"


def _grad_sequence(shapes, steps, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
            for _ in range(steps)]


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("filter", ["ema", "ma"])
def test_filter_on_cuda_matches_the_formula(foreach, filter):
    """grokfast_ on CUDA tensors against the EMA/MA formulas evaluated in float64 on the CPU."""
    shapes = [(33, 17), (5,), (128, 64)]
    alpha, lamb, window = 0.9, 1.5, 3
    seq = _grad_sequence(shapes, 6)
    states = [{} for _ in shapes]
    mu = [None] * len(shapes)
    hist: list[list[torch.Tensor]] = [[] for _ in shapes]
    for grads in seq:
        dev = [g.to(CUDA) for g in grads]
        grokfast_kwargs = dict(filter=filter, alpha=alpha, lamb=lamb, window=window, foreach=foreach)
        grokopt.grokfast_(dev, states, **grokfast_kwargs)
        for i, g in enumerate(grads):
            g = g.double()
            if filter == "ema":
                mu[i] = g.clone() if mu[i] is None else mu[i]
                mu[i] = alpha * mu[i] + (1 - alpha) * g
                want = g + lamb * mu[i]
            else:
                hist[i] = (hist[i] + [g])[-window:]
                want = g + lamb * torch.stack(hist[i]).mean(0) if len(hist[i]) == window else g
            torch.testing.assert_close(dev[i].cpu().double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("inner", ["adamw-foreach", "adamw-fused", "sgd"])
def test_grokfast_trajectory_cuda_equals_cpu(inner):
    """Five steps of Grokfast around the same inner optimizer, CPU vs CUDA (fp32)."""
    builders = {
        "adamw-foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=True),
        "adamw-fused": lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
        "sgd": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
    }
    results = {}
    for device in ("cpu", CUDA):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).to(device)
        if inner == "adamw-fused" and device == "cpu" and not _cpu_fused_ok():
            pytest.skip("fused AdamW on CPU is unavailable in this torch")
        opt = grokopt.Grokfast(builders[inner](model.parameters()), alpha=0.9, lamb=2.0)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 4, generator=gen)
            opt.zero_grad()
            nn.functional.mse_loss(model(x.to(device)), y.to(device)).backward()
            opt.step()
        results[device] = [p.detach().cpu() for p in model.parameters()]
    for a, b in zip(results["cpu"], results[CUDA]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grokfast_fused_on_cuda_matches_the_formula(dtype):
    """Grokfast(fused=True) on the GPU (its flat buffer and a large kept gradient, compiled
    by torch.compile: Triton) against the EMA formula in float64 on the CPU, SGD at lr 1."""
    import grokopt.grokfast as gf

    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(s, dtype=dtype, device=CUDA))
              for s in [(300, 300), (17,), (5, 3)]]  # 360/720 KB: kept; the others: flat
    opt = grokopt.Grokfast(torch.optim.SGD(params, lr=1.0), alpha=0.9, lamb=2.0, fused=True)
    seq = _grad_sequence([tuple(p.shape) for p in params], 6, dtype)
    mu = [None] * len(params)
    for grads in seq:
        before = [p.detach().cpu().double() for p in params]
        for p, g in zip(params, grads):
            p.grad = g.to(CUDA)
        opt.step()
        for i, (p, g) in enumerate(zip(params, grads)):
            g = g.double()
            mu[i] = g.clone() if mu[i] is None else 0.9 * mu[i] + 0.1 * g
            torch.testing.assert_close(p.detach().cpu().double(), before[i] - (g + 2.0 * mu[i]),
                                       rtol=1e-5, atol=1e-5)
    assert not gf._COMPILE_FAILED, gf._COMPILE_FAILED


def _cpu_fused_ok() -> bool:
    try:
        p = nn.Parameter(torch.zeros(2))
        p.grad = torch.zeros(2)
        torch.optim.AdamW([p], fused=True).step()
        return True
    except (RuntimeError, NotImplementedError):
        return False


@pytest.mark.parametrize("fused", [False, True])
def test_gradscaler_fp16_skips_the_filter_with_the_step(fused):
    """fp16 autocast on CUDA: a step whose scaled gradients overflow is skipped whole (weights,
    Adam's state and the EMA untouched), and the next step filters the *unscaled* gradient:
    the EMA then equals the unscaled gradient exactly as a hand-written unscale would give."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8)).to(CUDA)
    opt = grokopt.Grokfast(torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused),
                           alpha=0.9, lamb=2.0)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**16)
    x, y = torch.randn(32, 16, device=CUDA), torch.randn(32, 8, device=CUDA)

    def backward(loss_scale=1.0):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = nn.functional.mse_loss(model(x), y) * loss_scale
        scaler.scale(loss).backward()

    # 1) An overflowing step: 1e6 x loss x 2^16 is beyond fp16's range in backward.
    before = [p.detach().clone() for p in model.parameters()]
    backward(loss_scale=1e6)
    scale0 = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == scale0 / 2  # the scaler saw the inf
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
    assert all(not s for s in opt.state.values())  # no filter state was created
    assert not opt.optimizer.state  # Adam never stepped

    # 2) A finite step: the EMA's first value is the unscaled gradient itself.
    backward()
    scale = scaler.get_scale()
    scaled = [p.grad.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    for p, g, b in zip(model.parameters(), scaled, before):
        ema = opt.state[p]["grokfast_ema"]
        torch.testing.assert_close(ema, g.float() / scale, rtol=1e-6, atol=0)
        assert not torch.equal(p.detach(), b)


def test_amplified_optimizer_cuda_equals_cpu_float64():
    """Two steps and one meta-step of AmplifiedOptimizer, CPU vs CUDA, in float64."""
    results = {}
    for device in ("cpu", CUDA):
        torch.manual_seed(0)  # both built on the CPU: CUDA's generator draws other numbers
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).to(device, torch.float64)
        amp = grokopt.make_amplifier((8, 8), dtype=torch.float64).to(device)
        opt = grokopt.AmplifiedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2),
                                         amplifier=amp, meta_every=2, c=0.5)
        gen = torch.Generator().manual_seed(1)
        xo = torch.randn(8, 6, generator=gen, dtype=torch.float64).to(device)
        yo = torch.randint(0, 3, (8,), generator=gen).to(device)
        ce = nn.functional.cross_entropy
        for _ in range(2):
            x = torch.randn(16, 6, generator=gen, dtype=torch.float64).to(device)
            y = torch.randint(0, 3, (16,), generator=gen).to(device)
            opt.zero_grad()
            ce(model(x), y).backward()
            opt.step()
            opt.maybe_meta_step(model, lambda f: ce(f(xo), yo), inner_loss=lambda f: ce(f(x), y))
        assert opt.meta_steps == 1
        results[device] = [t.detach().cpu() for t in [*model.parameters(), *amp.parameters()]]
    for a, b in zip(results["cpu"], results[CUDA]):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("estimator", ["exact", "vjp"])
def test_grokalign_penalty_cuda_equals_cpu_float64(estimator):
    """The penalty and its parameter gradient on CUDA equal the CPU's (float64). For the
    probe-based estimator both sides use the mean of many probes, compared with the exact
    norm's value, since the two devices draw different random numbers."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 32, bias=False), nn.ReLU(), nn.Linear(32, 5, bias=False))
    x = torch.randn(10, 12, dtype=torch.float64)
    values, grads = {}, {}
    for device in ("cpu", CUDA):
        model = _copy_to(base, device)
        kwargs = {"num_projections": 4096} if estimator == "vjp" else {}
        reg = grokopt.GrokAlignLoss(model, weight=1.0, estimator=estimator, **kwargs)
        pen = reg(x.to(device))
        (g,) = torch.autograd.grad(pen, [model[0].weight])
        values[device], grads[device] = pen.detach().cpu(), g.cpu()
    if estimator == "exact":
        torch.testing.assert_close(values[CUDA], values["cpu"], rtol=1e-10, atol=0)
        torch.testing.assert_close(grads[CUDA], grads["cpu"], rtol=1e-9, atol=1e-12)
    else:
        # 4096 probes: the sample mean of C||J^T v||^2 has relative sd about sqrt(2/4096)
        # per sample (for C=5 probes on the unit sphere it is smaller still); the sqrt
        # halves it, and 10 samples average: 5% is over 10 standard deviations.
        torch.testing.assert_close(values[CUDA], values["cpu"], rtol=5e-2, atol=0)


def _copy_to(model: nn.Module, device: str) -> nn.Module:
    import copy

    return copy.deepcopy(model).to(device, torch.float64)


def _orthograd_formula(w: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    w, g = w.double().flatten(), g.double().flatten()
    perp = g - (w @ g) / (w @ w + eps) * w
    return perp * g.norm() / (perp.norm() + eps)


@pytest.mark.parametrize("restore", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_orthograd_on_cuda_matches_the_formula(dtype, restore):
    """OrthoGrad on CUDA tensors, stacked (sizes shared) and one by one (sizes alone, and a
    matrix of 256 KiB and more), in both restore_grad modes: what the inner optimizer steps
    on, against the formula in float64 on the CPU, at three steps."""
    shapes = [(16, 8), (8, 16), (128,), (5,), (5,), (7,), (512, 256)]
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(CUDA, dtype))
              for s in shapes]
    seen = []
    inner = torch.optim.SGD(params, lr=0.1)
    inner.register_step_pre_hook(lambda o, a, k: seen.append([p.grad.cpu() for p in params]))
    opt = grokopt.OrthoGrad(inner, restore_grad=restore)
    tol = 1e-5 if dtype is torch.float32 else 2e-2
    for grads in _grad_sequence(shapes, 3, dtype=dtype, seed=1):
        for p, g in zip(params, grads):
            p.grad = g.to(CUDA)
        want = [_orthograd_formula(p.detach().cpu(), p.grad.cpu(), 1e-30).view(p.shape)
                for p in params]
        raw = [p.grad.clone() for p in params]
        opt.step()
        for got, ref in zip(seen[-1], want):
            torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)
        if restore:
            assert all(torch.equal(p.grad, r) for p, r in zip(params, raw))
