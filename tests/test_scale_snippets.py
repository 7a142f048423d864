"""The snippets of the README draft "Using grokopt at scale", run exactly as written.

Each snippet is a string here and is executed verbatim (the README text is copied from these
strings); the DDP and FSDP2 snippets run in 2 gloo processes through the shared launcher,
where ``rank``, ``world_size`` and ``steps`` are given. The Lightning and Hugging Face
Trainer snippets are run by ``test_integrations.py``.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from _dist import launch  # noqa: E402

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
# ... train ...
model_sd, optim_sd = get_state_dict(model, opt)   # wrapper state, amplifier, counters included
dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint_dir)

model, opt = build()                              # a fresh process
model_sd, optim_sd = get_state_dict(model, opt)
state = {"model": model_sd, "optim": optim_sd}
dcp.load(state, checkpoint_id=checkpoint_dir)
set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
'''


def test_amp_snippet():
    exec(AMP, {})


@pytest.mark.slow  # inductor compiles for ~15 s on CPU
def test_compile_snippet():
    exec(COMPILE, {})


def test_dcp_snippet(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "no process group: single process"
        exec(DCP, {"checkpoint_dir": str(tmp_path / "ckpt")})


def run_snippet(rank, world_size, source):
    exec(source, {"rank": rank, "world_size": world_size, "steps": 4})


@pytest.mark.slow
@pytest.mark.parametrize("source", [DDP, FSDP2], ids=["ddp", "fsdp2"])
def test_distributed_snippets(source):
    launch(run_snippet, source, world_size=2)


@pytest.mark.parametrize("name", ["DDP", "FSDP2", "AMP", "COMPILE", "DCP"])
def test_readme_shows_the_snippet_that_runs_here(name):
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    assert globals()[name].strip("\n") in readme
