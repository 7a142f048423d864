"""Under DDP the package averages the hypergradient (and a recomputed g_hat) across ranks."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _dist import has_fully_shard, launch  # noqa: E402
from contract import make_batches, make_model  # noqa: E402

from grokopt import AmplifiedOptimizer, make_amplifier  # noqa: E402

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


# ---------------------------------------------------------------------------- FSDP2

# Under FSDP2 the meta-step takes its own route (the lookahead written into the shards, the
# module's own forward and backward). It must use the same c and lookahead lr as one process,
# and leave the buffers alone although it runs train-mode BatchNorm forwards on each rank.
FSDP_CASES = (("base", 0.2), ("scheduled", 0.2))
FSDP_LR, META_LR = 0.3, 1e-2


def bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.BatchNorm1d(8), nn.Linear(8, 3)).double()


def build_fsdp_case(model, lookahead_lr, c):
    torch.manual_seed(1)
    amp = make_amplifier((6, 6), dtype=torch.float64)
    opt = AmplifiedOptimizer(torch.optim.SGD(model.parameters(), lr=FSDP_LR), amplifier=amp,
                             meta_optimizer=torch.optim.SGD(amp.parameters(), lr=META_LR),
                             c=c, lookahead_lr=lookahead_lr)
    return opt, torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=10)


def fsdp_worker(rank, world, out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    inner, outer = batches()
    (x, y), (xo, yo) = inner[rank], outer[rank]
    for lookahead_lr, c in FSDP_CASES:
        model = bn_net()
        for layer in (model[0], model[2], model[3]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt, schedule = build_fsdp_case(model, lookahead_lr, c)
        for _ in range(2):
            opt.zero_grad()
            mse(model(x), y).backward()
            opt.step()
            schedule.step()
        params = [p.to_local().clone() for p in model.parameters()]
        grads = [p.grad.to_local().clone() for p in model.parameters()]
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        opt.meta_step(model, lambda fwd: mse(fwd(xo), yo), lambda m: mse(m(x), y))
        for p, before in zip(model.parameters(), params):
            assert torch.equal(p.to_local(), before)
        for p, before in zip(model.parameters(), grads):
            assert torch.equal(p.grad.to_local(), before)
        now = dict(model.named_buffers())
        assert now.keys() == buffers.keys() and len(buffers) == 3
        for name, before in buffers.items():
            assert torch.equal(now[name], before), name
        torch.save({k: v.clone() for k, v in opt.amplifier.state_dict().items()},
                   f"{out}.{lookahead_lr}.{rank}")


@pytest.mark.skipif(not has_fully_shard(),
                    reason=f"torch {torch.__version__} has no public FSDP2 fully_shard (2.6+)")
def test_fsdp2_meta_step_uses_c_and_the_base_lr_and_keeps_the_buffers(tmp_path):
    launch(fsdp_worker, str(tmp_path / "amp"), world_size=WORLD, timeout=300.0)
    inner, outer = batches()
    for lookahead_lr, c in FSDP_CASES:
        got = [torch.load(tmp_path / f"amp.{lookahead_lr}.{r}") for r in range(WORLD)]
        # One process: each rank's batch through the BatchNorm on its own (its own batch
        # statistics, as on that rank), the losses averaged as FSDP2 averages gradients.
        model = bn_net()
        opt, schedule = build_fsdp_case(model, lookahead_lr, c)
        mean_inner = lambda m: sum(mse(m(x), y) for x, y in inner) / WORLD  # noqa: E731
        for _ in range(2):
            opt.zero_grad()
            mean_inner(model).backward()
            opt.step()
            schedule.step()
        opt.meta_step(model, lambda fwd: sum(mse(fwd(x), y) for x, y in outer) / WORLD, mean_inner)
        for k, v in opt.amplifier.state_dict().items():
            for r in range(WORLD):
                # fp64; the shards reduce in another order than one process: rounding only
                torch.testing.assert_close(got[r][k], v, rtol=1e-10, atol=1e-12, msg=(lookahead_lr, k))
