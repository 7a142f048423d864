"""The contract every grokopt wrapper must honour, as reusable pieces (STYLE habit 4).

A wrapper joins the battery by adding a :class:`WrapperCase` to ``WRAPPER_CASES``; the tests
in ``test_contract.py`` then run it against every inner optimizer in ``INNER_OPTIMIZERS``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

import grokopt

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class WrapperCase:
    """How to build one wrapper around an inner optimizer, and what a training step does.

    ``after_step`` runs after ``optimizer.step()`` (a meta-step, for example); it receives
    the optimizer, the model and the step's batch.
    """

    name: str
    build: Callable[[Optimizer, nn.Module], Optimizer]
    after_step: Callable[[Optimizer, nn.Module, Batch], None] | None = None


INNER_OPTIMIZERS: dict[str, Callable[[Any], Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw-foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01, foreach=True),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01, fused=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, alpha=0.9),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05),
}

WRAPPER_CASES: list[WrapperCase] = [
    WrapperCase("grokfast-ema", lambda opt, model: grokopt.Grokfast(opt, alpha=0.9, lamb=2.0)),
    WrapperCase(
        "grokfast-ma",
        lambda opt, model: grokopt.Grokfast(opt, filter="ma", window=3, lamb=1.5),
    ),
    WrapperCase(
        "grokfast-reference",
        lambda opt, model: grokopt.Grokfast(opt, lamb=2.0, foreach=False),
    ),
    # skip mode (device path with a fused inner optimizer, host path otherwise), a filter
    # that starts at the third step and the lr normalisation, through the whole battery
    WrapperCase(
        "grokfast-skip-late",
        lambda opt, model: grokopt.Grokfast(opt, alpha=0.9, lamb=2.0, nonfinite="skip",
                                            after_step=2, normalize_lr=True),
    ),
]


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def make_batches(n: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(6, 5, generator=gen, dtype=dtype), torch.randn(6, 3, generator=gen, dtype=dtype))
        for _ in range(n)
    ]


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The mean squared error; written out in bf16, which torch 2.5's CPU mse_loss lacks
    (the package supports torch >= 2.5)."""
    if out.dtype is torch.bfloat16:
        return (out - y).pow(2).mean()
    return nn.functional.mse_loss(out, y)


def train(
    model: nn.Module, opt: Optimizer, batches: list[Batch], case: WrapperCase | None = None
) -> None:
    for batch in batches:
        x, y = batch
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
        if case is not None and case.after_step is not None:
            case.after_step(opt, model, batch)


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"parameter {name} differs"


def assert_same_state(a: Optimizer, b: Optimizer) -> None:
    """Two optimizers hold the same state, every tensor equal bit for bit."""
    sa, sb = state_tensors(a), state_tensors(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def state_tensors(opt: Optimizer) -> dict[str, torch.Tensor]:
    """Every tensor of a state_dict's per-parameter state, flattened to 'index/key' names,
    for exact comparison (entries under keys that are not parameter indices are left out)."""
    out: dict[str, torch.Tensor] = {}

    def add(name: str, value: Any) -> None:
        if isinstance(value, dict):  # a wrapper-wide entry (NeuralGrok's amplifier...)
            for k, v in value.items():
                add(f"{name}/{k}", v)
        elif isinstance(value, torch.Tensor):
            out[name] = value.detach().clone()
        else:
            out[name] = torch.tensor(value)

    sd = opt.state_dict()
    indices = {i for group in sd["param_groups"] for i in group["params"]}
    for index, entries in sd["state"].items():
        if index in indices:
            for key, value in entries.items():
                add(f"{index}/{key}", value)
    return out


WIDE_KEYS = ("neuralgrok_amplifier", "neuralgrok_meta_optimizer", "neuralgrok_counters")


def _is_wide(key: Any) -> bool:
    return isinstance(key, str) and key.split("/", 1)[0] in WIDE_KEYS


def anchor_entry(sd: dict[str, Any]) -> dict[str, Any]:
    """The state entry that carries the wrapper-wide state (NeuralGrok's amplifier,
    meta-optimizer and counters, stored flat as "name/key/..." entries): the first
    parameter's that requires grad. The entry itself, so changes reach the state_dict."""
    found = [entries for entries in sd["state"].values()
             if isinstance(entries, dict) and any(_is_wide(k) for k in entries)]
    assert len(found) == 1, f"expected the wrapper-wide entries in one parameter's state, got {len(found)}"
    return found[0]


def wide(sd: dict[str, Any]) -> dict[str, Any]:
    """The wrapper-wide state of a state_dict, nested again (a copy)."""
    out: dict[str, Any] = {}
    for key, value in anchor_entry(sd).items():
        if _is_wide(key):
            *path, last = key.split("/")
            node = out
            for part in path:
                node = node.setdefault(part, {})
            node[last] = value
    return out


def per_param(sd: dict[str, Any]) -> dict[Any, dict[str, Any]]:
    """A state_dict's per-parameter entries without the wrapper-wide ones (empty left out)."""
    out = {}
    for index, entries in sd["state"].items():
        rest = {k: v for k, v in entries.items() if not _is_wide(k)}
        if rest:
            out[index] = rest
    return out


# ---------------------------------------------------------------- NeuralGrok (issue 4)


def _neuralgrok_meta(opt: Optimizer, model: nn.Module, batch: Batch) -> None:
    """Meta-step on a held-out slice; g_hat from the step's own batch where recomputed."""
    x, y = batch
    amplified = opt
    while not hasattr(amplified, "maybe_meta_step"):
        amplified = amplified.optimizer
    inner = None if amplified.g_hat == "last" else (lambda fwd: mse(fwd(x), y))
    amplified.maybe_meta_step(model, lambda fwd: mse(fwd(x[::2] * 0.5), y[::2]), inner)


def _neuralgrok(**kw: Any) -> Callable[[Optimizer, nn.Module], Optimizer]:
    from grokopt.neuralgrok import AmplifiedOptimizer

    def build(opt: Optimizer, model: nn.Module) -> Optimizer:
        torch.manual_seed(7)  # the amplifier's init, so that fresh objects agree
        return AmplifiedOptimizer(opt, hidden=(8, 8), meta_lr=1e-2, **kw)

    return build


def _grokfast_then_neuralgrok(opt: Optimizer, model: nn.Module) -> Optimizer:
    return grokopt.Grokfast(_neuralgrok(meta_every=2)(opt, model), alpha=0.9, lamb=2.0)


def _neuralgrok_over_grokfast(opt: Optimizer, model: nn.Module) -> Optimizer:
    return _neuralgrok(meta_every=2)(grokopt.Grokfast(opt, alpha=0.9, lamb=2.0), model)


WRAPPER_CASES += [
    WrapperCase("neuralgrok", _neuralgrok(meta_every=2), _neuralgrok_meta),
    WrapperCase("neuralgrok-last", _neuralgrok(meta_every=1, g_hat="last", c=0.5), _neuralgrok_meta),
    WrapperCase("neuralgrok-exact", _neuralgrok(meta_every=3, path="exact"), _neuralgrok_meta),
    WrapperCase("neuralgrok-over-grokfast", _neuralgrok_over_grokfast, _neuralgrok_meta),
    WrapperCase("grokfast-over-neuralgrok", _grokfast_then_neuralgrok, _neuralgrok_meta),
]


# ---------------------------------------------------------------- the race's competitors

WRAPPER_CASES += [
    WrapperCase("orthograd", lambda opt, model: grokopt.OrthoGrad(opt)),
    WrapperCase("orthograd-reference", lambda opt, model: grokopt.OrthoGrad(opt, foreach=False)),
    WrapperCase("egd", lambda opt, model: grokopt.EGD(opt)),
    WrapperCase("egd-newton-schulz", lambda opt, model: grokopt.EGD(opt, method="newton-schulz")),
]


# ---------------------------------------------------------------- the torch.optim contract (issue 12)


def optimizer_stack(opt: Optimizer) -> list[Optimizer]:
    """The wrapper and every optimizer inside it, outermost first."""
    out = [opt]
    while isinstance(out[-1], grokopt.GradientTransform):
        out.append(out[-1].optimizer)
    return out


def one_step(model: nn.Module, opt: Optimizer, batch: Batch) -> None:
    """backward and step() on one batch, without the zero_grad and after_step of train()."""
    x, y = batch
    mse(model(x), y).backward()
    opt.step()
