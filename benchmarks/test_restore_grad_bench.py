"""What giving the user's gradient back after step() costs: ``restore_grad=True`` vs ``False``.

Four 1024 x 1024 fp32 parameters (16 MiB of gradients), AdamW (foreach) inside each wrapper.

(a) Memory: the peak extra memory of one step(), over what was resident before it, measured
in a fresh subprocess two ways: the peak of live bytes that torch allocated during the step
(from the profiler's allocation record, exact), and VmHWM minus VmRSS (the peak reset through
/proc/self/clear_refs; glibc is made to map every block over 64 KiB on its own, so that a
freed block leaves the resident size at once).

(b) Time: one step() in each mode, side by side (each round first copies the same gradients
into ``.grad``, in both modes alike).

Run: pytest benchmarks/test_restore_grad_bench.py --benchmark-json=benchmarks/results/<name>.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from _common import MACHINE, MEMORY_PROBE, THREADS, pin_threads
from _common import params_with_grads as _params
from grokopt import AmplifiedOptimizer, Grokfast, OrthoGrad

SHAPES = [(1024, 1024)] * 4

WRAPPERS = {
    "adamw": None,
    "grokfast": "grokopt.Grokfast(inner, restore_grad=restore)",
    "orthograd": "grokopt.OrthoGrad(inner, restore_grad=restore)",
    "neuralgrok": "grokopt.AmplifiedOptimizer(inner, hidden=(16, 16), restore_grad=restore)",
    "grokfast(orthograd)": "grokopt.Grokfast(grokopt.OrthoGrad(inner), restore_grad=restore)",
}

_MEMORY_SCRIPT = MEMORY_PROBE + textwrap.dedent(
    """
    import json, sys
    import torch
    from torch import nn
    import grokopt

    torch.set_num_threads(int(sys.argv[1]))
    build, restore = sys.argv[2], sys.argv[3] == "1"

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(1024, 1024, bias=False) for _ in range(4)])
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    opt = eval(build) if build != "None" else inner
    x = torch.randn(8, 1024)

    def backward():
        opt.zero_grad()
        model(x).pow(2).mean().backward()

    for _ in range(2):  # every state exists before the measured steps
        backward()
        opt.step()
    backward()
    before = reset_peak()
    opt.step()
    hwm = rss("VmHWM") - before
    backward()
    activity = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activity, profile_memory=True) as prof:
        opt.step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    grads = sum(p.grad.nbytes for p in model.parameters())
    print(json.dumps({"hwm": hwm, "peak_live": peak, "grad_bytes": grads}))
    """
)

MEMORY_CASES = [(k, r) for k, v in WRAPPERS.items() for r in ([None] if v is None else [False, True])]


@pytest.mark.parametrize("kind, restore", MEMORY_CASES,
                         ids=[f"{k}-{'bare' if r is None else f'restore={r}'}" for k, r in MEMORY_CASES])
def test_step_peak_memory(benchmark, kind, restore):
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc to reset the peak resident size")
    result = {}

    def measure():
        proc = subprocess.run(
            [sys.executable, "-c", _MEMORY_SCRIPT, str(THREADS), str(WRAPPERS[kind]),
             "1" if restore else "0"],
            capture_output=True, text=True, check=True,
            env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
        )
        result.update(json.loads(proc.stdout.strip().splitlines()[-1]))

    benchmark.group = "restore_grad/step-peak-memory/4x1024^2/cpu"
    benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update(
        step_peak_extra_live_mib=result["peak_live"] / 2**20,
        step_peak_extra_rss_mib=result["hwm"] / 2**20,
        grad_mib=result["grad_bytes"] / 2**20,
        machine=MACHINE,
    )


TIME_CASES = {
    "grokfast": lambda inner, r: Grokfast(inner, restore_grad=r),
    "orthograd": lambda inner, r: OrthoGrad(inner, restore_grad=r),
    "neuralgrok": lambda inner, r: AmplifiedOptimizer(inner, hidden=(16, 16), restore_grad=r),
}


@pytest.mark.parametrize("restore", [False, True], ids=["in-place", "restore"])
@pytest.mark.parametrize("kind", list(TIME_CASES))
def test_step_time(benchmark, kind, restore):
    pin_threads()
    params = _params(SHAPES, "cpu")
    torch.manual_seed(0)
    opt = TIME_CASES[kind](torch.optim.AdamW(params, lr=1e-3, foreach=True), restore)
    grads = [p.grad.clone() for p in params]

    def step():
        # In place the gradients were changed: both modes start from the same ones (the
        # copy costs the same in both, so the difference is the restore's own cost).
        torch._foreach_copy_([p.grad for p in params], grads)
        opt.step()

    step()  # state exists
    benchmark.group = f"restore_grad/step-time/{kind}/4x1024^2/cpu"
    benchmark.extra_info.update(machine=MACHINE, threads=THREADS)
    benchmark(step)
