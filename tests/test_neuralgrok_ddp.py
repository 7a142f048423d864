"""Under DDP the package averages the hypergradient (and a recomputed g_hat) across ranks."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _dist import launch  # noqa: E402
from contract import make_batches, make_model  # noqa: E402

from grokopt.neuralgrok import AmplifiedOptimizer, make_amplifier  # noqa: E402

mse = nn.functional.mse_loss
WORLD = 2


def build():
    model = make_model(0, torch.float64)
    torch.manual_seed(1)
    amp = make_amplifier((6, 6), dtype=torch.float64)
    opt = AmplifiedOptimizer(torch.optim.SGD(model.parameters(), lr=0.3), amplifier=amp, meta_lr=1e-2)
    return model, opt


def batches():
    data = make_batches(2 * WORLD, dtype=torch.float64)
    return data[:WORLD], data[WORLD:]  # per rank: inner batch, outer batch


def worker(rank, world, out):
    model, opt = build()
    ddp = nn.parallel.DistributedDataParallel(model)
    inner, outer = batches()
    (x, y), (xo, yo) = inner[rank], outer[rank]
    opt.zero_grad()
    mse(ddp(x), y).backward()  # DDP averages these gradients
    opt.step()
    opt.meta_step(ddp, lambda fwd: mse(fwd(xo), yo), lambda m: mse(m(x), y))
    torch.save({k: v.clone() for k, v in opt.amplifier.state_dict().items()}, f"{out}.{rank}")


@pytest.mark.slow
def test_ddp_averages_hypergradient_and_g_hat(tmp_path):
    launch(worker, str(tmp_path / "amp"), world_size=WORLD)
    got = [torch.load(tmp_path / f"amp.{r}") for r in range(WORLD)]

    # One process: the step on the mean loss; g_hat of the mean inner loss; the mean of the
    # per-rank outer losses (each rank's hypergradient, averaged).
    model, opt = build()
    inner, outer = batches()
    mean_inner = lambda m: sum(mse(m(x), y) for x, y in inner) / WORLD  # noqa: E731
    opt.zero_grad()
    mean_inner(model).backward()
    opt.step()
    opt.meta_step(model, lambda fwd: sum(mse(fwd(x), y) for x, y in outer) / WORLD, mean_inner)
    for k, v in opt.amplifier.state_dict().items():
        for r in range(WORLD):
            # fp64; the ranks sum in a different order than one process: rounding only
            torch.testing.assert_close(got[r][k], v, rtol=1e-10, atol=1e-12)
