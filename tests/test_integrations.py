"""The README's PyTorch Lightning and Hugging Face Trainer snippets, run exactly as written.

As in ``test_scale_snippets.py``, each snippet is a string that is also in README.md
verbatim, executed with the names it expects (``net``/``model``, data, ``steps``...) given.
Each run is then compared with a plain training loop doing the same thing by hand, so the
tests show that the framework drove the wrapper as a plain loop would: every step filtered,
the scheduler reaching the wrapped optimizer's ``lr``, nothing skipped or doubled.

Tolerance: fp32, full-batch steps, the same arithmetic in the same order except for what
the frameworks do in between (Trainer averages the loss over the batch through its own
code path), so the parameters agree to a few fp32 ulps after a handful of Adam steps;
``rtol=1e-5, atol=1e-6`` leaves a wide margin while a skipped or doubled step, a missing
filter or a scheduler that never reached the optimizer moves them by >1e-3.

Both packages are optional (the ``integrations`` extra): without them these tests skip.
"""

from __future__ import annotations

import logging
import os
import warnings

import pytest
import torch
from torch import nn

import grokopt

LIGHTNING = '''
import lightning as L, torch, grokopt
from torch.utils.data import DataLoader, TensorDataset

class Lit(L.LightningModule):
    def __init__(self, net):
        super().__init__()
        self.net = net
    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)
    def configure_optimizers(self):
        opt = grokopt.Grokfast(torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.005))
        sched = torch.optim.lr_scheduler.LinearLR(opt, 0.1, total_iters=10)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

lit = Lit(net)
trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
trainer.fit(lit, DataLoader(TensorDataset(x, y), batch_size=len(x)))
'''

HF_TRAINER = '''
import torch, grokopt
from transformers import Trainer, TrainingArguments, get_linear_schedule_with_warmup

opt = grokopt.Grokfast(torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.005))
sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=10, num_training_steps=steps)
args = TrainingArguments(output_dir=output_dir, max_steps=steps, report_to="none",
                         per_device_train_batch_size=batch_size, use_cpu=True)
trainer = Trainer(model=model, args=args, train_dataset=train_ds, optimizers=(opt, sched))
trainer.train()   # Trainer clips to max_grad_norm=1.0 before step(): the filter sees clipped grads
'''

STEPS = 12


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(24, 6, generator=gen), torch.randint(0, 3, (24,), generator=gen)


def by_hand(net, x, y, make_sched, clip=None):
    """The plain loop: full batch, Grokfast(AdamW), scheduler stepped after every step."""
    opt = grokopt.Grokfast(torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.005))
    sched = make_sched(opt)
    for _ in range(STEPS):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
        sched.step()
    return opt


def assert_same_run(net, ref_net, opt, ref_opt):
    for p, q in zip(net.parameters(), ref_net.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    for p, q in zip(net.parameters(), ref_net.parameters()):
        torch.testing.assert_close(opt.state[p]["grokfast_ema"], ref_opt.state[q]["grokfast_ema"], rtol=1e-5, atol=1e-6)
    assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"])


def test_lightning_snippet_trains_like_a_plain_loop():
    pytest.importorskip("lightning")
    x, y = make_data()
    net = make_net()
    scope = {"net": net, "x": x, "y": y, "steps": STEPS}
    logging.getLogger("lightning").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "num_workers", "does not have many workers" etc.
        exec(LIGHTNING, scope)
    trainer = scope["trainer"]
    assert trainer.global_step == STEPS
    opt = trainer.optimizers[0]
    assert isinstance(opt, grokopt.Grokfast)

    ref_net = make_net()
    ref_opt = by_hand(ref_net, x, y, lambda o: torch.optim.lr_scheduler.LinearLR(o, 0.1, total_iters=10))
    assert_same_run(net, ref_net, opt, ref_opt)


class Classifier(nn.Module):
    """A model in the Trainer's convention: keyword inputs, a dict with the loss out."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def test_hf_trainer_snippet_trains_like_a_plain_loop(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    from transformers import get_linear_schedule_with_warmup
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    x, y = make_data()
    net = make_net()
    train_ds = [{"x": a, "labels": b} for a, b in zip(x, y)]
    scope = {"model": Classifier(net), "train_ds": train_ds, "steps": STEPS,
             "batch_size": len(train_ds), "output_dir": str(tmp_path / "out")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(HF_TRAINER, scope)
    assert scope["trainer"].state.global_step == STEPS
    opt = scope["opt"]

    ref_net = make_net()
    # Trainer samples the whole dataset in a random order each step: with one full batch
    # the mean loss (and so every gradient) is that of the batch in order, up to rounding.
    ref_opt = by_hand(ref_net, x, y,
                      lambda o: get_linear_schedule_with_warmup(o, num_warmup_steps=10,
                                                                num_training_steps=STEPS),
                      clip=1.0)
    assert_same_run(net, ref_net, opt, ref_opt)


@pytest.mark.parametrize("name", ["LIGHTNING", "HF_TRAINER"])
def test_readme_shows_the_snippet_that_runs_here(name):
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    assert globals()[name].strip("\n") in readme
