"""Cost of NeuralGrok per training step, and the amplifier's memory at 50M parameters.

(a) On the paper's decoder (422,784 parameters, batch 512, 4 tokens, 93 held-out examples
as the outer batch: 1% of the 9,312 equations), one round = 4 training steps and the
meta-step due after the 4th (meta_every=4), averaged per step, in one benchmark group:

- ``adam``: plain Adam (lr 1e-3, betas (0.9, 0.98), weight decay 1e-3), the denominator;
- ``ours-recompute``: AmplifiedOptimizer, piecewise-linear path, the paper's g_hat
  (one extra forward/backward per meta-step);
- ``ours-last``: the same with g_hat="last" (no extra backward);
- ``paper-per-element``: the MLP on every gradient entry, all at once, as the reference
  code does (path="exact", chunk_size=None), paper's g_hat.

Each non-Adam result carries ``ratio_to_adam`` (two means) in its extra_info; ours also
``ratio_to_adam_interleaved_median`` (rounds of each back to back, the order alternating: the
figure the README quotes, robust to a shared machine's load).

(b) The transform alone, G_phi of the decoder's 422,784 gradient entries (29 tensors, from
one forward and backward at batch 512; no grad mode, as in step()), default amplifier:

- ``ours``: the default on a CPU (the table's piece of 0 found by comparisons, only the
  entries off it binary-searched; per-segment kernels in buckets);
- ``search-every-entry``: the same with ``amplifier.CENTRE_SPLIT = False`` and
  ``gphi.SEGMENT_KERNELS = False``, the way the GPU takes and every device took before;
- ``floor-exp-and-copy``: one exponential and one copy of the entries (multi-tensor), the
  least any G_phi does (it takes an exp of every entry and writes an output).

``ours`` carries ``ratio_to_search_every_entry_interleaved_median`` and both non-floor rows
``ratio_to_floor`` (means).

(c) 50M parameters (50 tensors of 1000 x 1000): peak extra resident memory of step()'s
transform and of one meta-step, measured in a fresh subprocess as VmHWM minus the resident
size before (the peak is reset through /proc/self/clear_refs); the paper's way is estimated
as P x sum(hidden) x 4 bytes of activations (it cannot run in this machine's memory).

Threads: GROKOPT_BENCH_THREADS (default 1: on a shared 2-core machine, two threads wait on
each other and make every elementwise kernel 10-20x slower).

Run: pytest benchmarks/test_neuralgrok_bench.py --benchmark-json=benchmarks/results/<name>.json
(recorded: (a) and (c) in neuralgrok-cpu.json, (b) alone with ``-k transform`` in
neuralgrok-transform-cpu.json)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from _common import MEMORY_PROBE, THREADS, interleaved_ratio
from grokopt import AmplifiedOptimizer, amplifier, amplify_gradients, gphi, make_amplifier

P_LARGE = 50 * 1000 * 1000
HIDDEN = (128, 128)
_MEANS: dict[str, float] = {}


def _decoder() -> nn.Module:
    try:
        from grokopt.tasks.models import DecoderTransformer

        model = DecoderTransformer(vocab_size=99, num_classes=99)
    except ImportError:  # the task models are optional for this benchmark
        pytest.skip("grokopt.tasks.models.DecoderTransformer is not available")
    assert sum(p.numel() for p in model.parameters()) == 422_784
    return model


def _data(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.randint(0, 97, (512,), generator=gen)
    b = torch.randint(1, 97, (512,), generator=gen)
    tokens = torch.stack([a, torch.full_like(a, 97), b, torch.full_like(a, 98)], 1)
    return tokens, (a + b) % 97


def _four_steps(impl: str):
    """One round for ``impl``: 4 training steps and the meta-step due after the 4th, on its
    own seeded decoder, optimizer and data."""
    torch.manual_seed(0)
    model = _decoder()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=1e-3)
    if impl != "adam":
        opt = AmplifiedOptimizer(
            opt, hidden=HIDDEN, meta_every=4,
            g_hat="last" if impl == "ours-last" else "recompute",
            path="exact" if impl == "paper-per-element" else "pwl",
            chunk_size=None if impl == "paper-per-element" else 1 << 18,
        )
    gen = torch.Generator().manual_seed(1)
    batches = [_data(gen) for _ in range(4)]
    x_out, y_out = _data(gen)
    x_out, y_out = x_out[:93], y_out[:93]
    ce = nn.functional.cross_entropy

    def four_steps():
        for x, y in batches:
            opt.zero_grad()
            ce(model(x), y).backward()
            opt.step()
            if impl != "adam":
                opt.maybe_meta_step(
                    model, lambda fwd: ce(fwd(x_out), y_out),
                    None if impl == "ours-last" else (lambda m: ce(m(x), y)),
                )

    return four_steps


@pytest.mark.parametrize(
    "impl", ["adam", "ours-recompute", "ours-last", "paper-per-element"]
)
def test_training_step(benchmark, impl):
    torch.set_num_threads(THREADS)
    four_steps = _four_steps(impl)
    benchmark.group = "neuralgrok/decoder-422784/batch-512/cpu"
    benchmark.extra_info.update(threads=THREADS, steps_per_round=4, meta_every=4,
                                machine="2-core x86-64 CPU, no GPU")
    rounds = 2 if impl == "paper-per-element" else 8
    benchmark.pedantic(four_steps, rounds=rounds, iterations=1, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: a smoke run, nothing was timed
        return
    mean = benchmark.stats.stats.mean / 4
    _MEANS[impl] = mean
    benchmark.extra_info["seconds_per_step"] = mean
    if impl != "adam" and "adam" in _MEANS:
        benchmark.extra_info["ratio_to_adam"] = mean / _MEANS["adam"]
    if impl in ("ours-recompute", "ours-last"):
        # The ratio the README quotes: rounds of Adam and of ours back to back, the order
        # alternating, robust to the machine's load (two means taken apart are not).
        adam = _four_steps("adam")
        adam(), four_steps()  # warm both
        benchmark.extra_info["ratio_to_adam_interleaved_median"] = interleaved_ratio(
            four_steps, adam, pairs=12, steps=1)


def _decoder_grads() -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = _decoder()
    x, y = _data(torch.Generator().manual_seed(1))
    nn.functional.cross_entropy(model(x), y).backward()
    return [p.grad for p in model.parameters()]


def _transform(impl: str, grads: list[torch.Tensor]):
    """One call of ``impl`` on ``grads`` (see the module docstring, (b))."""
    torch.manual_seed(0)
    amp = make_amplifier(HIDDEN)
    if impl == "floor-exp-and-copy":
        return lambda: torch._foreach_copy_([torch.empty_like(g) for g in grads],
                                            torch._foreach_exp(grads))
    split = None if impl == "ours" else False

    @torch.no_grad()
    def run():
        saved = amplifier.CENTRE_SPLIT, gphi.SEGMENT_KERNELS
        amplifier.CENTRE_SPLIT = gphi.SEGMENT_KERNELS = split
        try:
            amplify_gradients(grads, amp)
        finally:
            amplifier.CENTRE_SPLIT, gphi.SEGMENT_KERNELS = saved

    return run


@pytest.mark.parametrize("impl", ["floor-exp-and-copy", "search-every-entry", "ours"])
def test_transform(benchmark, impl):
    torch.set_num_threads(THREADS)
    grads = _decoder_grads()
    run = _transform(impl, grads)
    benchmark.group = "neuralgrok/transform-decoder-422784/cpu"
    benchmark.extra_info.update(threads=THREADS, entries=sum(g.numel() for g in grads),
                                tensors=len(grads), machine="2-core x86-64 CPU, no GPU")
    benchmark.pedantic(run, rounds=60, iterations=1, warmup_rounds=5)
    if benchmark.stats is None:  # --benchmark-disable: a smoke run, nothing was timed
        return
    _MEANS["transform/" + impl] = benchmark.stats.stats.mean
    floor = _MEANS.get("transform/floor-exp-and-copy")
    if impl != "floor-exp-and-copy" and floor:
        benchmark.extra_info["ratio_to_floor"] = benchmark.stats.stats.mean / floor
    if impl == "ours":
        benchmark.extra_info["ratio_to_search_every_entry_interleaved_median"] = interleaved_ratio(
            run, _transform("search-every-entry", grads), pairs=40, steps=5)


_MEMORY_SCRIPT = MEMORY_PROBE + textwrap.dedent(
    """
    import json, sys, torch
    from torch import nn
    from grokopt import AmplifiedOptimizer, amplify_gradients

    torch.set_num_threads(int(sys.argv[1]))

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(1000, 1000, bias=False) for _ in range(50)])
    opt = AmplifiedOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3), g_hat="last")
    x = torch.randn(8, 1000)
    model(x).pow(2).mean().backward()
    for p in model.parameters():
        p.grad.mul_(1e3)  # realistic spread of gradient magnitudes is not needed for memory
    out = {"params": sum(p.numel() for p in model.parameters())}
    opt.step()  # warm-up: allocator pools, last_grad buffers
    before = reset_peak()
    opt.step()
    out["step_peak_extra_bytes"] = rss("VmHWM") - before
    outer = lambda fwd: fwd(x).pow(2).mean()
    before = reset_peak()
    opt.meta_step(model, outer)
    out["meta_step_peak_extra_bytes"] = rss("VmHWM") - before
    print(json.dumps(out))
    """
)


def test_amplifier_memory_50m(benchmark):
    """Extra resident memory of step() and of a meta-step at 50M parameters."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc to reset the peak resident size")
    result = {}

    def measure():
        proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(THREADS)],
                              capture_output=True, text=True, check=True)
        result.update(json.loads(proc.stdout.strip().splitlines()[-1]))

    benchmark.group = "neuralgrok/memory-50M/cpu"
    benchmark.pedantic(measure, rounds=1, iterations=1)
    p = result["params"]
    paper = p * sum(HIDDEN) * 4  # one fp32 activation per hidden unit per gradient entry
    benchmark.extra_info.update(
        params=p,
        step_peak_extra_gb=result["step_peak_extra_bytes"] / 1e9,
        meta_step_peak_extra_gb=result["meta_step_peak_extra_bytes"] / 1e9,
        meta_step_lookahead_params_gb=p * 4 / 1e9,
        paper_per_element_activations_estimate_gb=paper / 1e9,
        machine="2-core x86-64 CPU, no GPU",
    )
