"""NeuralGrok's optimizer: steps on amplified gradients and learns the amplifier by meta-steps.

:class:`AmplifiedOptimizer` replaces each gradient by G_phi(g) (:mod:`grokopt.gphi`, with the
amplifier of :mod:`grokopt.amplifier`) before the inner optimizer's step, and trains the
amplifier every ``meta_every`` steps on a held-out batch by the exact gradient of the outer
loss at the lookahead parameters ``theta - lr * G_phi(g_hat)`` (``lr`` the base learning rate
by default). The method is described in docs/methods.md.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ._checks import check_choice, check_float, check_int, check_type, describe
from ._distributed import all_reduce_mean, is_dtensor, local_shard, unwrap_ddp
from ._nonfinite import check_mode, screen_step
from .amplifier import check_amplifier, make_amplifier
from .gphi import CHUNK_SIZE, PATHS, amplify_gradients, amplify_gradients_vjp, piecewise_plan_for
from .wrapper import SKIP_STEP, GradientTransform, TransformResult

__all__ = ["AmplifiedOptimizer"]

_G_HAT = ("recompute", "last")
_LOOKAHEAD_LR = ("base", "scheduled")

Forward = Callable[..., Any]


def _check_positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
    check_float(name, value, minimum=0, min_open=not allow_zero)


_BufferSnapshot = list[tuple[nn.Module, str, Tensor | None, Tensor | None]]


def _snapshot_buffers(module: nn.Module) -> _BufferSnapshot:
    """Every buffer of ``module``: its owner, name, object and a copy of its value.

    A meta-step's forwards must not count as training: in train mode BatchNorm would move
    its running statistics and ``num_batches_tracked`` on each of them.
    """
    return [(m, name, b, None if b is None else b.clone())
            for m in module.modules() for name, b in m._buffers.items()]


def _restore_buffers(saved: _BufferSnapshot) -> None:
    """Put the buffers back as :func:`_snapshot_buffers` found them, object and bits. Only
    those that changed are written, so a buffer that some graph saved for backward (BatchNorm's
    running statistics in eval mode) keeps its version counter and that graph stays usable."""
    with torch.no_grad():
        for m, name, b, value in saved:
            if m._buffers.get(name) is not b:  # a module may rebind a buffer, not update it
                m._buffers[name] = b
            if b is not None and value is not None and not torch.equal(b, value):
                b.copy_(value)


@contextlib.contextmanager
def _buffers_restored(module: nn.Module) -> Iterator[None]:
    saved = _snapshot_buffers(module)
    try:
        yield
    finally:
        _restore_buffers(saved)


class _Lookahead(NamedTuple):
    """The lookahead of one meta-step: ``theta' = theta - lr * G_phi(g_hat)`` per parameter."""

    params: list[Tensor]
    g_hats: list[Tensor]
    cs: list[float]
    lrs: list[float | Tensor]
    steps: list[Tensor]  # G_phi(g_hat)

    def points(self) -> Iterator[tuple[Tensor, Tensor]]:
        """(parameter, theta'), one at a time (a DTensor's theta' as its local shard)."""
        for p, step, lr in zip(self.params, self.steps, self.lrs):
            base, step = local_shard(p.detach()), local_shard(step)
            ahead = base - lr * step if isinstance(lr, Tensor) else torch.add(base, step, alpha=-lr)
            yield p, ahead.to(p.dtype)


class AmplifiedOptimizer(GradientTransform):
    """NeuralGrok: step on amplified gradients G_phi(g); learn the amplifier by meta-steps.

    ``step()`` replaces every gradient by G_phi(g) (no autograd graph) and steps the inner
    optimizer. :meth:`meta_step` (or :meth:`maybe_meta_step`, every ``meta_every`` steps)
    trains the amplifier on a held-out batch: it evaluates the model at the lookahead
    parameters ``theta - lr * G_phi(g_hat)`` (plain SGD: no clip, no weight decay; ``lr``
    as chosen by ``lookahead_lr``) through :func:`torch.func.functional_call`, so the
    module's own parameters are untouched, and steps the meta-optimizer with the exact
    gradient of that outer loss w.r.t. the amplifier's weights. The meta-step's forwards run
    in the module's current mode (in train mode BatchNorm normalises with the batch's
    statistics) but leave every buffer as it was, bit for bit: running statistics and
    ``num_batches_tracked`` move only in training steps. Under DDP the hypergradient (and a
    recomputed g_hat) is averaged across ranks here, since ``autograd.grad`` bypasses DDP's
    own averaging. With sharded
    (FSDP2) parameters the meta-step instead writes the lookahead into the shards, runs the
    module's own forward and backward there, restores the parameters and their ``.grad``
    exactly, and forms the hypergradient as a vector-Jacobian product reduced across shards
    (the same value); :meth:`meta_loss` alone is not available for them.

    ``g_hat`` (what the lookahead steps along):

    - ``"recompute"`` (the paper's): the gradient of ``inner_loss`` (passed to the meta-step,
      normally the step's own batch) at the current, just-updated parameters. One extra
      forward/backward per meta-step; the lookahead starts where the model is.
    - ``"last"``: the raw gradient of the last ``step()`` (before G_phi), stored each step
      (one extra copy of the gradients in memory and in the state_dict). No extra
      backward, but it was taken one step earlier than the parameters it is applied to.

    Args:
        optimizer: any optimizer, including a grokopt wrapper (``AmplifiedOptimizer(
            Grokfast(AdamW(...)))`` amplifies and then filters).
        amplifier: a module mapping (n, 1) to (n, 1); default :func:`make_amplifier` with
            ``hidden`` on the parameters' device, fp32.
        hidden: widths of the default amplifier (paper: (128, 128) for mod-97 tasks).
        c: norm of every amplified gradient tensor, > 0 (paper 1.0; later code 0.2). Stored
            per group as ``neuralgrok_c``.
        meta_lr: learning rate of the default meta-optimizer, Adam(betas=(0.9, 0.98),
            weight_decay=1e-3); ignored when ``meta_optimizer`` is given.
        meta_optimizer: an optimizer over exactly the amplifier's parameters.
        meta_every: :meth:`maybe_meta_step` runs a meta-step every this many steps (>= 1).
        g_hat: ``"recompute"`` or ``"last"`` (above).
        lookahead_lr: the lookahead's step size. ``"base"`` (the reference's): each group's
            ``initial_lr`` where an LR scheduler has set one, else its ``lr``, so a warmup
            or decay leaves the meta-objective alone (a schedule that decays to 0 would
            otherwise switch the meta-step off). ``"scheduled"``: the group's current ``lr``.
        eps: added to each tensor's norm (>= 0).
        path: ``"auto"``, ``"pwl"`` or ``"exact"`` (see :func:`amplify_gradients`).
        chunk_size: entries per chunk of the no-grad transform (None: all at once).
        max_grad_norm: if set, clip the amplified gradients to this global norm before the
            inner step (the reference pipeline uses 1.0). Not applied in the lookahead.
        nonfinite: what a step with an inf/NaN gradient does (decided on the host, one
            sync): ``"error"`` (default) raises :class:`~grokopt.NonFiniteGradientError`,
            naming the parameter, before anything changes; ``"skip"`` skips the whole step
            (parameters, the inner optimizer's state, ``g_hat="last"``'s stored gradient and
            the step counter stay as if ``step()`` had not been called).
        restore_grad: ``True`` (default): after ``step()`` each ``p.grad`` is the gradient
            backward produced, as with any torch optimizer: G_phi writes new tensors (in
            each gradient's layout), which the clip and the inner optimizer work on, one
            extra gradient-sized buffer while the inner optimizer runs. ``False``: the
            amplified (and clipped) gradient is copied into ``p.grad``, and G_phi's
            output is freed before the inner step (4 x 1024^2 fp32 parameters under
            foreach AdamW: a step's peak extra memory 32 MiB against 20 MiB,
            ``benchmarks/results/restore-grad-cpu.json``).

    Defaults and the paper's pipeline. The paper trains with G_phi, then a clip to global
    norm 1.0, then Adam(lr 1e-3, betas (0.9, 0.98), weight_decay 1e-3 as coupled L2), an
    amplifier (128, 128), c = 1.0, a meta-step every 4 steps (its mod-97 tasks) with
    Adam(lr 1e-4, betas (0.9, 0.98), weight_decay 1e-3), g_hat recomputed and the lookahead
    at the base lr. The defaults here are the same, except:

    - ``max_grad_norm=None``: no clip. The clip belongs to the paper's training pipeline,
      not to the method, and on its own it changes how fast even a plain baseline groks;
      a wrapper should not add it to someone else's optimizer unasked.
    - ``eps=1e-12`` in each norm, where the paper has none: it matters only for a tensor
      whose gradient is (nearly) all zero, which the paper turns into NaN.
    - the inner optimizer is yours (the paper's is ``torch.optim.Adam`` with coupled
      ``weight_decay``, not AdamW).

    ``c`` is the paper's 1.0; the authors' later code uses 0.2 (values in [0.2, 1] behave
    alike). With the clip on, ``c`` hardly reaches the training step (whenever
    ``c * sqrt(number of tensors) >= 1`` the clip scales the total back to norm 1) but it
    still sets the lookahead's length. ``meta_every=4`` and ``hidden=(128, 128)`` are the
    paper's values for its mod-97 tasks (its mod-7 task uses 1 and ``(1152,)``). The
    meta-optimizer's weight decay, 1e-3, is the paper's. See docs/methods.md.

    Example:
        >>> import torch
        >>> from grokopt.neuralgrok import AmplifiedOptimizer
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = AmplifiedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3),
        ...                          hidden=(16, 16), meta_every=2)
        >>> x, y, x_out, y_out = torch.randn(8, 3), torch.randn(8, 2), torch.randn(4, 3), torch.randn(4, 2)
        >>> mse = torch.nn.functional.mse_loss
        >>> for _ in range(4):
        ...     opt.zero_grad()
        ...     mse(model(x), y).backward()
        ...     opt.step()
        ...     _ = opt.maybe_meta_step(model, lambda fwd: mse(fwd(x_out), y_out),
        ...                             inner_loss=lambda fwd: mse(fwd(x), y))
        >>> opt.meta_steps
        2

        The paper's pipeline (up to ``eps``, above; call ``maybe_meta_step`` after each step
        with the step's batch as ``inner_loss`` and the held-out split as ``outer_loss``):

        >>> paper = AmplifiedOptimizer(
        ...     torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=1e-3),
        ...     hidden=(128, 128), c=1.0, meta_every=4, meta_lr=1e-4, max_grad_norm=1.0)
    """

    _prefix = "neuralgrok_"

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        amplifier: nn.Module | None = None,
        hidden: Sequence[int] = (128, 128),
        c: float = 1.0,
        meta_lr: float = 1e-4,
        meta_optimizer: Optimizer | None = None,
        meta_every: int = 4,
        g_hat: str = "recompute",
        lookahead_lr: str = "base",
        eps: float = 1e-12,
        path: str = "auto",
        chunk_size: int | None = CHUNK_SIZE,
        max_grad_norm: float | None = None,
        nonfinite: str = "error",
        restore_grad: bool = True,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            super().__init__(optimizer, {})  # the base class's TypeError names the argument
        check_mode(nonfinite)
        check_int("meta_every", meta_every, minimum=1)
        check_choice("g_hat", g_hat, _G_HAT)
        check_choice("lookahead_lr", lookahead_lr, _LOOKAHEAD_LR)
        check_choice("path", path, PATHS)
        check_int("chunk_size", chunk_size, minimum=1, allow_none=True)
        _check_positive("c", c)
        _check_positive("eps", eps, allow_zero=True)
        _check_positive("meta_lr", meta_lr)
        if max_grad_norm is not None:
            _check_positive("max_grad_norm", max_grad_norm)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        device = params[0].device if params else torch.device("cpu")
        if amplifier is None:
            amplifier = make_amplifier(hidden, device=device)
        check_amplifier(amplifier, device)
        piecewise_plan_for(amplifier, path)
        amp_params = list(amplifier.parameters())
        if meta_optimizer is None:
            if not amp_params:
                raise ValueError(
                    "amplifier must have parameters to learn (or pass a meta_optimizer), got "
                    "one with none"
                )
            meta_optimizer = torch.optim.Adam(
                amp_params, lr=meta_lr, betas=(0.9, 0.98), weight_decay=1e-3
            )
        else:
            check_type("meta_optimizer", meta_optimizer, Optimizer,
                       "a torch.optim.Optimizer over the amplifier's parameters, or None")
            owned = {id(p) for g in meta_optimizer.param_groups for p in g["params"]}
            if owned != {id(p) for p in amp_params}:
                raise ValueError(
                    f"meta_optimizer must optimise exactly the amplifier's parameters, e.g. "
                    f"torch.optim.Adam(amplifier.parameters()), got one over {len(owned)} "
                    f"tensors for the amplifier's {len(amp_params)}"
                )
        super().__init__(optimizer, {"c": c}, restore_grad=restore_grad)
        self.amplifier = amplifier
        self.meta_optimizer = meta_optimizer
        self.meta_every = meta_every
        self.g_hat = g_hat
        self.lookahead_lr = lookahead_lr
        self.eps = eps
        self.path = path
        self.chunk_size = chunk_size
        self.max_grad_norm = max_grad_norm
        self.nonfinite = nonfinite
        self._counters = {"steps": 0, "meta_steps": 0, "last_meta_at": 0}

    @property
    def steps(self) -> int:
        """Number of completed ``step()`` calls."""
        return self._counters["steps"]

    def _has_state(self) -> bool:
        # With g_hat="recompute" and a stateless inner optimizer (plain SGD) nothing
        # per-parameter is kept, but the step counter (the meta-step schedule) still is.
        counters = self.__dict__.get("_counters")
        return super()._has_state() or bool(counters and counters["steps"] > 0)

    @property
    def meta_steps(self) -> int:
        """Number of completed meta-steps."""
        return self._counters["meta_steps"]

    def _validate_group(self, options: dict[str, Any]) -> None:
        merged = {**self._own_defaults(), **options} if hasattr(self, "defaults") else options
        _check_positive("c", merged.get("neuralgrok_c"))

    # ------------------------------------------------------------------ step

    # With restore_grad the transform's outputs (new tensors) become the gradients the
    # inner optimizer steps with, instead of a copy of every gradient written over.
    _makes_scratch = True

    def _transform_gradients(self) -> TransformResult:
        if not screen_step(self, self.nonfinite):
            return SKIP_STEP
        pairs = [(p, g, group["neuralgrok_c"]) for group in self.param_groups
                 for p, g in self._grads(group)]
        if self.g_hat == "last":
            for p, g, _ in pairs:
                saved = self.own_state[p].get("last_grad")
                if saved is None or saved.shape != g.shape or saved.dtype != g.dtype:
                    self.own_state[p]["last_grad"] = g.detach().clone()
                else:
                    saved.copy_(g)
        if pairs:
            grads = [g for _, g, _ in pairs]
            new = amplify_gradients(grads, self.amplifier, c=[c for _, _, c in pairs],
                                    eps=self.eps, path=self.path, chunk_size=self.chunk_size)
            if self._making_scratch():
                for (p, g, _), n in zip(pairs, new):
                    p.grad = self._as_gradient(n, g)
            else:
                for g, n in zip(grads, new):
                    g.copy_(n)
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for p, _, _ in pairs], self.max_grad_norm)
        self._counters["steps"] += 1
        return None

    # ------------------------------------------------------------------ meta-step

    def meta_loss(
        self,
        model: nn.Module,
        outer_loss: Callable[[Forward], Tensor],
        inner_loss: Callable[[Forward], Tensor] | None = None,
    ) -> Tensor:
        """The outer loss at the one-step lookahead, differentiable in the amplifier only.

        Nothing is changed: not the model (its buffers included: in train mode BatchNorm
        normalises with the batch's statistics but its running statistics stay put), not the
        amplifier, not the optimizers.

        Args:
            model: the module whose parameters this optimizer updates (a DDP wrapper is
                unwrapped); every parameter of the optimizer must be one of its parameters.
            outer_loss: called with ``forward``, the model evaluated at the lookahead
                parameters (``forward(*args, **kwargs)`` is ``model(*args, **kwargs)`` there),
                returns a scalar loss on the held-out batch.
            inner_loss: called with the model itself at its current parameters, returns the
                training loss whose gradient is g_hat. Required with ``g_hat="recompute"``;
                with ``g_hat="last"`` it overrides the stored gradient.
        """
        module, names, entries = self._meta_setup(model, outer_loss, inner_loss)
        sharded = [tuple(p.shape) for p, _ in entries if is_dtensor(p)]
        if sharded:
            # The lookahead here goes through functional_call with substituted parameters,
            # which FSDP2's unshard hooks would override; meta_step() takes another route.
            raise NotImplementedError(
                f"meta_loss is not available for sharded (DTensor, e.g. FSDP2) parameters "
                f"({len(sharded)} sharded parameters, shapes {sharded[:3]}): the outer loss "
                f"cannot be returned differentiable in the amplifier there. meta_step() and "
                f"maybe_meta_step() support them"
            )
        return self._meta_loss_plain(module, names, entries, outer_loss, inner_loss)

    def _meta_setup(
        self, model: nn.Module, outer_loss: Any, inner_loss: Any,
    ) -> tuple[nn.Module, dict[int, str], list[tuple[Tensor, dict[str, Any]]]]:
        """Checks shared by the meta-step paths; the module, its parameter names and the
        (parameter, group) pairs the lookahead moves."""
        if self.steps == 0:
            raise RuntimeError(
                "meta-step before any step(): there is no gradient to look ahead along; "
                "call step() first"
            )
        if not callable(outer_loss):
            raise TypeError(f"outer_loss must be callable, got {type(outer_loss).__name__}")
        if inner_loss is None and self.g_hat == "recompute":
            raise ValueError(
                "inner_loss is required with g_hat='recompute' (the paper's g_hat: the "
                "gradient of the training batch at the updated parameters); pass e.g. "
                "inner_loss=lambda model: loss_fn(model(x), y), or build the optimizer "
                "with g_hat='last'"
            )
        if inner_loss is not None and not callable(inner_loss):
            raise TypeError(f"inner_loss must be callable or None, got {type(inner_loss).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        module = unwrap_ddp(model)
        names = {id(p): n for n, p in module.named_parameters()}
        entries = [(p, group) for group in self.param_groups for p in group["params"]
                   if p.requires_grad]
        missing = [tuple(p.shape) for p, _ in entries if id(p) not in names]
        if missing:
            raise ValueError(
                f"model does not hold {len(missing)} of this optimizer's parameters (shapes "
                f"{missing[:3]}{'...' if len(missing) > 3 else ''}); pass the module whose "
                f"parameters the optimizer updates"
            )
        return module, names, entries

    def _g_hats(
        self, module: nn.Module, entries: list[tuple[Tensor, dict[str, Any]]],
        inner_loss: Callable[[Forward], Tensor] | None,
    ) -> list[Tensor | None]:
        """What the lookahead steps along, per (parameter, group): the gradient of
        ``inner_loss`` at the current parameters, averaged over ranks, or without
        ``inner_loss`` the raw gradient that the last step stored (None where there is
        none). Every buffer and every ``.grad`` are left as they were."""
        params = [p for p, _ in entries]
        if inner_loss is None:
            return [self.own_state.get(p, {}).get("last_grad") for p in params]
        with torch.enable_grad(), _buffers_restored(module):
            loss = inner_loss(module)
            _check_scalar("inner_loss", loss)
            if any(is_dtensor(p) for p in params):
                # FSDP2 reduce-scatters the sharded gradients in hooks that only an
                # ordinary backward runs.
                saved = [p.grad for p in params]
                try:
                    for p in params:
                        p.grad = None
                    loss.backward()
                    found = [p.grad for p in params]
                finally:
                    for p, g in zip(params, saved):
                        p.grad = g
            else:
                found = list(torch.autograd.grad(loss, params, allow_unused=True))
        g_hats = [None if g is None else g.detach() for g in found]
        # FSDP2 averaged the sharded gradients; the others are averaged here, since
        # autograd.grad bypasses DDP's own averaging.
        all_reduce_mean(g for g in g_hats if g is not None and not is_dtensor(g))
        return g_hats

    def _lookahead(
        self, entries: list[tuple[Tensor, dict[str, Any]]], g_hats: list[Tensor | None],
    ) -> _Lookahead:
        """G_phi(g_hat) with each group's c and lookahead lr, for every parameter that has
        a g_hat; differentiable in the amplifier while grad mode is on."""
        chosen = [(p, group, g) for (p, group), g in zip(entries, g_hats) if g is not None]
        g_list = [g for _, _, g in chosen]
        cs = [group["neuralgrok_c"] for _, group, _ in chosen]
        steps = amplify_gradients(g_list, self.amplifier, c=cs, eps=self.eps, path=self.path,
                                  chunk_size=self.chunk_size)
        lrs = [self._lookahead_step_size(group) for _, group, _ in chosen]
        return _Lookahead([p for p, _, _ in chosen], g_list, cs, lrs, steps)

    def _meta_loss_plain(
        self, module: nn.Module, names: dict[int, str],
        entries: list[tuple[Tensor, dict[str, Any]]], outer_loss: Callable[[Forward], Tensor],
        inner_loss: Callable[[Forward], Tensor] | None,
    ) -> Tensor:
        g_hats = self._g_hats(module, entries, inner_loss)
        with torch.enable_grad():
            params = {n: p.detach() for n, p in module.named_parameters()}
            params.update((names[id(p)], ahead) for p, ahead in self._lookahead(entries, g_hats).points())
            # The forwards update copies of the buffers, never the module's own: restoring
            # those afterwards would bump the version of tensors this graph saved.
            params.update((n, b.clone()) for n, b in module.named_buffers())

            def forward(*args: Any, **kwargs: Any) -> Any:
                return torch.func.functional_call(module, params, args, kwargs)

            loss = outer_loss(forward)
            _check_scalar("outer_loss", loss)
        return loss

    def _lookahead_step_size(self, group: dict[str, Any]) -> float | Tensor:
        if self.lookahead_lr == "base":
            lr = group.get("initial_lr", group["lr"])  # set by torch's LR schedulers
        else:
            lr = group["lr"]
        return lr.detach() if isinstance(lr, Tensor) else lr

    def meta_step(
        self,
        model: nn.Module,
        outer_loss: Callable[[Forward], Tensor],
        inner_loss: Callable[[Forward], Tensor] | None = None,
    ) -> Tensor:
        """One meta-step: the hypergradient of :meth:`meta_loss`, averaged across DDP ranks,
        then one step of the meta-optimizer. Returns the outer loss (detached).

        Example:
            >>> import torch
            >>> from grokopt.neuralgrok import AmplifiedOptimizer
            >>> model = torch.nn.Linear(2, 1)
            >>> opt = AmplifiedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
            ...                          hidden=(4,), g_hat="last")
            >>> model(torch.ones(1, 2)).sum().backward(); opt.step()
            >>> loss = opt.meta_step(model, lambda fwd: fwd(torch.ones(1, 2)).pow(2).sum())
            >>> opt.meta_steps
            1
        """
        module, names, entries = self._meta_setup(model, outer_loss, inner_loss)
        amp_params = [p for g in self.meta_optimizer.param_groups for p in g["params"]]
        if any(is_dtensor(p) for p, _ in entries):
            loss, grads = self._sharded_hypergradient(module, entries, outer_loss, inner_loss)
            for p, g in zip(amp_params, grads):
                p.grad = g
        else:
            loss = self._meta_loss_plain(module, names, entries, outer_loss, inner_loss)
            found = torch.autograd.grad(loss, amp_params, allow_unused=True)
            for p, g in zip(amp_params, found):
                p.grad = torch.zeros_like(p) if g is None else g
            all_reduce_mean(p.grad for p in amp_params)
        self.meta_optimizer.step()
        self.meta_optimizer.zero_grad(set_to_none=True)
        self._counters["meta_steps"] += 1
        self._counters["last_meta_at"] = self.steps
        return loss.detach()

    def _sharded_hypergradient(
        self, module: nn.Module, entries: list[tuple[Tensor, dict[str, Any]]],
        outer_loss: Callable[[Forward], Tensor], inner_loss: Callable[[Forward], Tensor] | None,
    ) -> tuple[Tensor, list[Tensor]]:
        """The meta-step's outer loss and hypergradient with sharded (FSDP2) parameters.

        FSDP2 runs its module only on its own parameters (its hooks all-gather the shards),
        so the lookahead cannot be substituted as on one process. Instead, by the chain rule
        through ``theta' = theta - lr * G_phi(g_hat)``, the hypergradient is the
        vector-Jacobian product of G_phi with ``-lr * grad L_outer(theta')``: the lookahead
        is written into the shards in place (no grad), one ordinary forward/backward of the
        module gives ``grad L_outer(theta')`` (averaged over ranks by FSDP2, as the
        reference's mean over the combined batch), the parameters are restored exactly, and
        :func:`~grokopt.gphi.amplify_gradients_vjp` does the product with cross-shard
        reductions. g_hat is recomputed the same way (one ordinary backward). Every parameter's
        ``.grad`` and every buffer are put back as they were.
        """
        params = [p for p, _ in entries]
        saved = [p.grad for p in params]
        buffers = _snapshot_buffers(module)  # unsharded: each rank keeps its own copy
        g_hats = self._g_hats(module, entries, inner_loss)
        originals: list[tuple[Tensor, Tensor]] = []
        try:
            with torch.no_grad():
                look = self._lookahead(entries, g_hats)
                for p, ahead in look.points():
                    local = local_shard(p)
                    originals.append((local, local.clone()))
                    local.copy_(ahead)
            for p in params:
                p.grad = None
            with torch.enable_grad():
                loss = outer_loss(module)
                _check_scalar("outer_loss", loss)
                loss.backward()
            outer_grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach()
                           for p in look.params]
            all_reduce_mean(g for g in outer_grads if not is_dtensor(g))
        finally:
            with torch.no_grad():
                for local, original in originals:
                    local.copy_(original)
            for p, g in zip(params, saved):
                p.grad = g
            _restore_buffers(buffers)
        upstream = [g * -lr for g, lr in zip(outer_grads, look.lrs)]
        grads = amplify_gradients_vjp(look.g_hats, upstream, self.amplifier, c=look.cs,
                                      eps=self.eps, path=self.path, chunk_size=self.chunk_size)
        return loss, grads

    def maybe_meta_step(
        self,
        model: nn.Module,
        outer_loss: Callable[[Forward], Tensor],
        inner_loss: Callable[[Forward], Tensor] | None = None,
    ) -> Tensor | None:
        """:meth:`meta_step` if ``steps`` is a positive multiple of ``meta_every`` and no
        meta-step was taken since the last step; returns its loss, or None.

        Example:
            >>> import torch
            >>> from grokopt.neuralgrok import AmplifiedOptimizer
            >>> model = torch.nn.Linear(2, 1)
            >>> opt = AmplifiedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
            ...                          hidden=(4,), meta_every=2, g_hat="last")
            >>> outer = lambda fwd: fwd(torch.ones(1, 2)).pow(2).sum()
            >>> done = []
            >>> for _ in range(4):
            ...     model(torch.ones(1, 2)).sum().backward(); opt.step(); opt.zero_grad()
            ...     done.append(opt.maybe_meta_step(model, outer) is not None)
            >>> done
            [False, True, False, True]
        """
        steps = self.steps
        if steps == 0 or steps % self.meta_every or self._counters["last_meta_at"] == steps:
            return None
        return self.meta_step(model, outer_loss, inner_loss)

    # ------------------------------------------------------------------ state dict

    def _validate_param_state(self, param: Tensor, state: dict[str, Any]) -> None:
        saved = state.get("last_grad")
        if saved is not None and (not isinstance(saved, Tensor) or tuple(saved.shape) != tuple(param.shape)):
            shape = tuple(saved.shape) if isinstance(saved, Tensor) else type(saved).__name__
            raise ValueError(
                f"state_dict's neuralgrok_last_grad has shape {shape}, the parameter has "
                f"{tuple(param.shape)}"
            )

    def _extra_keys(self) -> tuple[str, ...]:
        return ("neuralgrok_amplifier", "neuralgrok_meta_optimizer", "neuralgrok_counters")

    def _extra_state_dict(self) -> dict[str, Any]:
        # Kept in a form that torch.distributed.checkpoint's flattened layout carries:
        # str keys without ".", and tensors, ints and floats as leaves.
        meta = self.meta_optimizer.state_dict()
        started = bool(meta["state"])
        if not started:
            # torch.distributed.checkpoint loads only the entries its target already has,
            # and a fresh meta-optimizer has none until its first step: show the entries
            # it will have (taken from a copy stepped once), flagged as not started.
            probe = self.__dict__.get("_meta_probe")
            if probe is None:  # the structure never changes: probe once
                probe = self.__dict__["_meta_probe"] = _state_structure(self.meta_optimizer)
            meta = {**meta, "state": {i: {k: v.clone() if isinstance(v, Tensor) else v
                                          for k, v in entries.items()}
                                      for i, entries in probe.items()}}
        return {
            "neuralgrok_amplifier": {
                k.replace(".", ":"): v for k, v in self.amplifier.state_dict().items()
            },
            "neuralgrok_meta_optimizer": {
                "started": int(started),
                "state": {str(i): dict(v) for i, v in meta["state"].items()},
                "groups": {
                    str(i): {k: v for k, v in g.items()
                             if isinstance(v, (Tensor, int, float)) and k != "params"}
                    for i, g in enumerate(meta["param_groups"])
                },
            },
            "neuralgrok_counters": dict(self._counters),
        }

    def _meta_state_dict(self, saved: Mapping[str, Any]) -> dict[str, Any]:
        """The meta-optimizer's state_dict rebuilt from its saved form (see above): the
        saved state and numeric hyperparameters over the live optimizer's groups."""
        live = self.meta_optimizer.state_dict()
        state = saved.get("state", {}) if saved.get("started", 1) else {}  # DCP drops empty dicts
        groups = saved.get("groups", {})
        return {
            "state": {int(i): dict(v) for i, v in state.items()},
            "param_groups": [{**g, **groups.get(str(i), {})}
                             for i, g in enumerate(live["param_groups"])],
        }

    def _legacy_extra_state(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        amp = state_dict.get("neuralgrok_amplifier")
        meta = state_dict.get("neuralgrok_meta_optimizer")
        counters = state_dict.get("neuralgrok_counters")
        if not (isinstance(amp, Mapping) and isinstance(meta, Mapping)
                and isinstance(counters, Mapping)):
            return {}
        groups = meta.get("param_groups", [])
        return {
            "neuralgrok_amplifier": {str(k).replace(".", ":"): v for k, v in amp.items()},
            "neuralgrok_meta_optimizer": {
                "started": int(bool(meta.get("state"))),
                "state": {str(i): dict(v) for i, v in meta.get("state", {}).items()},
                "groups": {str(i): {k: v for k, v in g.items()
                                    if isinstance(v, (Tensor, int, float)) and k != "params"}
                           for i, g in enumerate(groups) if isinstance(g, Mapping)},
            },
            "neuralgrok_counters": dict(counters),
        }

    def _check_extra_state_dict(self, extra: Mapping[str, Any]) -> None:
        for key in self._extra_keys():
            if key not in extra:
                raise ValueError(
                    f"state_dict lacks {key!r} (NeuralGrok's amplifier, meta-optimizer and "
                    f"counters, kept in the state of the first parameter that requires grad)"
                )
        saved = extra["neuralgrok_amplifier"]
        own = {k.replace(".", ":"): v for k, v in self.amplifier.state_dict().items()}
        if not isinstance(saved, Mapping) or set(saved) != set(own):
            raise ValueError(
                f"state_dict's neuralgrok_amplifier has keys "
                f"{sorted(saved) if isinstance(saved, Mapping) else type(saved).__name__}, this "
                f"amplifier has {sorted(own)}"
            )
        for k, v in own.items():
            if not isinstance(saved[k], Tensor) or saved[k].shape != v.shape:
                raise ValueError(
                    f"state_dict's neuralgrok_amplifier[{k!r}] does not match this amplifier's "
                    f"shape {tuple(v.shape)}"
                )
        meta = extra["neuralgrok_meta_optimizer"]
        n_params = len([p for g in self.meta_optimizer.param_groups for p in g["params"]])
        if (
            not isinstance(meta, Mapping) or not set(meta) <= {"started", "state", "groups"}
            or not isinstance(meta.get("state", {}), Mapping)
            or not isinstance(meta.get("groups", {}), Mapping)
            or any(not str(i).isdigit() or int(i) >= n_params for i in meta.get("state", {}))
            or any(not str(i).isdigit() or int(i) >= len(self.meta_optimizer.param_groups)
                   for i in meta.get("groups", {}))
        ):
            raise ValueError(
                "state_dict's neuralgrok_meta_optimizer does not fit this meta-optimizer "
                "(different parameters or groups)"
            )
        counters = extra["neuralgrok_counters"]
        if (
            not isinstance(counters, Mapping) or set(counters) != set(self._counters)
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in counters.values())
        ):
            raise ValueError(
                f"state_dict's neuralgrok_counters must hold non-negative ints under "
                f"{sorted(self._counters)}, got {counters!r}"
            )

    def _load_extra_state_dict(self, extra: Mapping[str, Any]) -> None:
        self.amplifier.load_state_dict(
            {k.replace(":", "."): v for k, v in extra["neuralgrok_amplifier"].items()}
        )
        self.meta_optimizer.load_state_dict(self._meta_state_dict(extra["neuralgrok_meta_optimizer"]))
        self._counters = dict(extra["neuralgrok_counters"])

    def __repr__(self) -> str:
        base = super().__repr__()
        head, _, rest = base.partition(",\n")
        return (f"{head}, meta_every={self.meta_every}, g_hat={self.g_hat!r}, "
                f"lookahead_lr={self.lookahead_lr!r}, path={self.path!r},\n{rest}")


def _state_structure(optimizer: Optimizer) -> dict[int, dict[str, Any]]:
    """The per-parameter state ``optimizer`` will hold after its first step: a copy of it,
    stepped once with zero gradients and learning rate 0, gives the entries' names, shapes
    and types (their values are not used)."""
    probe = copy.deepcopy(optimizer)
    for group in probe.param_groups:
        if "lr" in group:
            group["lr"] = torch.zeros_like(group["lr"]) if isinstance(group["lr"], Tensor) else 0.0
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    with torch.no_grad():
        probe.step()
    return probe.state_dict()["state"]


def _check_scalar(name: str, loss: Any) -> None:
    if not isinstance(loss, Tensor):
        raise TypeError(f"{name} must return a scalar tensor, got {describe(loss)}")
    if loss.numel() != 1:
        raise ValueError(f"{name} must return a scalar tensor, got a tensor of shape {tuple(loss.shape)}")
    if not loss.requires_grad:
        raise ValueError(
            f"{name} must return a loss computed from the forward it is given (one that "
            f"depends on the model's parameters), got a tensor that does not require grad"
        )
