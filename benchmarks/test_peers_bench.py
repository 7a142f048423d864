"""grokopt against its peers and against the floor, side by side in one run, same device.

Run (threads pinned to 1, GROKOPT_BENCH_THREADS overrides; the peers come with the
``[bench]`` extra):

    pytest benchmarks/test_peers_bench.py --benchmark-json=benchmarks/results/peers-cpu.json

A fast wrong answer is not a result, so the ``test_agree_*`` functions (plain tests, first in
the file) check that every peer computes what ours computes wherever the maths can be made the
same, and every timed peer re-runs its check (cached) before it is timed.

Groups (each ratio is in the JSON's ``extra_info``, taken against the group's first entry):

* ``grokfast-filter/<model>``: the filter alone. ``copy-floor`` (one device copy of the
  gradient bytes; the filter reads g and mu and writes both, so about 2x this is its true
  floor), ``ours`` (:func:`grokopt.grokfast_`, foreach) and pytorch_optimizer's
  ``gradfilter_ema``.
* ``grokfast-step/<model>``: filter + AdamW step. ``adamw`` (foreach AdamW alone: the
  filter's cost is the difference), ``ours`` (``Grokfast(AdamW(foreach=True))``),
  ``po-gradfilter_ema`` (+ the same AdamW), ``po-GrokFastAdamW`` (pytorch_optimizer) and
  ``gp-GrokFastAdamW`` (grokfast_pytorch). Models: many small tensors (200 tensors, 0.42M
  parameters: per-tensor overhead dominates) and few large ones (4 x 1024x1024: bytes
  dominate).
* ``orthograd-transform/<model>``: OrthoGrad's transform alone, each way around an optimizer
  that does nothing: ``copy-floor`` (one copy of the gradient bytes), ``ours``
  (``OrthoGrad(...).step()`` in the default configuration), ``paper-loop`` (the per-parameter
  loop users copy from the paper's code, written here from its formula) and
  pytorch_optimizer's ``OrthoGrad``, by default (per tensor on CPU) and with ``foreach=True``.
  ``orthograd-step/<model>``: the same around foreach AdamW without weight decay, against
  ``adamw`` alone (also as the median of back-to-back pairs). Run alone with ``-k orthograd``
  (recorded in orthograd-cpu.json).
* ``grokalign/<model>``: a whole training step. ``floor-plain-2B`` (a plain step on a doubled
  batch: one probe costs about one more pass), ``plain``, ``ours`` (``GrokAlignLoss
  (estimator="auto").forward_with_penalty``), ``paper-vjp`` (separate forward plus a
  create_graph VJP) and ``peer-functional-jvp`` (``torch.autograd.functional.jvp``). Models:
  the GrokAlign MLP (784-196x3-10, batch 256) and the reference decoder on its embeddings
  (batch 512).
* ``neuralgrok/decoder``: 4 training steps with the meta-step after the 4th, per step.
  ``plain`` (Adam, the floor), ``ours`` (AmplifiedOptimizer, piecewise-linear path, the
  paper's recomputed g_hat) and ``paper-per-element`` (written here from the paper: the MLP
  on all P gradient entries at once, softmax per tensor).

How the peers were configured to the same maths (read from their source):

* pytorch_optimizer 4.1 ``GrokFastAdamW``: ``normalize_lr=False`` (its default divides lr by
  1 + lamb, which docs/methods.md says not to do), ``betas`` given (its default is
  (0.9, 0.99)). It filters inside step, after the decoupled decay, with mu = g on the first
  step (as ours). The one difference that cannot be configured away: Adam's denominator is
  ``max(sqrt(v_hat), eps)`` where torch's AdamW has ``sqrt(v_hat) + eps``.
* pytorch_optimizer ``gradfilter_ema``: the same filter, run outside the optimizer
  (around the same AdamW); identical maths (docs/methods.md says why ours runs inside
  step(): GradScaler and checkpointing, not a different result).
* grokfast_pytorch 0.0.11 ``GrokFastAdamW``: ``normalize_lr=False``, ``betas`` given
  (default (0.9, 0.99)); its decoupled decay is ``p *= 1 - wd`` (not scaled by lr), so it
  gets ``weight_decay = lr * wd``; its denominator is ``max(sqrt(v / (1 - beta2^t)), eps)``
  (eps as a clamp, as above, and a different rounding order). It is a per-tensor Python loop.

So the agreement checks run in float64 with ``eps=1e-30``, where clamp and add coincide, and
demand equality to 1e-12; the float32 gap at the usual ``eps=1e-8`` is recorded beside the
timings (``max_abs_diff_fp32_eps1e-8``) as information, not asserted.

GrokAlign: the estimators are random, so "the same thing" means the same probes: the paper's
VJP is fed the probes ours draws from the same seed, and the functional JVP the probes given
to ours; the checks then demand the same parameters after 5 SGD steps (float64; SGD, since
Adam maps the rounding noise of gradients that are exactly zero in exact arithmetic, as behind
a LayerNorm, to full +-lr steps). NeuralGrok: the
check uses SGD for both the model and the amplifier, because Adam's normalisation would hide
a hypergradient or amplified gradient that is off by a factor.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from _common import (
    MACHINE,
    NoStep,
    SHAPES,
    functional_jvp_penalty,
    interleaved_ratio,
    paper_vjp_penalty,
    params_with_grads,
    pin_threads,
    sync,
)
from grokopt import Grokfast, GrokAlignLoss, OrthoGrad, grokfast_
from grokopt.jacobian import jacobian_frobenius_norm
from grokopt import AmplifiedOptimizer, make_amplifier
from grokopt.tasks.models import DecoderTransformer, OmnigrokMLP

po = pytest.importorskip("pytorch_optimizer", reason="the [bench] extra is not installed")
gp = pytest.importorskip("grokfast_pytorch", reason="the [bench] extra is not installed")
from pytorch_optimizer.optimizer.grokfast import gradfilter_ema as po_gradfilter_ema  # noqa: E402

THREADS = pin_threads()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

LR, BETAS, WD, ALPHA, LAMB = 1e-3, (0.9, 0.98), 0.005, 0.98, 2.0
_FIRST: dict[str, float] = {}  # group -> median of its first (reference) entry


def _record(benchmark, group: str, ref: bool, **info) -> None:
    """Store the ratio of this entry's median to its group's reference entry's."""
    if benchmark.stats is None:  # --benchmark-disable: a smoke run, nothing was timed
        return
    median = benchmark.stats.stats.median
    if ref:
        _FIRST[group] = median
    elif group in _FIRST:
        benchmark.extra_info["ratio_to_first"] = median / _FIRST[group]
    benchmark.extra_info.update(threads=THREADS, machine=MACHINE if DEVICE == "cpu" else DEVICE,
                                **info)


# ======================================================================== Grokfast

STEP_IMPLS = ["adamw", "ours", "po-gradfilter_ema", "po-GrokFastAdamW", "gp-GrokFastAdamW"]


def _grokfast_step(impl: str, module: nn.Module, eps: float) -> Callable[[], None]:
    """One filtered AdamW step on the module's current gradients, configured to our maths."""
    params = list(module.parameters())
    adamw = functools.partial(torch.optim.AdamW, params, lr=LR, betas=BETAS, weight_decay=WD,
                              eps=eps, foreach=True)
    if impl == "adamw":
        return adamw().step
    if impl == "ours":
        return Grokfast(adamw(), alpha=ALPHA, lamb=LAMB).step
    if impl == "po-gradfilter_ema":
        opt, ema = adamw(), {}

        def run() -> None:
            po_gradfilter_ema(module, grads=ema, alpha=ALPHA, lamb=LAMB)
            opt.step()

        return run
    if impl == "po-GrokFastAdamW":
        return po.GrokFastAdamW(params, lr=LR, betas=BETAS, weight_decay=WD, eps=eps,
                                grokfast_alpha=ALPHA, grokfast_lamb=LAMB,
                                normalize_lr=False).step
    if impl == "gp-GrokFastAdamW":
        # Its decay is p *= 1 - wd (lr/init_lr = 1): hand it lr * wd.
        return gp.GrokFastAdamW(params, lr=LR, betas=BETAS, weight_decay=LR * WD, eps=eps,
                                grokfast_alpha=ALPHA, grokfast_lamb=LAMB,
                                normalize_lr=False).step
    raise ValueError(impl)


def _grokfast_run(impl: str, dtype: torch.dtype, eps: float, steps: int = 5) -> list[Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 8)).to(dtype)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 16, generator=gen, dtype=dtype),
             torch.randint(0, 8, (32,), generator=gen)) for _ in range(steps)]
    step = _grokfast_step(impl, model, eps)
    for x, y in data:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        step()
    return [p.detach().clone() for p in model.parameters()]


def _max_diff(a: list[Tensor], b: list[Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@functools.cache
def _grokfast_agreement(impl: str) -> dict[str, float]:
    ours64 = _grokfast_run("ours", torch.float64, 1e-30)
    ours32 = _grokfast_run("ours", torch.float32, 1e-8)
    return {
        "max_abs_diff_fp64_eps1e-30": _max_diff(ours64, _grokfast_run(impl, torch.float64, 1e-30)),
        "max_abs_diff_fp32_eps1e-8": _max_diff(ours32, _grokfast_run(impl, torch.float32, 1e-8)),
    }


@pytest.mark.parametrize("impl", ["po-gradfilter_ema", "po-GrokFastAdamW", "gp-GrokFastAdamW"])
def test_agree_grokfast(impl):
    """Same parameters as ours after 5 filtered AdamW steps (float64, eps=1e-30)."""
    diffs = _grokfast_agreement(impl)
    assert diffs["max_abs_diff_fp64_eps1e-30"] < 1e-12, diffs
    # Sanity only: at eps=1e-8 the clamp-vs-add gap is a few lr * eps / sqrt(v).
    assert diffs["max_abs_diff_fp32_eps1e-8"] < LR, diffs


def test_agree_grokfast_filter_alone():
    """gradfilter_ema and grokfast_ give the same filtered gradients, bit for bit."""
    module = nn.ParameterList(params_with_grads(SHAPES["small-tensors"][:6], "cpu"))
    twin = copy.deepcopy(module)
    for p, q in zip(module, twin):
        q.grad = p.grad.clone()  # deepcopy does not carry .grad
    states, ema = [{} for _ in module], {}
    for _ in range(5):
        grokfast_([p.grad for p in module], states, alpha=ALPHA, lamb=LAMB)
        po_gradfilter_ema(twin, grads=ema, alpha=ALPHA, lamb=LAMB)
    for p, q in zip(module, twin):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


def _filter_setup(model: str) -> tuple[nn.ParameterList, list[Tensor]]:
    module = nn.ParameterList(params_with_grads(SHAPES[model], DEVICE))
    return module, [p.grad.clone() for p in module]


def _restore(module: nn.ParameterList, saved: list[Tensor]) -> Callable[[], None]:
    # Untimed (pedantic setup): every call filters the same gradients, instead of gradients
    # the previous call amplified by up to (1 + lamb).
    def setup() -> None:
        torch._foreach_copy_([p.grad for p in module], saved)
        sync(DEVICE)

    return setup


@pytest.mark.parametrize("model", list(SHAPES))
@pytest.mark.parametrize("impl", ["copy-floor", "ours", "po-gradfilter_ema"])
def test_grokfast_filter(benchmark, model, impl):
    if impl == "po-gradfilter_ema":
        test_agree_grokfast_filter_alone()
    module, saved = _filter_setup(model)
    grads = [p.grad for p in module]
    if impl == "copy-floor":
        dst = [torch.empty_like(g) for g in grads]
        fn = lambda: torch._foreach_copy_(dst, grads)  # noqa: E731
    elif impl == "ours":
        states = [{} for _ in grads]
        fn = lambda: grokfast_(grads, states, alpha=ALPHA, lamb=LAMB)  # noqa: E731
    else:
        ema: dict = {}
        fn = lambda: po_gradfilter_ema(module, grads=ema, alpha=ALPHA, lamb=LAMB)  # noqa: E731

    def run() -> None:
        fn()
        sync(DEVICE)

    run()  # state allocation outside the timing
    group = f"grokfast-filter/{model}/{DEVICE}"
    benchmark.group = group
    benchmark.pedantic(run, setup=_restore(module, saved), rounds=60, warmup_rounds=3)
    _record(benchmark, group, impl == "copy-floor", n_tensors=len(grads),
            n_params=sum(g.numel() for g in grads))


@pytest.mark.parametrize("model", list(SHAPES))
@pytest.mark.parametrize("impl", STEP_IMPLS)
def test_grokfast_step(benchmark, model, impl):
    info = {}
    if impl not in ("adamw", "ours"):
        info = _grokfast_agreement(impl)
        if info["max_abs_diff_fp64_eps1e-30"] >= 1e-12:
            pytest.fail(f"{impl} disagrees with ours ({info}); not timing a wrong answer")
    module, saved = _filter_setup(model)
    step = _grokfast_step(impl, module, 1e-8)

    def run() -> None:
        step()
        sync(DEVICE)

    setup = _restore(module, saved)
    setup()
    run()
    group = f"grokfast-step/{model}/{DEVICE}"
    benchmark.group = group
    benchmark.pedantic(run, setup=setup, rounds=40, warmup_rounds=3)
    _record(benchmark, group, impl == "adamw", n_tensors=len(saved), **info)


# ======================================================================== OrthoGrad

OG_IMPLS = ["adamw", "ours", "paper-loop", "po-OrthoGrad", "po-OrthoGrad-foreach"]


def _paper_orthograd_(params: list[Tensor], eps: float = 1e-30) -> None:
    """The per-parameter loop users copy from the paper's code, written here from its
    formula: each gradient replaced in place by its rescaled orthogonal part."""
    with torch.no_grad():
        for p in params:
            if p.grad is None:
                continue
            w, g = p.view(-1), p.grad.view(-1)
            perp = g - torch.dot(w, g) / (torch.dot(w, w) + eps) * w
            p.grad.copy_((perp * (g.norm() / (perp.norm() + eps))).view_as(p.grad))


def _orthograd_step(impl: str, module: nn.Module, eps: float = 1e-8,
                    inner: str = "adamw") -> Callable[[], None]:
    """One OrthoGrad step of ``impl`` on the module's current gradients, around foreach
    AdamW without weight decay (the paper's setting), or around an optimizer that does
    nothing (``inner="none"``: the transform alone)."""
    params = list(module.parameters())

    def base() -> torch.optim.Optimizer:
        if inner == "none":
            return NoStep(params)
        if inner == "sgd":
            return torch.optim.SGD(params, lr=LR)
        return torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=0.0, eps=eps,
                                 foreach=True)

    if impl == "adamw":
        return base().step
    if impl == "ours":
        return OrthoGrad(base()).step
    if impl == "paper-loop":
        opt = base()

        def run() -> None:
            _paper_orthograd_(params)
            opt.step()

        return run
    if impl == "po-OrthoGrad":  # its default: batched on CUDA only
        return po.OrthoGrad(base()).step
    if impl == "po-OrthoGrad-foreach":
        return po.OrthoGrad(base(), foreach=True).step
    raise ValueError(impl)


def _orthograd_run(impl: str, inner: str, steps: int = 5) -> list[Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 8)).double()
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 16, generator=gen, dtype=torch.float64),
             torch.randint(0, 8, (32,), generator=gen)) for _ in range(steps)]
    step = _orthograd_step(impl, model, eps=1e-30, inner=inner)
    for x, y in data:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        step()
    return [p.detach().clone() for p in model.parameters()]


@functools.cache
def _orthograd_agreement(impl: str) -> dict[str, float]:
    # Around AdamW (the benchmark's) and around SGD, which unlike Adam does not forgive a
    # gradient off by a constant factor.
    return {"max_abs_diff_fp64": max(
        _max_diff(_orthograd_run("ours", inner), _orthograd_run(impl, inner))
        for inner in ("adamw", "sgd"))}


@pytest.mark.parametrize("impl", ["paper-loop", "po-OrthoGrad", "po-OrthoGrad-foreach"])
def test_agree_orthograd(impl):
    """Same parameters as ours after 5 steps of OrthoGrad(AdamW) and of OrthoGrad(SGD)
    (float64, eps=1e-30; pytorch_optimizer's zero for ||g_perp|| <= 4 eps_machine ||g||
    never fires here)."""
    diffs = _orthograd_agreement(impl)
    assert diffs["max_abs_diff_fp64"] < 1e-12, diffs


@pytest.mark.parametrize("model", list(SHAPES))
@pytest.mark.parametrize(("inner", "impl"), [("none", "copy-floor")]
                         + [("none", i) for i in OG_IMPLS[1:]] + [("adamw", i) for i in OG_IMPLS])
def test_orthograd_step(benchmark, model, impl, inner):
    """``inner="none"``: the transform alone, each way around an optimizer that does
    nothing, against ``copy-floor`` (in place of ``adamw``: one device copy of the gradient
    bytes; the transform reads w and g and writes its output, about 1.5x that);
    ``"adamw"``: the whole step, against foreach AdamW alone."""
    info = {}
    if impl not in ("adamw", "ours", "copy-floor"):
        info = _orthograd_agreement(impl)
        if info["max_abs_diff_fp64"] >= 1e-12:
            pytest.fail(f"{impl} disagrees with ours ({info}); not timing a wrong answer")
    module, saved = _filter_setup(model)
    if impl == "copy-floor":
        dst = [torch.empty_like(g) for g in saved]
        step = functools.partial(torch._foreach_copy_, dst, [p.grad for p in module])
    else:
        step = _orthograd_step(impl, module, inner=inner)

    def run() -> None:
        step()
        sync(DEVICE)

    setup = _restore(module, saved)  # the loop and the peer write into the gradients
    setup()
    run()
    group = f"orthograd-{'transform' if inner == 'none' else 'step'}/{model}/{DEVICE}"
    benchmark.group = group
    benchmark.pedantic(run, setup=setup, rounds=40, warmup_rounds=3)
    _record(benchmark, group, impl in ("adamw", "copy-floor"), n_tensors=len(saved), **info)
    if impl != "adamw" and inner == "adamw" and benchmark.stats is not None:
        # Back-to-back pairs with AdamW alone, the order alternating (the transform's work
        # does not depend on the gradients' values, so no restore is needed between calls).
        base = _orthograd_step("adamw", _filter_setup(model)[0])
        benchmark.extra_info["ratio_to_adamw_interleaved_median"] = interleaved_ratio(
            run, lambda: (base(), sync(DEVICE)), pairs=40, steps=3)


# ======================================================================== GrokAlign

GA_LAMBDA = 1e-3
GA_MODELS = {"omnigrok-mlp": 256, "decoder": 512}  # batch sizes of the papers' runs


def _ga_setup(kind: str, batch: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    """(model, penalty-input maker, logits fn, targets) for a batch of ``batch``."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    if kind == "omnigrok-mlp":
        model = OmnigrokMLP(784, (196, 196, 196), 10, init_scale=8.0).to(dtype)
        x = torch.rand(batch, 784, generator=gen, dtype=dtype)
        y = torch.randint(0, 10, (batch,), generator=gen)
        inputs, fn = (lambda: x), model.net  # the bare Sequential: our piecewise-linear path
    else:
        model = DecoderTransformer(99, 99).to(dtype)
        a = torch.randint(0, 97, (batch,), generator=gen)
        b = torch.randint(1, 97, (batch,), generator=gen)
        tokens = torch.stack([a, torch.full_like(a, 97), b, torch.full_like(a, 98)], 1)
        y = (a * b) % 97
        inputs, fn = (lambda: model.embed(tokens)), model.forward_embeddings
    model.to(DEVICE)
    return model, inputs, fn, y.to(DEVICE)


def _ga_step(impl: str, model: nn.Module, inputs, fn, y, opt, gen=None) -> Callable[[], None]:
    """One AdamW training step of ``impl``; probes from ``gen`` where the check needs them."""
    if impl == "ours":
        reg = GrokAlignLoss(fn, GA_LAMBDA, estimator="auto", generator=gen)
        penalised = reg.forward_with_penalty
    elif impl == "ours-vjp":
        reg = GrokAlignLoss(fn, GA_LAMBDA, estimator="vjp", generator=gen)
        penalised = reg.forward_with_penalty
    elif impl == "paper-vjp":
        # The same stream ours draws from: (k=1, *out) standard normals, then unit rows.
        def draw(out: Tensor) -> Tensor:
            z = torch.empty((1, *out.shape), dtype=out.dtype, device=gen.device)
            return z.normal_(generator=gen)[0].to(out.device)

        def penalised(x: Tensor) -> tuple[Tensor, Tensor]:
            logits, pen = paper_vjp_penalty(fn, x, None if gen is None else draw)
            return logits, GA_LAMBDA * pen
    elif impl in ("ours-jvp", "peer-functional-jvp"):

        def penalised(x: Tensor) -> tuple[Tensor, Tensor]:
            u = None if gen is None else torch.randn(x.shape, generator=gen, dtype=x.dtype)
            if impl == "peer-functional-jvp":
                logits, pen = functional_jvp_penalty(fn, x, u)
            else:
                est = jacobian_frobenius_norm(fn, x, estimator="jvp", probes=u[None])
                logits, pen = est.outputs, est.norms.mean()
            return logits, GA_LAMBDA * pen
    elif impl in ("plain", "floor-plain-2B"):
        penalised = lambda x: (fn(x), 0.0)  # noqa: E731
    else:
        raise ValueError(impl)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        logits, pen = penalised(inputs())
        (F.cross_entropy(logits, y) + pen).backward()
        opt.step()
        sync(DEVICE)

    return step


def _ga_run(kind: str, impl: str, steps: int = 5) -> list[Tensor]:
    model, inputs, fn, y = _ga_setup(kind, 16, torch.float64)
    if kind == "decoder":
        # Frozen embedding table: ours differentiates the penalty through x = embed(tokens)
        # into the table too (the total derivative), the paper's way detaches x and gives the
        # table the task gradient only. Only the rest is comparable.
        model.tok.weight.requires_grad_(False)
    # SGD, not Adam: the decoder's LayerNorms make some gradients zero in exact arithmetic
    # and +-1e-17 in floating point, which Adam turns into full +-lr steps in any two
    # implementations; SGD keeps rounding at rounding size.
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    step = _ga_step(impl, model, inputs, fn, y, opt, torch.Generator().manual_seed(7))
    for _ in range(steps):
        step()
    return [p.detach().clone() for p in model.parameters()]


@functools.cache
def _ga_agreement(kind: str, impl: str) -> float:
    ours = {"paper-vjp": "ours-vjp", "peer-functional-jvp": "ours-jvp"}[impl]
    return _max_diff(_ga_run(kind, ours), _ga_run(kind, impl))


# torch 2.13 (CPU) differentiates LayerNorm's forward-mode (JVP) formula wrongly w.r.t. the
# parameters feeding it: for Linear -> LayerNorm, d/dtheta ||J u||^2 by reverse-over-forward
# disagrees with central finite differences by 1.5-5x, while the create_graph VJP agrees.
# On the decoder autograd.functional.jvp gives wrong penalty gradients, and ours refuses
# estimator="jvp" on LayerNorm models (ValueError), so the two cannot be compared and the
# peer is not timed. Ours with estimator="auto" takes the VJP on the decoder (checked exact
# against the paper's way above). strict: this starts failing once torch is fixed and the
# guard in grokopt.jacobian is lifted (tests/test_jacobian.py pins the torch bug itself).
_JVP_LAYERNORM_BUG = pytest.mark.xfail(
    strict=True, reason="torch 2.13: reverse-over-forward through LayerNorm is wrong")


@pytest.mark.parametrize("kind", list(GA_MODELS))
@pytest.mark.parametrize("impl", [
    "paper-vjp",
    "peer-functional-jvp",
])
def test_agree_grokalign(kind, impl, request):
    if kind == "decoder" and impl == "peer-functional-jvp":
        request.applymarker(_JVP_LAYERNORM_BUG)
    """Same probes -> same parameters after 5 SGD steps (float64)."""
    assert _ga_agreement(kind, impl) < 1e-10


@pytest.mark.parametrize("kind", list(GA_MODELS))
@pytest.mark.parametrize("impl", ["floor-plain-2B", "plain", "ours", "paper-vjp",
                                  "peer-functional-jvp"])
def test_grokalign_step(benchmark, kind, impl):
    info = {}
    if kind == "decoder" and impl == "peer-functional-jvp":
        pytest.skip("wrong penalty gradients through LayerNorm in torch 2.13 (see "
                    "test_agree_grokalign): a fast wrong answer is not a result")
    if impl in ("paper-vjp", "peer-functional-jvp"):
        info["agreement_max_abs_diff_fp64"] = diff = _ga_agreement(kind, impl)
        if diff >= 1e-10:
            pytest.fail(f"{impl} disagrees with ours on {kind} ({diff}); not timing it")
    batch = GA_MODELS[kind] * (2 if impl == "floor-plain-2B" else 1)
    model, inputs, fn, y = _ga_setup(kind, batch)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    step = _ga_step(impl, model, inputs, fn, y, opt,
                    torch.Generator(device=DEVICE).manual_seed(3) if impl == "ours" else None)
    group = f"grokalign/{kind}-b{GA_MODELS[kind]}/{DEVICE}"
    benchmark.group = group
    rounds = 30 if kind == "omnigrok-mlp" else 8
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=2)
    if benchmark.stats is None:  # --benchmark-disable
        return
    if impl == "plain":
        _FIRST[group + "/plain"] = benchmark.stats.stats.median
    elif group + "/plain" in _FIRST:
        info["ratio_to_plain"] = benchmark.stats.stats.median / _FIRST[group + "/plain"]
    _record(benchmark, group, impl == "floor-plain-2B", batch=batch, **info)


# ======================================================================== NeuralGrok


class PaperAmplified:
    """NeuralGrok the reference way, written from the paper (docs/methods.md).

    step(): the amplifier MLP on all P gradient entries at once (P x sum(hidden)
    activations), softmax over each tensor's entries, ``c * w*g / ||w*g||``, then the base
    optimizer. meta_step(): g_hat = the inner loss's gradient at the current parameters,
    lookahead ``theta - lr * G_phi(g_hat)`` with the graph to phi, outer loss through
    ``functional_call``, backward into the amplifier, one meta-optimizer step.
    """

    def __init__(self, model: nn.Module, base: torch.optim.Optimizer, amplifier: nn.Module,
                 meta_opt: torch.optim.Optimizer, c: float = 1.0) -> None:
        self.model, self.base, self.amp, self.meta_opt, self.c = model, base, amplifier, meta_opt, c
        self.params = [p for g in base.param_groups for p in g["params"]]
        self.lr = base.param_groups[0]["lr"]

    def transform(self, grads: list[Tensor]) -> list[Tensor]:
        flat = torch.cat([g.reshape(-1) for g in grads])
        f = self.amp(flat[:, None]).squeeze(1)
        out = []
        for g, fi in zip(grads, f.split([g.numel() for g in grads])):
            u = torch.softmax(fi, 0) * g.reshape(-1)
            out.append((self.c * u / u.norm()).view_as(g))
        return out

    def step(self) -> None:
        with torch.no_grad():
            new = self.transform([p.grad for p in self.params])
            for p, g in zip(self.params, new):
                p.grad.copy_(g)
        self.base.step()

    def meta_step(self, inner: Callable[[nn.Module], Tensor],
                  outer: Callable[[Callable[..., Tensor]], Tensor]) -> None:
        g_hat = torch.autograd.grad(inner(self.model), self.params)
        moved = self.transform([g.detach() for g in g_hat])
        names = {id(p): n for n, p in self.model.named_parameters()}
        look = {names[id(p)]: p.detach() - self.lr * m for p, m in zip(self.params, moved)}
        loss = outer(lambda *a: torch.func.functional_call(self.model, look, a))
        self.meta_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.meta_opt.step()


def _ng_trainer(impl: str, model: nn.Module, batches, outer, *, check: bool):
    """A ``step(i)`` closure: training step i (1-based), meta-step when i % 4 == 0."""
    x_out, y_out = outer
    ce = F.cross_entropy
    dtype = next(model.parameters()).dtype
    if check:  # SGD everywhere: Adam's normalisation would hide a wrong magnitude
        base = torch.optim.SGD(model.parameters(), lr=0.1)
    else:
        base = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=1e-3)
    if impl == "plain":
        opt = base
    else:
        torch.manual_seed(123)  # the same amplifier for ours and the paper's way
        amp = make_amplifier((128, 128), device=DEVICE, dtype=dtype)
        meta = (torch.optim.SGD(amp.parameters(), lr=0.05) if check else
                torch.optim.Adam(amp.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=1e-3))
        if impl == "ours":
            # eps=0 in the check: the paper's norm has none (1e-12 would shift a tensor
            # whose ||w*g|| is small by more than the float64 tolerance).
            opt = AmplifiedOptimizer(base, amplifier=amp, meta_optimizer=meta, meta_every=4,
                                     eps=0.0 if check else 1e-12)
        else:
            opt = PaperAmplified(model, base, amp, meta)

    def step(i: int) -> None:
        x, y = batches[i % len(batches)]
        model.zero_grad(set_to_none=True)
        ce(model(x), y).backward()
        opt.step()
        if impl == "ours":
            opt.maybe_meta_step(model, lambda fwd: ce(fwd(x_out), y_out),
                                inner_loss=lambda m: ce(m(x), y))
        elif impl == "paper-per-element" and i % 4 == 0:
            opt.meta_step(lambda m: ce(m(x), y), lambda fwd: ce(fwd(x_out), y_out))

    return step, (None if impl == "plain" else amp)


def _modular(batch: int, gen: torch.Generator, p: int = 97) -> tuple[Tensor, Tensor]:
    a = torch.randint(0, p, (batch,), generator=gen)
    b = torch.randint(1, p, (batch,), generator=gen)
    tokens = torch.stack([a, torch.full_like(a, p), b, torch.full_like(a, p + 1)], 1)
    return tokens.to(DEVICE), ((a * b) % p).to(DEVICE)


@functools.cache
def _ng_agreement() -> dict[str, float]:
    runs = {}
    for impl in ("ours", "paper-per-element"):
        torch.manual_seed(0)
        model = DecoderTransformer(13, 13, dim=16, heads=2, layers=1).to(DEVICE, torch.float64)
        gen = torch.Generator().manual_seed(1)
        batches = [_modular(32, gen, 11) for _ in range(4)]
        outer = _modular(8, gen, 11)
        step, amp = _ng_trainer(impl, model, batches, outer, check=True)
        for i in range(1, 6):  # 5 steps, the meta-step after the 4th
            step(i)
        runs[impl] = ([p.detach().clone() for p in model.parameters()],
                      [p.detach().clone() for p in amp.parameters()])
    (m1, a1), (m2, a2) = runs["ours"], runs["paper-per-element"]
    return {"model_max_abs_diff_fp64": _max_diff(m1, m2),
            "amplifier_max_abs_diff_fp64": _max_diff(a1, a2)}


def test_agree_neuralgrok():
    """Ours (piecewise-linear lookup) and the paper's per-element MLP: same model and same
    amplifier after 5 steps with a meta-step (float64, SGD for both)."""
    diffs = _ng_agreement()
    assert diffs["model_max_abs_diff_fp64"] < 1e-10, diffs
    assert diffs["amplifier_max_abs_diff_fp64"] < 1e-10, diffs


@pytest.mark.parametrize("impl", ["plain", "ours", "paper-per-element"])
def test_neuralgrok_step(benchmark, impl):
    info = {}
    if impl == "paper-per-element":
        info = _ng_agreement()
        if max(info.values()) >= 1e-10:
            pytest.fail(f"the paper's way disagrees with ours ({info}); not timing it")
    torch.manual_seed(0)
    model = DecoderTransformer(99, 99).to(DEVICE)
    gen = torch.Generator().manual_seed(1)
    batches = [_modular(512, gen) for _ in range(4)]
    outer = _modular(93, gen)  # 1% of the 9,312 equations, as in the paper's split
    step, _ = _ng_trainer(impl, model, batches, outer, check=False)
    counter = [0]

    def four_steps() -> None:
        for _ in range(4):
            counter[0] += 1
            step(counter[0])
        sync(DEVICE)

    group = f"neuralgrok/decoder-422784-b512/{DEVICE}"
    benchmark.group = group
    rounds = 3 if impl == "paper-per-element" else 6
    benchmark.pedantic(four_steps, rounds=rounds, warmup_rounds=1)
    _record(benchmark, group, impl == "plain", steps_per_round=4, meta_every=4, **info)
    if benchmark.stats is not None:
        benchmark.extra_info["seconds_per_step_median"] = benchmark.stats.stats.median / 4

