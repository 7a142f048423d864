"""Helpers shared by the benchmark suites (models, thread pinning, the papers' reference ways).

Imported as ``from _common import ...``: pytest puts this folder on ``sys.path`` when it
collects the suites here (they live outside any package).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

#: Torch CPU threads for every suite. On a shared 2-core machine the default OpenMP
#: spin-waiting turns contention into 10x noise; GROKOPT_BENCH_THREADS overrides.
THREADS = int(os.environ.get("GROKOPT_BENCH_THREADS", "1"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

MACHINE = "2-core x86-64 CPU (AMD EPYC), no GPU, shared"

#: Parameter layouts of the filter benchmarks.
SHAPES = {
    # 200 tensors of 64x64 / 64 (a deep narrow MLP): 0.42M parameters
    "small-tensors": [(64, 64) if i % 2 == 0 else (64,) for i in range(200)],
    # 4 tensors of 1024x1024: 4.2M parameters
    "large-tensors": [(1024, 1024)] * 4,
}

#: Layouts measured only on a GPU: 4 x 4096^2 (67M parameters, 268 MB in fp32) is large
#: enough that kernel launches vanish and the filter's bandwidth can be read off.
GPU_SHAPES = {
    "huge-tensors": [(4096, 4096)] * 4,
}


def layouts(device: str) -> dict[str, list[tuple[int, ...]]]:
    """The parameter layouts benchmarked on ``device``."""
    return {**SHAPES, **(GPU_SHAPES if device != "cpu" else {})}


class NoStep(torch.optim.Optimizer):
    """An optimizer whose step does nothing: a wrapper around it times its transform alone."""

    def __init__(self, params) -> None:
        super().__init__(params, {"lr": 0.0})

    def step(self, closure=None) -> None:
        return None


def pin_threads() -> int:
    """Set torch's CPU threads to :data:`THREADS` and return it."""
    torch.set_num_threads(THREADS)
    return THREADS


def sync(device: str) -> None:
    """Wait for the device, so that a clock read after it covers the queued kernels."""
    if device == "cuda":
        torch.cuda.synchronize()


def params_with_grads(shapes: Sequence[tuple[int, ...]], device: str) -> list[nn.Parameter]:
    """Seeded parameters of ``shapes``, each with a seeded random ``.grad``."""
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device)
    return params


def interleaved_ratio(ours, base, pairs: int = 60, steps: int = 5) -> float:
    """Median over back-to-back pairs of (ours / base), the order alternating, so that a
    load change on a shared machine hits both sides of each ratio alike."""
    import time

    def timed(fn) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        return time.perf_counter() - t0

    ratios = []
    for i in range(pairs):
        if i % 2:
            o = timed(ours)
            b = timed(base)
        else:
            b = timed(base)
            o = timed(ours)
        ratios.append(o / b)
    ratios.sort()
    return ratios[len(ratios) // 2]


# ------------------------------------------------------------------------------ GrokAlign


def unit(v: Tensor) -> Tensor:
    """Rows of ``v`` scaled to unit length (the paper's output-space probes)."""
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def paper_vjp_penalty(
    fn: Callable[[Tensor], Tensor], x: Tensor, draw: Callable[[Tensor], Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """The GrokAlign reference way: ``(logits, mean_b ||J||_F estimate)``.

    A task forward, then a second forward with ``x`` requiring grad and a double-backward
    VJP with one unit probe per sample (math attention: the fused kernels have no double
    backward). ``draw(out)`` gives Gaussian probes shaped like the outputs ``out`` before
    normalisation (default ``torch.randn_like``), so a check can feed the probes that another
    implementation draws.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    logits = fn(x)
    x2 = x.detach().requires_grad_(True)
    with sdpa_kernel([SDPBackend.MATH]):
        out = fn(x2)
        raw = torch.randn_like(out) if draw is None else draw(out)
        (g,) = torch.autograd.grad(out, x2, unit(raw), create_graph=True)
    C = out.shape[1]
    return logits, (C * g.flatten(1).pow(2).sum(1)).clamp_min(1e-8).sqrt().mean()


def functional_jvp_penalty(
    fn: Callable[[Tensor], Tensor], x: Tensor, probes: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The peer way: ``torch.autograd.functional.jvp(create_graph=True)`` with one Gaussian
    input probe per sample; ``(logits, mean_b ||J u||)``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    u = torch.randn_like(x) if probes is None else probes
    with sdpa_kernel([SDPBackend.MATH]):
        logits, t = torch.autograd.functional.jvp(fn, x, u, create_graph=True)
    return logits, t.flatten(1).pow(2).sum(1).clamp_min(1e-8).sqrt().mean()


#: Prepended to the scripts that measure memory in a fresh subprocess: ``rss(field)``
#: reads a /proc/self/status field in bytes ("VmRSS", "VmHWM"), ``reset_peak()`` hands
#: the memory that malloc holds free back to the system (glibc's ``malloc_trim``, where
#: there is one), resets VmHWM to the resident size then and returns that size (measure
#: ``rss("VmHWM") - reset_peak()`` around what is measured). Without the trim a step could
#: reuse pages that an earlier one freed but malloc kept, and read as taking none: a
#: NeuralGrok meta-step after a step that had made copies read 0.27 GB, 0.70 GB trimmed.
MEMORY_PROBE = """
def rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

def reset_peak():
    import ctypes, ctypes.util
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to trim
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss("VmRSS")
"""
