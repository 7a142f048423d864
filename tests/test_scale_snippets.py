"""The snippets of the README draft "Using grokopt at scale", run exactly as written.

Each snippet is a string here and is executed verbatim (the README text is copied from these
strings); the DDP and FSDP2 snippets run in 2 gloo processes through the shared launcher,
where ``rank``, ``world_size`` and ``steps`` are given; the checkpoint snippet is given
``checkpoint_dir`` and ``train``. After a snippet has run, its objects are checked against a
plain reference. The Lightning and Hugging Face Trainer snippets are run by
``test_integrations.py``.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from _dist import has_fully_shard, launch  # noqa: E402
from contract import wide  # noqa: E402

DDP = '''
import torch, torch.distributed as dist, grokopt
from torch import nn

torch.manual_seed(0)                                  # same init on every rank
model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
ddp = nn.parallel.DistributedDataParallel(model)
opt = grokopt.AmplifiedOptimizer(grokopt.Grokfast(torch.optim.AdamW(model.parameters(), lr=1e-3)),
                                 hidden=(32, 32), meta_every=4)
reg = grokopt.GrokAlignLoss(model, weight=1e-3)       # the plain module, not the DDP wrapper
x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))          # this rank's batch
x_out, y_out = torch.randn(8, 16), torch.randint(0, 4, (8,))    # this rank's held-out batch
ce = nn.functional.cross_entropy
for _ in range(steps):
    opt.zero_grad()
    (ce(ddp(x), y) + reg(x)).backward()               # DDP averages .grad as usual
    opt.step()
    opt.maybe_meta_step(ddp, lambda fwd: ce(fwd(x_out), y_out),  # hypergradient averaged
                        inner_loss=lambda m: ce(m(x), y))        # across ranks by grokopt
'''

FSDP2 = '''
import torch, grokopt
from torch import nn
from torch.distributed.fsdp import fully_shard

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
for layer in (model[0], model[2]):
    fully_shard(layer)
fully_shard(model)                                    # parameters are now DTensor shards
opt = grokopt.AmplifiedOptimizer(grokopt.Grokfast(torch.optim.AdamW(model.parameters(), lr=1e-3)),
                                 hidden=(32, 32), meta_every=4)   # filter state shards too
x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))          # this rank's batch
x_out, y_out = torch.randn(8, 16), torch.randint(0, 4, (8,))    # this rank's held-out batch
ce = nn.functional.cross_entropy
for _ in range(steps):
    opt.zero_grad()
    ce(model(x), y).backward()                        # FSDP2 reduce-scatters .grad
    opt.step()
    opt.maybe_meta_step(model, lambda fwd: ce(fwd(x_out), y_out),   # through FSDP2's own
                        inner_loss=lambda m: ce(m(x), y))           # forward and backward
'''

AMP = '''
import torch, grokopt
from torch import nn

model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
opt = grokopt.Grokfast(torch.optim.AdamW(model.parameters(), lr=1e-3))
reg = grokopt.GrokAlignLoss(model, weight=1e-3)
device = "cuda" if torch.cuda.is_available() else "cpu"
scaler = torch.amp.GradScaler(device)          # needed for float16; harmless with bfloat16
x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
for _ in range(3):
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x), y) + reg(x)
    scaler.scale(loss).backward()
    scaler.step(opt)      # the filter sees unscaled gradients; an inf/NaN step is skipped
    scaler.update()       # and leaves every grokopt state untouched
'''

COMPILE = '''
import torch, grokopt
from torch import nn

model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
# 0-d tensors, not floats: torch.compile guards on Python floats and would recompile
# whenever a scheduler (or you) changed lr, alpha or lamb.
opt = grokopt.Grokfast(torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3)),
                       alpha=torch.tensor(0.98), lamb=torch.tensor(2.0), nonfinite="skip")
sched = torch.optim.lr_scheduler.LinearLR(opt, 0.1, total_iters=10)

@torch.compile
def step():
    opt.step()

x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
for _ in range(3):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    step()
    sched.step()
'''

DCP = '''
import torch, grokopt
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

def build():
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = grokopt.AmplifiedOptimizer(grokopt.Grokfast(torch.optim.AdamW(model.parameters())),
                                     hidden=(32, 32), meta_every=2)
    return model, opt

model, opt = build()
train(model, opt)                                 # your training loop
model_sd, optim_sd = get_state_dict(model, opt)   # wrapper state, amplifier, counters included
dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint_dir)

model, opt = build()                              # a fresh process
model_sd, optim_sd = get_state_dict(model, opt)
state = {"model": model_sd, "optim": optim_sd}
dcp.load(state, checkpoint_id=checkpoint_dir)
set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
'''


def _plain_amp_reference():
    """The AMP snippet's loop without GradScaler and autocast's scaling: what its comments
    promise (the filter sees unscaled gradients) means exactly these parameters, since
    scaling by a power of two and back is exact."""
    import torch
    from torch import nn

    import grokopt

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = grokopt.Grokfast(torch.optim.AdamW(model.parameters(), lr=1e-3))
    reg = grokopt.GrokAlignLoss(model, weight=1e-3)
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    for _ in range(3):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y) + reg(x)
        loss.backward()
        opt.step()
    return model


def test_amp_snippet():
    import copy

    import torch
    from torch import nn

    torch.manual_seed(0)
    ns: dict = {}
    exec(AMP, ns)
    model, opt, scaler = ns["model"], ns["opt"], ns["scaler"]
    assert scaler.get_scale() > 1  # the loss really was scaled
    reference = _plain_amp_reference()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    # "an inf/NaN step is skipped and leaves every grokopt state untouched"
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    scale = scaler.get_scale()
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(ns["x"]), ns["y"]) * float("inf")
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == scale / 2  # GradScaler saw the inf and skipped
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    _assert_same_state(opt.state_dict(), state)


def _assert_same_state(a, b, where="state_dict"):
    import torch

    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_state(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.slow  # inductor compiles for ~15 s on CPU
def test_compile_snippet():
    exec(COMPILE, {})


def test_dcp_snippet(tmp_path):
    import warnings

    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 16, generator=gen), torch.randint(0, 4, (32,), generator=gen)
    x_out, y_out = torch.randn(8, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen)
    ce = nn.functional.cross_entropy
    trained = []

    def train(model, opt, steps=5):  # meta_every=2: two meta-steps, and one step past them
        trained.append((model, opt))
        for _ in range(steps):
            opt.zero_grad()
            ce(model(x), y).backward()
            opt.step()
            opt.maybe_meta_step(model, lambda fwd: ce(fwd(x_out), y_out),
                                inner_loss=lambda m: ce(m(x), y))

    ns = {"checkpoint_dir": str(tmp_path / "ckpt"), "train": train}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "no process group: single process"
        exec(DCP, ns)
    [(saved_model, saved_opt)] = trained
    model, opt = ns["model"], ns["opt"]
    assert model is not saved_model and opt is not saved_opt  # fresh objects, loaded
    # What was restored is what was saved: weights, inner and wrapper state, amplifier,
    # meta-optimizer and counters (the counters sit in the anchor parameter's entry).
    _assert_same_state(model.state_dict(), saved_model.state_dict())
    _assert_same_state(opt.state_dict(), saved_opt.state_dict())
    assert wide(opt.state_dict())["neuralgrok_counters"] == wide(saved_opt.state_dict())["neuralgrok_counters"]
    for p, q in zip(opt.amplifier.parameters(), saved_opt.amplifier.parameters()):
        assert torch.equal(p, q)
    # Continuing from the checkpoint equals the uninterrupted run.
    train(saved_model, saved_opt, steps=4)
    train(model, opt, steps=4)
    for p, q in zip(model.parameters(), saved_model.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(opt.amplifier.parameters(), saved_opt.amplifier.parameters()):
        assert torch.equal(p, q)


def run_snippet(rank, world_size, source):
    exec(source, {"rank": rank, "world_size": world_size, "steps": 4})


@pytest.mark.slow
@pytest.mark.parametrize("source", [
    DDP,
    pytest.param(FSDP2, marks=pytest.mark.skipif(
        not has_fully_shard(), reason="torch has no public fully_shard (FSDP2: 2.6+)")),
], ids=["ddp", "fsdp2"])
def test_distributed_snippets(source):
    launch(run_snippet, source, world_size=2)


@pytest.mark.parametrize("name", ["DDP", "FSDP2", "AMP", "COMPILE", "DCP"])
def test_readme_shows_the_snippet_that_runs_here(name):
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    assert globals()[name].strip("\n") in readme
