"""Cost of the Grokfast filter per step, side by side in one run.

Two models: (a) ~200 small tensors (where per-tensor Python overhead dominates) and
(b) a few large tensors (where bytes moved dominate). For each, in one benchmark group:

- ``default``: what a user gets: ``Grokfast(...).step()`` in its default configuration
  (inf/NaN screen on, ``restore_grad``) around an inner optimizer whose step does nothing,
  so that only the wrapper's work is timed;
- ``fused``: the same with ``fused=True`` (the steady step's kernels compiled by
  torch.compile; compiled in the warm-up, outside the timing);
- ``foreach``: grokopt's multi-tensor path (the functional ``grokfast_``, no screen);
- ``reference``: grokopt's per-tensor reference path;
- ``loop``: the per-parameter Python loop users copy from the paper's scripts (written here
  from the formula: a dict of EMAs keyed by name, two tensor ops per parameter);
- ``inplace-loop``: the loop a careful user writes by hand (``mu.lerp_(g, 1 - alpha);
  g.add_(mu, alpha=lamb)``, no allocation);
- ``copy-floor``: copying the same bytes once (the filter must at least read g and mu and
  write mu and g, so its floor is about two such copies).

And the whole optimizer step: foreach AdamW bare vs wrapped in Grokfast (default, and
``fused=True``), and the floor of any filter there: ``inplace-foreach-adamw``, the EMA as
two multi-tensor kernels written straight into the gradients (no screen, nothing given
back) before the same AdamW.

On a GPU a third layout, 4 x 4096^2, gives the filter's bandwidth (benchmarks/cuda.sh).

Run: pytest benchmarks/test_grokfast_bench.py --benchmark-json=benchmarks/results/<name>.json
"""

from __future__ import annotations

import pytest
import torch

from _common import DEVICES, NoStep, interleaved_ratio, layouts
from _common import params_with_grads as _params
from _common import sync as _sync
from grokopt import Grokfast, grokfast_


CASES = [(d, m) for d in DEVICES for m in layouts(d)]


def _inplace_loop(grads, mus, alpha=0.98, lamb=2.0):
    for g, mu in zip(grads, mus):
        mu.lerp_(g, 1 - alpha)
        g.add_(mu, alpha=lamb)


def _paper_loop(named_grads, ema, alpha=0.98, lamb=2.0):
    for name, g in named_grads:
        if name not in ema:
            ema[name] = g.detach().clone()
        ema[name] = ema[name] * alpha + g.detach() * (1 - alpha)
        g.copy_(g + ema[name] * lamb)


@pytest.mark.parametrize(("device", "model"), CASES)
@pytest.mark.parametrize("impl", ["default", "fused", "foreach", "reference", "loop",
                                  "inplace-loop", "copy-floor"])
def test_filter(benchmark, device, model, impl):
    params = _params(layouts(device)[model], device)
    grads = [p.grad for p in params]
    benchmark.group = f"filter/{model}/{device}"
    benchmark.extra_info.update(n_tensors=len(grads), n_params=sum(g.numel() for g in grads))
    if impl == "loop":
        ema: dict = {}
        named = list(enumerate(grads))

        def run():
            _paper_loop(named, ema)
            _sync(device)
    elif impl == "inplace-loop":
        mus = [g.clone() for g in grads]

        def run():
            _inplace_loop(grads, mus)
            _sync(device)
    elif impl in ("default", "fused"):
        opt = Grokfast(NoStep(params), fused=impl == "fused")
        opt.step()  # the general path, which plans the steady one (compiled on its 1st run)

        def run():
            opt.step()
            _sync(device)
    elif impl == "copy-floor":
        dst = [torch.empty_like(g) for g in grads]

        def run():
            torch._foreach_copy_(dst, grads)
            _sync(device)
    else:
        states = [{} for _ in grads]
        foreach = impl == "foreach"

        def run():
            grokfast_(grads, states, foreach=foreach)
            _sync(device)

    run()  # allocate state outside the timing
    benchmark.pedantic(run, rounds=30, iterations=5, warmup_rounds=2)


def _step_fn(impl: str, device: str, model: str):
    params = _params(layouts(device)[model], device)
    opt = torch.optim.AdamW(params, lr=1e-6, foreach=True)
    if impl == "inplace-foreach-adamw":
        # The floor of any EMA filter before AdamW: two multi-tensor kernels writing into
        # the gradients, no screen, no gradients given back, no wrapper.
        grads = [p.grad for p in params]
        mus = [g.clone() for g in grads]

        def run():
            torch._foreach_lerp_(mus, grads, 0.02)
            torch._foreach_add_(grads, mus, alpha=2.0)
            opt.step()
            _sync(device)

        run()
        return run
    if impl != "adamw":
        opt = Grokfast(opt, fused=impl == "grokfast-fused-adamw")
        opt.step()  # the general path, which plans the steady one (compiled on its 1st run)

    def run():
        opt.step()
        _sync(device)

    run()
    return run


@pytest.mark.parametrize(("device", "model"), CASES)
@pytest.mark.parametrize("impl", ["adamw", "grokfast-adamw", "grokfast-fused-adamw",
                                  "inplace-foreach-adamw"])
def test_step(benchmark, device, model, impl):
    run = _step_fn(impl, device, model)
    benchmark.group = f"step/{model}/{device}"
    benchmark.pedantic(run, rounds=30, iterations=5, warmup_rounds=2)
    if impl != "adamw":
        # The ratio the README quotes: robust to the machine's load, unlike two means
        # taken seconds apart.
        benchmark.extra_info["ratio_to_adamw_interleaved_median"] = interleaved_ratio(
            run, _step_fn("adamw", device, model))
