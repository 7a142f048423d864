"""The general path behind the Jacobian kernels: ``torch.func`` and ``torch.autograd``.

It serves every model the piecewise-linear chain (:mod:`grokopt._pl_chain`) does not:
``torch.func.jvp`` / ``jacfwd`` / ``jacrev`` under ``vmap`` and ``torch.autograd.grad`` with
``create_graph``, run with the composite attention kernel (the fused ones have no forward-mode
formula and no double backward) and with a watch on layer norm, whose forward-mode rule gives
wrong parameter gradients. :mod:`grokopt.jacobian` decides when this path is taken.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = [
    "LAYER_NORM_REASON",
    "LayerNormWatch",
    "autograd_vjp",
    "func_jacobian",
    "func_jvp",
    "grad_ready",
    "higher_order_attention",
    "warn_layer_norm",
]

Model = Callable[[Tensor], Tensor]

LAYER_NORM_REASON = (
    "torch's forward-mode layer norm gives wrong parameter gradients under backward "
    f"(torch {torch.__version__})"
)


class LayerNormWatch(TorchFunctionMode):
    """Sees every layer-norm call made while a forward-mode product is traced.

    A closure such as ``lambda e: net.forward_embeddings(e)`` hides its modules from the
    up-front module check in :mod:`grokopt.jacobian`, so the check has to happen while it runs. With
    ``refuse`` the first call raises (the estimator: its only use is a gradient); otherwise
    the call goes through and ``seen`` is set (the kernels: their values are right).
    """

    # F.layer_norm is what nn.LayerNorm calls; the other two are the lower entry points.
    _FUNCS = (F.layer_norm, torch.layer_norm, torch.native_layer_norm)

    def __init__(self, refuse: bool) -> None:
        super().__init__()
        self.refuse = refuse
        self.seen = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._FUNCS:
            if self.refuse:
                raise ValueError(
                    "estimator='jvp' is refused: the model calls layer norm, and "
                    f"{LAYER_NORM_REASON}; use estimator='vjp' (the default) or 'exact'"
                )
            self.seen = True
        return func(*args, **(kwargs or {}))


def warn_layer_norm(kernel: str) -> None:
    """Warn that ``kernel``'s values are right but its parameter gradients are not."""
    warnings.warn(
        f"{kernel}: the model calls layer norm and {LAYER_NORM_REASON}; the returned values "
        "are right, but do not backpropagate through them (use vjp / mode='rev', or run "
        "under torch.no_grad())",
        RuntimeWarning,
        stacklevel=4,  # the caller of jvp / per_sample_jacobian
    )


@contextlib.contextmanager
def higher_order_attention() -> Iterator[None]:
    # The fused (flash / memory-efficient) attention kernels have neither a forward-mode
    # formula nor a double backward; the math kernel is composite and supports both.
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def grad_ready(x: Tensor) -> Tensor:
    # A fresh node: gradients w.r.t. it are well defined whether or not the caller's tensor
    # requires grad, and the caller's tensor is never flipped.
    return x.view_as(x) if x.requires_grad else x.detach().requires_grad_(True)


def _jvp(model: Model, x: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    # torch.func.jvp without has_aux: (output, J u) (its annotation also allows the aux)
    return cast("tuple[Tensor, Tensor]", torch.func.jvp(model, (x,), (u,)))


def func_jvp(model: Model, x: Tensor, tangents: Tensor, *, refuse_layer_norm: bool) -> tuple[Tensor, Tensor]:
    """``(model(x), J u)`` for tangents ``(k, B, *in)`` by ``torch.func.jvp`` (vmapped over k)."""
    watch = LayerNormWatch(refuse=refuse_layer_norm)
    # A refusal comes mid-forward: put back the global RNG that dropout may have drawn from
    # (eager only; reading RNG states would break a compiled graph).
    rng = None if torch.compiler.is_compiling() or not refuse_layer_norm else rng_states(x)
    try:
        with higher_order_attention(), watch:
            if tangents.shape[0] == 1:
                out, tan = _jvp(model, x, tangents[0])
                tan = tan.unsqueeze(0)
            else:

                def one(u: Tensor) -> tuple[Tensor, Tensor]:
                    return _jvp(model, x, u)

                # The primal does not depend on the vmapped tangent, so it is computed once.
                # (torch's annotation of out_dims leaves out None entries)
                out, tan = torch.func.vmap(
                    one, out_dims=(None, 0), randomness="same")(tangents)  # type: ignore[arg-type, unused-ignore]
    except ValueError:
        if rng is not None:
            set_rng_states(rng)
        raise
    if watch.seen and torch.is_grad_enabled():
        warn_layer_norm("jvp")
    return out, tan


def rng_states(x: Tensor) -> tuple[Tensor, Tensor | None, torch.device]:
    cuda = torch.cuda.get_rng_state(x.device) if x.device.type == "cuda" else None
    return torch.get_rng_state(), cuda, x.device


def set_rng_states(states: tuple[Tensor, Tensor | None, torch.device]) -> None:
    cpu, cuda, device = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def autograd_vjp(out: Tensor, x_: Tensor, cotangents: Tensor, create_graph: bool) -> Tensor:
    """``J^T v`` for cotangents ``(k, B, *out)`` by one ``autograd.grad`` call per probe."""
    grads = []
    for i in range(cotangents.shape[0]):
        (g,) = torch.autograd.grad(
            out, x_, cotangents[i], create_graph=create_graph, retain_graph=True, allow_unused=True
        )
        if g is None:
            raise ValueError("the outputs do not depend on x (x is not in their autograd graph)")
        grads.append(g)
    return torch.stack(grads)


def func_jacobian(model: Model, x: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """``(outputs, per-sample Jacobians)`` by ``vmap`` of ``jacfwd`` ("fwd") or ``jacrev``."""
    def single(xi: Tensor) -> tuple[Tensor, Tensor]:
        out = model(xi.unsqueeze(0))
        if not isinstance(out, Tensor) or out.dim() < 1 or out.shape[0] != 1:
            raise ValueError("model output must keep the batch dimension as its first dim")
        out = out.squeeze(0)
        return out, out

    transform = torch.func.jacfwd if mode == "fwd" else torch.func.jacrev
    # Forward mode shares the layer-norm fault of jvp (reverse mode does not).
    watch = LayerNormWatch(refuse=False) if mode == "fwd" else contextlib.nullcontext()
    with higher_order_attention(), watch:
        jac, out = torch.func.vmap(transform(single, has_aux=True), randomness="different")(x)
    if mode == "fwd" and watch.seen and torch.is_grad_enabled():  # type: ignore[union-attr]
        warn_layer_norm("per_sample_jacobian(mode='fwd')")
    return out, jac

