"""The race's Muon arm: torch.optim.Muon on the hidden matrices, another optimizer on the rest.

Muon orthogonalises a matrix's momentum, which only makes sense for the weight matrices
inside the network; embeddings, positional tables, biases, norms and the output head keep
the race's own optimizer (AdamW or Adam), as the Muon-for-grokking paper does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = ["MuonWithAuxiliary", "muon_parameters"]


def muon_parameters(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """Split ``model``'s parameters into ``(hidden, rest)`` for Muon.

    ``hidden``: the weight of every ``nn.Linear`` except the output head, and the packed
    query/key/value matrix (``in_proj_weight``) of every ``nn.MultiheadAttention``. The
    output head is the ``nn.Linear`` that comes last in ``model.modules()`` (the order the
    modules were assigned: the head is built last in the reference models). ``rest``:
    everything else, in ``model.parameters()`` order. A parameter shared by two modules is
    listed once.

    Example:
        >>> mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
        >>> hidden, rest = muon_parameters(mlp)
        >>> [tuple(p.shape) for p in hidden], [tuple(p.shape) for p in rest]
        ([(8, 4), (8, 8)], [(8,), (8,), (2, 8), (2,)])
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    head = linears[-1] if linears else None
    chosen: dict[int, Tensor] = {}
    for m in model.modules():
        if isinstance(m, nn.Linear) and m is not head:
            chosen.setdefault(id(m.weight), m.weight)
        elif isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
            chosen.setdefault(id(m.in_proj_weight), m.in_proj_weight)
    hidden = list(chosen.values())
    rest: list[Tensor] = [p for p in model.parameters() if id(p) not in chosen]
    return hidden, rest


class MuonWithAuxiliary(Optimizer):
    """Two optimizers stepped as one: ``muon`` on its matrices, ``auxiliary`` on the rest.

    A real :class:`torch.optim.Optimizer` (grokopt's wrappers and the race's warmup see the
    groups of both, Muon's first) with one standard ``state_dict``: parameters numbered
    across both, Muon's groups first.

    Example:
        >>> mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> hidden, rest = muon_parameters(mlp)
        >>> opt = MuonWithAuxiliary(torch.optim.Muon(hidden), torch.optim.AdamW(rest))
        >>> mlp(torch.randn(3, 4)).sum().backward(); opt.step()
        >>> len(opt.param_groups), len(opt.state_dict()["state"])
        (2, 4)
    """

    def __init__(self, muon: Optimizer, auxiliary: Optimizer) -> None:
        self.muon, self.auxiliary = muon, auxiliary
        self._ready = False
        params = [p for o in (muon, auxiliary) for g in o.param_groups for p in g["params"]]
        super().__init__(params, {})
        self._ready = True

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        # The inner optimizers' current dicts: load_state_dict replaces them.
        return [*self.muon.param_groups, *self.auxiliary.param_groups]

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        if self.__dict__.get("_ready", False):
            raise AttributeError("MuonWithAuxiliary's param_groups are its two optimizers'")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self.__dict__.get("_ready", False):
            raise NotImplementedError("add groups to MuonWithAuxiliary.muon or .auxiliary")

    @property  # type: ignore[override]
    def state(self) -> dict[Tensor, Any]:
        return {**self.muon.state, **self.auxiliary.state}

    @state.setter
    def state(self, value: Any) -> None:
        pass  # Optimizer.__init__ assigns an empty state; the inner optimizers own theirs.

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.auxiliary.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.auxiliary.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        a, b = self.muon.state_dict(), self.auxiliary.state_dict()
        offset = sum(len(g["params"]) for g in a["param_groups"])
        groups = [*a["param_groups"],
                  *({**g, "params": [i + offset for i in g["params"]]} for g in b["param_groups"])]
        state = {**a["state"], **{i + offset: s for i, s in b["state"].items()}}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        n_groups = len(self.muon.param_groups)
        groups = state_dict["param_groups"]
        if len(groups) != n_groups + len(self.auxiliary.param_groups):
            raise ValueError(f"state_dict has {len(groups)} parameter groups, this optimizer has "
                             f"{n_groups + len(self.auxiliary.param_groups)}")
        offset = sum(len(g["params"]) for g in groups[:n_groups])
        state = state_dict["state"]
        self.muon.load_state_dict({
            "state": {i: s for i, s in state.items() if i < offset},
            "param_groups": groups[:n_groups]})
        self.auxiliary.load_state_dict({
            "state": {i - offset: s for i, s in state.items() if i >= offset},
            "param_groups": [{**g, "params": [i - offset for i in g["params"]]}
                             for g in groups[n_groups:]]})
