"""GrokAlign cost: one training step with the regulariser divided by a plain training step.

Run (the default addopts deselect nothing here; pass the path explicitly):

    pytest benchmarks/test_grokalign_bench.py --benchmark-json=benchmarks/results/grokalign-cpu.json

Each group holds a plain step and the GrokAlign variants measured in the same run, so the
ratios are read side by side (divide each mean by its group's "plain"):

* ours_default: ``GrokAlignLoss(...).forward_with_penalty`` at the default estimator (the
  paper's unit output probes; on the MLP ``J^T v`` goes down the masks of the one forward);
* ours_jvp: ``estimator="jvp"`` (forward mode, Gaussian input probes: another distribution,
  an option; MLP only, the transformer has layer norm);
* paper: the reference way, a separate forward plus a reverse-mode VJP with ``create_graph``;
* peer: ``torch.autograd.functional.jvp(create_graph=True)``;
* exact: ``estimator="exact"`` vs a loop of ``torch.autograd.functional.jacobian`` per sample.

Threads are pinned to 1 (``GROKOPT_BENCH_THREADS`` overrides): on a shared 2-core machine
the default OpenMP spin-waiting turns contention into 10x noise. Each result's extra_info
holds the 1-minute load average before and after it ran: other jobs share the machine.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _common import functional_jvp_penalty, paper_vjp_penalty, pin_threads
from grokopt.grokalign import GrokAlignLoss

pin_threads()

LAMBDA = 1e-3
B = 256


def paper_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 196, bias=False), nn.ReLU(),
        nn.Linear(196, 196, bias=False), nn.ReLU(),
        nn.Linear(196, 196, bias=False), nn.ReLU(),
        nn.Linear(196, 10, bias=False),
    )
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(8.0)
    return net


class TinyTransformer(nn.Module):
    """Grokking-style: 2 pre-norm layers, width 128, 4 heads, 4 tokens, logits at the last."""

    def __init__(self, vocab: int = 99, width: int = 128, tokens: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(0.02 * torch.randn(tokens, width))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(2)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab - 2)

    def from_embeddings(self, e: torch.Tensor) -> torch.Tensor:
        h = e + self.pos
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h)[:, -1])


def _setup(kind: str):
    if kind == "mlp":
        model = paper_mlp()
        x = torch.rand(B, 1, 28, 28)
        y = torch.randint(0, 10, (B,))
        params = list(model.parameters())
        inputs = lambda: x  # noqa: E731
        fn = model
    else:
        net = TinyTransformer()
        tokens = torch.randint(0, 99, (B, 4))
        y = torch.randint(0, 97, (B,))
        params = list(net.parameters())
        inputs = lambda: net.embed(tokens)  # noqa: E731
        fn = net.from_embeddings
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    return fn, inputs, y, opt


def _steps(kind: str):
    fn, inputs, y, opt = _setup(kind)
    reg = GrokAlignLoss(fn, LAMBDA, generator=torch.Generator().manual_seed(0))
    fwd = GrokAlignLoss(fn, LAMBDA, estimator="jvp", generator=torch.Generator().manual_seed(0))
    exact = GrokAlignLoss(fn, LAMBDA, estimator="exact")

    def plain():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(fn(inputs()), y).backward()
        opt.step()

    def ours():
        opt.zero_grad(set_to_none=True)
        logits, pen = reg.forward_with_penalty(inputs())
        (F.cross_entropy(logits, y) + pen).backward()
        opt.step()

    def ours_jvp():
        opt.zero_grad(set_to_none=True)
        logits, pen = fwd.forward_with_penalty(inputs())
        (F.cross_entropy(logits, y) + pen).backward()
        opt.step()

    def paper():
        # The reference code: a task forward, then a second forward with x requiring grad
        # and a double-backward VJP (math attention: fused kernels have no double backward).
        opt.zero_grad(set_to_none=True)
        logits, pen = paper_vjp_penalty(fn, inputs())
        (F.cross_entropy(logits, y) + LAMBDA * pen).backward()
        opt.step()

    def peer_jvp():
        opt.zero_grad(set_to_none=True)
        logits, pen = functional_jvp_penalty(fn, inputs())
        (F.cross_entropy(logits, y) + LAMBDA * pen).backward()
        opt.step()

    def ours_exact():
        opt.zero_grad(set_to_none=True)
        logits, pen = exact.forward_with_penalty(inputs())
        (F.cross_entropy(logits, y) + pen).backward()
        opt.step()

    def loop_exact():
        opt.zero_grad(set_to_none=True)
        x = inputs()
        logits = fn(x)
        norms = []
        for b in range(x.shape[0]):
            J = torch.autograd.functional.jacobian(lambda v: fn(v.unsqueeze(0)).squeeze(0), x[b], create_graph=True)
            norms.append(J.pow(2).sum().clamp_min(1e-8).sqrt())
        (F.cross_entropy(logits, y) + LAMBDA * torch.stack(norms).mean()).backward()
        opt.step()

    return {
        "plain": plain,
        "ours_default": ours,
        "ours_jvp": ours_jvp,
        "paper_vjp": paper,
        "peer_autograd_functional_jvp": peer_jvp,
        "ours_exact": ours_exact,
        "loop_exact": loop_exact,
    }


STEP_VARIANTS = ["plain", "ours_default", "paper_vjp", "peer_autograd_functional_jvp"]


def _interleaved_ratio(steps, variant: str, pairs: int) -> float:
    """Median over pairs of (variant time / plain time), each pair run back to back, so a
    load change on the shared machine hits both sides of a ratio alike. The order within
    a pair alternates, since the second step of a pair can run slower (caches, turbo)."""
    import time

    def timed(name: str) -> float:
        t0 = time.perf_counter()
        steps[name]()
        return time.perf_counter() - t0

    ratios = []
    for i in range(pairs):
        if i % 2:
            v = timed(variant)
            p = timed("plain")
        else:
            p = timed("plain")
            v = timed(variant)
        ratios.append(v / p)
    ratios.sort()
    return ratios[len(ratios) // 2]


def _run(benchmark, kind: str, group: str, variant: str, rounds: int, pairs: int) -> None:
    benchmark.group = group
    steps = _steps(kind)
    load_before = os.getloadavg()[0]
    benchmark.pedantic(steps[variant], rounds=rounds, iterations=1, warmup_rounds=max(1, rounds // 8))
    benchmark.extra_info["ratio_to_plain_interleaved_median"] = _interleaved_ratio(steps, variant, pairs)
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.extra_info["loadavg_1min_before_after"] = [load_before, os.getloadavg()[0]]


@pytest.mark.parametrize("variant", STEP_VARIANTS + ["ours_jvp"])
def test_mlp_step(benchmark, variant):
    _run(benchmark, "mlp", "grokalign-step-mlp-784-196x3-10-b256", variant, rounds=40, pairs=100)


@pytest.mark.parametrize("variant", STEP_VARIANTS)
def test_transformer_step(benchmark, variant):
    _run(benchmark, "transformer", "grokalign-step-transformer-2x128-b256", variant, rounds=10, pairs=10)


@pytest.mark.parametrize("variant", ["plain", "ours_exact", "loop_exact"])
def test_mlp_exact(benchmark, variant):
    slow = variant == "loop_exact"
    _run(benchmark, "mlp", "grokalign-exact-mlp-784-196x3-10-b256", variant, rounds=3 if slow else 20, pairs=2 if slow else 20)
