"""Training with checkpoints, run as a subprocess by test_faults.py (and imported by it).

``python _resume_script.py crash DIR``: train every case, write an atomic checkpoint after
step CKPT, train on, then SIGKILL this very process mid-training (after the checkpoints,
before the end). ``python _resume_script.py resume DIR``: load each case's checkpoint into
fresh objects, finish the run and write the final parameters to DIR/final.pt.
"""

from __future__ import annotations

import os
import signal
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from contract import INNER_OPTIMIZERS, WRAPPER_CASES, make_model  # noqa: E402

from grokopt import GrokAlignLoss  # noqa: E402

STEPS, CKPT = 8, 4
CASES = {c.name: c for c in WRAPPER_CASES}
NAMES = [*CASES, "grokalign-jvp"]


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)  # data depends on the step only
    return torch.randn(6, 5, generator=gen), torch.randn(6, 3, generator=gen)


def build(name: str):
    model = make_model(0)
    opt = INNER_OPTIMIZERS["adam"](model.parameters())
    reg = None
    if name == "grokalign-jvp":
        reg = GrokAlignLoss(model, weight=0.1, estimator="jvp", generator=torch.Generator().manual_seed(3))
    else:
        opt = CASES[name].build(opt, model)
    return model, opt, reg


def run_steps(name, model, opt, reg, start, stop, on_step=None):
    case = CASES.get(name)
    for step in range(start, stop):
        x, y = batch(step)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        if reg is not None:
            loss = loss + reg(x)
        loss.backward()
        opt.step()
        if case is not None and case.after_step is not None:
            case.after_step(opt, model, (x, y))
        if on_step is not None:
            on_step(step + 1)


def checkpoint(path, model, opt, reg):
    state = {"model": model.state_dict(), "opt": opt.state_dict()}
    if reg is not None:
        state["probe_rng"] = reg.generator.get_state()  # the probes are part of the run
    # Write then rename: a kill during the write leaves the previous checkpoint intact.
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def uninterrupted(name):
    model, opt, reg = build(name)
    run_steps(name, model, opt, reg, 0, STEPS)
    return [p.detach().clone() for p in model.parameters()]


def main(mode: str, directory: str) -> None:
    torch.set_num_threads(1)
    if mode == "crash":
        for name in NAMES:
            model, opt, reg = build(name)
            path = os.path.join(directory, f"{name}.pt")
            run_steps(name, model, opt, reg, 0, STEPS - 1,
                      lambda s: s == CKPT and checkpoint(path, model, opt, reg))
        os.kill(os.getpid(), signal.SIGKILL)  # mid-run: the last step never happens
    final = {}
    for name in NAMES:
        model, opt, reg = build(name)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # nothing may survive from a fresh init
        saved = torch.load(os.path.join(directory, f"{name}.pt"), weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        if reg is not None:
            reg.generator.set_state(saved["probe_rng"])
        run_steps(name, model, opt, reg, CKPT, STEPS)
        final[name] = [p.detach().clone() for p in model.parameters()]
    torch.save(final, os.path.join(directory, "final.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
