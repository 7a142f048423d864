"""The race's Muon arm: which parameters Muon gets, and the combined optimizer's contract."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from _features import needs_muon

import grokopt
from grokopt.race.muon import MuonWithAuxiliary, muon_parameters
from grokopt.tasks.models import DecoderTransformer, EmbeddingMLP, OmnigrokMLP



def _names(model, params):
    ids = {id(p) for p in params}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def test_split_of_the_decoder_transformer():
    model = DecoderTransformer(vocab_size=13, num_classes=11, dim=16, heads=2, layers=2)
    hidden, rest = muon_parameters(model)
    want = sorted(f"blocks.{i}.{n}" for i in range(2) for n in (
        "attn.in_proj_weight", "attn.out_proj.weight", "mlp.0.weight", "mlp.2.weight"))
    assert _names(model, hidden) == want
    # Embeddings (token and position), norms, biases and the head stay with the other optimizer.
    assert "tok.weight" in _names(model, rest) and "pos.weight" in _names(model, rest)
    assert "head.weight" in _names(model, rest)
    assert all(p.ndim == 2 for p in hidden)
    assert len(hidden) + len(rest) == len(list(model.parameters()))


@pytest.mark.parametrize("model", [
    EmbeddingMLP(vocab_size=13, seq_len=2, num_classes=11, dim=8, hidden=16),
    OmnigrokMLP(64, num_classes=10, hidden=(32, 32, 32)),
])
def test_split_of_the_mlps(model):
    hidden, rest = muon_parameters(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [id(p) for p in hidden] == [id(m.weight) for m in linears[:-1]]
    assert any(p is linears[-1].weight for p in rest)
    assert len(hidden) + len(rest) == len(list(model.parameters()))


def _model_and_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 5, generator=gen), torch.randn(6, 3, generator=gen)) for _ in range(6)]
    return model, batches


def _build(model, wrap=None):
    hidden, rest = muon_parameters(model)
    opt = MuonWithAuxiliary(torch.optim.Muon(hidden, lr=0.02), torch.optim.AdamW(rest, lr=1e-2))
    return opt if wrap is None else wrap(opt)


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


@needs_muon
def test_steps_equal_the_two_optimizers_stepped_by_hand():
    model, batches = _model_and_batches()
    twin = copy.deepcopy(model)
    _train(model, _build(model), batches)
    hidden, rest = muon_parameters(twin)
    a, b = torch.optim.Muon(hidden, lr=0.02), torch.optim.AdamW(rest, lr=1e-2)
    for x, y in batches:
        a.zero_grad(), b.zero_grad()
        nn.functional.mse_loss(twin(x), y).backward()
        a.step(), b.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@needs_muon
@pytest.mark.parametrize("wrap", [None, lambda opt: grokopt.Grokfast(opt, alpha=0.9, lamb=2.0)],
                         ids=["bare", "grokfast"])
def test_state_dict_round_trip_continues_exactly(wrap):
    model, batches = _model_and_batches()
    twin = copy.deepcopy(model)
    _train(model, _build(model, wrap), batches)
    opt = _build(twin, wrap)
    _train(twin, opt, batches[:3])
    saved = copy.deepcopy(opt.state_dict())
    assert sorted(saved["state"]) == list(range(len(list(twin.parameters()))))
    fresh_model = copy.deepcopy(twin)
    fresh = _build(fresh_model, wrap)
    fresh.load_state_dict(saved)
    _train(fresh_model, fresh, batches[3:])
    for p, q in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(p, q)


@needs_muon
def test_lr_scheduler_reaches_both_optimizers():
    model, _ = _model_and_batches()
    opt = _build(model)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)  # applies factor 0.5 at once
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(0.01)
    assert opt.auxiliary.param_groups[0]["lr"] == pytest.approx(5e-3)


@needs_muon
def test_wrong_group_count_is_refused_before_anything_changes():
    model, batches = _model_and_batches()
    opt = _build(model)
    _train(model, opt, batches[:1])
    before = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(before)
    bad["param_groups"] = bad["param_groups"][:1]
    with pytest.raises(ValueError, match="state_dict has 1 parameter groups, this optimizer has 2"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]


def test_muon_arm_without_torch_muon_is_reported(monkeypatch):
    from grokopt.race import METHODS, parse_run_spec

    monkeypatch.delattr(torch.optim, "Muon", raising=False)
    assert "from torch 2.9 on" in METHODS["muon"].unavailable()
    with pytest.raises(RuntimeError, match="muon.*unavailable.*torch 2.9"):
        parse_run_spec("muon")
