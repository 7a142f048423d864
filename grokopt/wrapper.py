"""The base for "transform the gradients inside step(), then let any optimizer step".

A wrapper is a real :class:`torch.optim.Optimizer` (so LR schedulers accept it and step
hooks fire) that *shares* the inner optimizer's ``param_groups`` instead of copying them,
keeps its own per-parameter state in ``self.state`` (never in the inner optimizer's state,
which would make lazy optimizers such as Adam skip their own initialisation), and writes one
``state_dict`` in the standard torch format with its own tensors under namespaced keys.

Wrappers nest: ``AmplifiedOptimizer(Grokfast(AdamW(...)))`` works because every level shares
the same group dicts and every level strips its own keys from a state_dict on the way in.
"""

from __future__ import annotations

import inspect
import io
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["GradientTransform"]

# A state_dict's top-level key listing the wrappers, outermost first, that produced it.
_STACK_KEY = "grokopt_stack"
# torch.distributed.checkpoint's get_optimizer_state_dict keeps only "state" and
# "param_groups" (every key of each group, though), so a wrapper's top-level keys would be
# lost. They are also mirrored under this key of the first param group, serialised with
# torch.save to one bytes value: a group then still holds only plain values (comparable
# with ==, which tensors are not), and DCP saves it as one object. load_state_dict lifts
# them back (weights_only) when the top level lacks them. Cost: the top-level entries
# (a few hundred KB for a default amplifier with its Adam state) are stored twice.
_MIRROR_KEY = "grokopt_top_level"


class _WrapperState(defaultdict):
    """A wrapper's per-parameter state whose truth value means "this optimizer has state".

    torch.distributed.checkpoint initialises an optimizer whose ``state`` is empty by calling
    ``step()`` once with zero gradients. A wrapper may keep no per-parameter state of its
    own (AmplifiedOptimizer with g_hat="recompute") while its inner optimizer does; judged by
    its own dict alone it would look fresh at every save, and that zero step would advance
    the inner optimizer (Adam's step count and moments) and the wrapper's counters.
    """

    def __init__(self, owner: GradientTransform | None = None, *args: Any) -> None:
        super().__init__(dict, *args)
        self._owner = owner

    def __bool__(self) -> bool:
        if len(self):
            return True
        owner = self.__dict__.get("_owner")
        return owner is not None and owner._has_state()

    def __reduce__(self) -> Any:
        # The owner is re-attached by GradientTransform.__setstate__; keeping it out of the
        # reduce arguments avoids a reference cycle through the pickled arguments.
        return (_WrapperState, (), None, None, iter(self.items()))


class GradientTransform(Optimizer):
    """Base class: transform ``p.grad`` in :meth:`step`, then step the inner optimizer.

    Subclasses set ``_prefix`` (the namespace of their keys in param groups and state) and
    ``_hyperparameters`` (defaults of their per-group hyperparameters, keyed without the
    prefix), and implement :meth:`_validate_group` and :meth:`_transform_gradients`.

    Hyperparameters live in each param group under ``f"{prefix}{name}"`` (for example
    ``group["grokfast_lamb"]``). The prefix is needed because the inner optimizer owns the
    same dicts and already uses plain names (RMSprop has its own ``alpha``).

    Args:
        optimizer: the inner optimizer (any :class:`torch.optim.Optimizer`, including
            another grokopt wrapper).
        hyperparameters: this wrapper's per-group hyperparameters, keyed without prefix.
        restore_grad: what ``p.grad`` holds after :meth:`step`. ``True`` (default): the
            gradient backward produced, the same tensor, bit for bit, as after any torch
            optimizer; the transform works on a scratch copy that the inner optimizer
            steps on, so a step briefly holds one extra gradient-sized buffer (freed
            before ``step()`` returns). ``False``: the transformed gradient, written in
            place (what the methods' reference code does), with no extra buffer. In a
            stack of wrappers the outermost one decides, and the inner ones work on its
            scratch copy: one extra buffer for the whole stack. Measured with 4 x 1024^2
            fp32 parameters (16 MiB of gradients) under foreach AdamW, the peak extra
            memory of a step is 16 MiB in place (AdamW's own temporaries, as bare) and
            32 MiB restoring, for Grokfast, OrthoGrad and Grokfast(OrthoGrad(...)) alike
            (benchmarks/test_restore_grad_bench.py). A behaviour switch, kept out of
            ``state_dict``.

    Step hooks: hooks registered on the wrapper, and torch's global hooks
    (:func:`torch.optim.optimizer.register_optimizer_step_pre_hook` and ``_post_hook``),
    fire once per ``step()``, with the wrapper as the optimizer. The inner optimizer is
    stepped without the global hooks; hooks registered on the inner optimizer itself still
    fire around its step (with the transformed gradients), once per step.

    ``state_dict`` and ``load_state_dict`` run the hooks registered on the wrapper with
    torch's semantics (a state_dict post hook's result is what ``state_dict()`` returns, a
    load pre hook may return the state_dict to load). Entries of ``state`` whose key is not
    a parameter (``opt.state["my_counter"] = 3``) are passed through as torch does and come
    back in the same optimizer of the stack on load.

    Example:
        >>> import torch
        >>> from grokopt import Grokfast
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = Grokfast(torch.optim.AdamW(model.parameters(), lr=1e-3), lamb=2.0)
        >>> model(torch.randn(4, 3)).sum().backward()
        >>> opt.step(); opt.zero_grad()
    """

    _prefix: str = ""
    _hyperparameters: dict[str, Any] = {}

    def __init__(
        self,
        optimizer: Optimizer,
        hyperparameters: Mapping[str, Any],
        *,
        restore_grad: bool = True,
    ) -> None:
        if not isinstance(restore_grad, bool):
            raise TypeError(
                f"restore_grad must be a bool, got {type(restore_grad).__name__}: "
                f"{restore_grad!r}"
            )
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer instance, got "
                f"{type(optimizer).__name__}: wrap an optimizer you have already built, "
                f"e.g. {type(self).__name__}(torch.optim.AdamW(model.parameters()))"
            )
        if not isinstance(hyperparameters, Mapping):
            raise TypeError(
                f"hyperparameters must be a mapping of name to default value, got "
                f"{type(hyperparameters).__name__}"
            )
        inner: Optimizer = optimizer
        while isinstance(inner, GradientTransform):
            if type(inner) is type(self):
                raise ValueError(
                    f"optimizer is already wrapped in {type(self).__name__}; nesting the "
                    f"same wrapper twice would mix their state (they share one namespace)"
                )
            inner = inner.optimizer
        _refuse_undrivable(inner, type(self).__name__)
        self.optimizer = optimizer
        self.restore_grad = restore_grad
        options = {self._prefix + k: v for k, v in hyperparameters.items()}
        # Validate every existing group before touching any of them, so a rejected
        # constructor leaves the caller's optimizer exactly as it was.
        for group in optimizer.param_groups:
            self._validate_group({**options, **_own_keys(group, self._prefix)})
        self._ready = False
        # Optimizer.__init__ installs the step-hook machinery and calls add_param_group for
        # each group; during construction that only fills in this wrapper's defaults.
        super().__init__(list(optimizer.param_groups), options)
        self.state = _WrapperState(self, self.state)
        self._ready = True

    def _has_state(self) -> bool:
        """Whether this optimizer holds training state (see :class:`_WrapperState`)."""
        return bool(self.optimizer.state)

    # ------------------------------------------------------------------ param groups

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        # Always the inner optimizer's *current* list: load_state_dict replaces it, and an
        # alias taken at construction would leave schedulers changing stale dicts.
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        if not self.__dict__.get("_ready", False):
            return  # Optimizer.__init__ resets the list; the inner optimizer owns it.
        self.optimizer.param_groups = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the inner optimizer, with this wrapper's defaults filled in."""
        if not self.__dict__.get("_ready", False):
            # Called from Optimizer.__init__ for a group the inner optimizer already has.
            for k, v in self._own_defaults().items():
                param_group.setdefault(k, v)
            return
        if not isinstance(param_group, dict):
            raise TypeError(
                f"param_group must be a dict, got {type(param_group).__name__}"
            )
        self._validate_group({**self._own_defaults(), **_own_keys(param_group, self._prefix)})
        self.optimizer.add_param_group(param_group)
        for k, v in self._own_defaults().items():
            self.optimizer.param_groups[-1].setdefault(k, v)

    def _own_defaults(self) -> dict[str, Any]:
        # Optimizer.__setstate__ adds "differentiable" to defaults; it is not ours to set.
        return _own_keys(self.defaults, self._prefix)

    def _validate_group(self, options: dict[str, Any]) -> None:
        """Raise ValueError/TypeError for an invalid set of this wrapper's group options."""

    # ------------------------------------------------------------------ stepping

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """Transform the gradients, then step the inner optimizer.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss; it
                is evaluated once, here, before the transform (optimizers whose step needs
                a closure that they call several times, such as LBFGS, would see the
                transform only on the first evaluation: they are refused at construction).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._fill_defaults()
        for group in self.param_groups:
            self._validate_group(_own_keys(group, self._prefix))
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients; use "
                        f"dense gradients (e.g. nn.Embedding(sparse=False))"
                    )
        # Called by an outer wrapper, the gradients are already its scratch copies.
        restore = self.restore_grad and not self.__dict__.get("_nested", False)
        users = self._swap_in_scratch() if restore else []
        try:
            if self._transform_gradients():
                self._inner_step()
        finally:
            for p, g in users:
                p.grad = g
        return loss

    def _swap_in_scratch(self) -> list[tuple[Tensor, Tensor]]:
        """Point every ``p.grad`` at a copy; return the user's (param, grad) pairs.

        Pointer swaps, not copies back: the user gets the very tensor backward wrote (a
        DDP bucket view stays one), and the copies are freed when the step ends.
        """
        users = [(p, p.grad) for group in self.param_groups for p in group["params"]
                 if p.grad is not None]
        for p, g in users:
            p.grad = g.clone()
        return users

    def _transform_gradients(self) -> bool:
        """Transform ``p.grad`` in place for every parameter; return False to skip the step."""
        raise NotImplementedError

    def _inner_step(self) -> None:
        """Step the inner optimizer (subclasses may adjust its groups around the call).

        Overrides step it through :meth:`_step_inner_optimizer`, never
        ``self.optimizer.step()``, which would fire torch's global step hooks a second time.
        """
        self._step_inner_optimizer()

    def _step_inner_optimizer(self) -> None:
        """``self.optimizer.step()`` without torch's global step hooks (they fired for this
        wrapper's own step); the inner optimizer's own hooks still run."""
        inner = self.optimizer
        nested = isinstance(inner, GradientTransform)
        if nested:
            inner._nested = True
        try:
            _step_without_global_hooks(inner)
        finally:
            if nested:
                inner.__dict__.pop("_nested", None)

    def _fill_defaults(self) -> None:
        """Give every group this wrapper's defaults for the keys it lacks.

        ``wrapper.optimizer.load_state_dict(sd)`` with a plain optimizer's state_dict (adding
        a wrapper to a run that has a checkpoint) replaces the groups with ones that carry
        none of this wrapper's keys; so does a state_dict saved before a key was added.
        """
        defaults = self._own_defaults()
        for group in self.param_groups:
            for k, v in defaults.items():
                group.setdefault(k, v)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def _grads(self, group: dict[str, Any]) -> Iterator[tuple[Tensor, Tensor]]:
        """(param, grad) pairs of a group, parameters without a gradient skipped."""
        for p in group["params"]:
            if p.grad is not None:
                yield p, p.grad

    # ------------------------------------------------------------------ state dict

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state_dict with this wrapper's state merged in.

        Standard torch format: ``state`` keyed by parameter index (this wrapper's tensors
        under ``f"{prefix}{name}"`` keys beside the inner optimizer's), ``param_groups``
        with ``params`` lists, plus ``grokopt_stack`` naming the wrappers. Entries of
        ``state`` under keys that are not parameters are passed through as they are;
        ``f"{prefix}state_keys"`` lists those of this wrapper, so that loading gives them
        back to it. The state_dict hooks registered on this wrapper run as in torch.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        inner = self.optimizer.state_dict()
        index_of = _param_indices(self.param_groups)  # the numbering torch's state_dict uses
        indices = set(index_of.values())
        state = {k: dict(v) if k in indices else v for k, v in inner["state"].items()}
        own_keys = []
        for key, entries in self.state.items():
            if isinstance(key, Tensor) and id(key) in index_of:
                state.setdefault(index_of[id(key)], {}).update(
                    {self._prefix + k: v for k, v in entries.items()}
                )
                continue
            if isinstance(key, Tensor):
                raise ValueError(
                    f"{type(self).__name__}.state holds an entry under a tensor of shape "
                    f"{tuple(key.shape)} that is not one of this optimizer's parameters"
                )
            if key in state or key in indices:
                what = ("a parameter index" if key in indices
                        else "a key of the inner optimizer's state")
                raise ValueError(
                    f"{type(self).__name__}.state holds an entry under {key!r}, which is also "
                    f"{what}: a state_dict cannot hold both. Keep it under another key"
                )
            state[key] = entries
            own_keys.append(key)
        out = {k: v for k, v in inner.items() if k not in ("state", "param_groups")}
        # Groups that lack this wrapper's keys (see _fill_defaults) are saved with the
        # values that their next step would use.
        defaults = self._own_defaults()
        out.update(state=state, param_groups=[{**defaults, **g} for g in inner["param_groups"]])
        out[_STACK_KEY] = [type(self).__name__, *inner.get(_STACK_KEY, [])]
        if own_keys:
            out[self._state_keys_key()] = own_keys
        out.update(self._extra_state_dict())
        top = {k: v for k, v in out.items() if k not in ("state", "param_groups")}
        groups = [{k: v for k, v in g.items() if k != _MIRROR_KEY} for g in out["param_groups"]]
        if groups:
            buffer = io.BytesIO()
            torch.save(top, buffer)
            groups[0][_MIRROR_KEY] = buffer.getvalue()
        out["param_groups"] = groups
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, out)
            if result is not None:
                out = result
        return out

    def _state_keys_key(self) -> str:
        """The top-level key listing this wrapper's non-parameter ``state`` keys."""
        return f"{self._prefix}state_keys"

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict produced by :meth:`state_dict` of the same wrapper stack.

        Everything is checked before anything changes: a state from another wrapper, a
        different number of groups or parameters, missing keys or wrongly shaped tensors
        raise ``ValueError`` and leave this optimizer (and the inner one) untouched. The
        load hooks registered on this wrapper run as in torch: the pre hooks get a shallow
        copy of ``state_dict`` and may return another one to load instead, the post hooks
        run once everything is loaded. ``state`` entries under keys that are not parameter
        indices go back to this wrapper when its state_dict listed them as its own, else to
        the inner optimizer, as they are; an int key of the inner optimizer's that is not a
        parameter index is refused, though, as state saved for more parameters than there
        are (torch would keep it).
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = dict(state_dict)  # shallow, as torch: a pre hook may change it in place
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"a load_state_dict pre hook returned a {type(state_dict).__name__}, "
                f"expected a state_dict (a dict)"
            )
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"state_dict is missing the key {key!r}")
        _refuse_flattened(state_dict)
        state_dict = _lift_mirror(state_dict)
        stack = list(state_dict.get(_STACK_KEY, []))
        if not stack or stack[0] != type(self).__name__:
            plain = (
                f"; to add {type(self).__name__} to a run saved with the bare optimizer, load "
                f"this state_dict into the inner optimizer instead, before or after wrapping "
                f"(wrapper.optimizer.load_state_dict(sd)): this wrapper then starts fresh "
                f"with its defaults"
            ) if not stack else ""
            raise ValueError(
                f"state_dict was not produced by {type(self).__name__} (its wrapper stack is "
                f"{stack or 'a plain optimizer'}); load it into the optimizer that saved it "
                f"(torch.distributed.checkpoint with flatten_optimizer_state_dict=True also "
                f"loses the wrapper's keys: use the default nested layout){plain}"
            )
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} parameter groups, this optimizer has "
                f"{len(self.param_groups)}"
            )
        params = []
        for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"param group {i} of state_dict has {len(saved['params'])} parameters, "
                    f"this optimizer's has {len(group['params'])}"
                )
            self._validate_group(_own_keys(saved, self._prefix))
            params.extend(zip(saved["params"], group["params"]))
        by_index = dict(params)

        own_keys = state_dict.get(self._state_keys_key(), [])
        if not isinstance(own_keys, (list, tuple)) or any(
            not isinstance(k, Hashable) or k not in state_dict["state"] or k in by_index
            for k in own_keys
        ):
            raise ValueError(
                f"state_dict's {self._state_keys_key()!r} must list keys of its 'state' that "
                f"are not parameter indices, got {own_keys!r}"
            )
        inner_state: dict[Any, Any] = {}
        own_state: dict[Any, Any] = {}
        for index, entries in state_dict["state"].items():
            if index in own_keys:
                own_state[index] = entries  # passed through as it is, as torch does
                continue
            if index not in by_index:
                if isinstance(index, int):
                    # Most likely state saved for more parameters than this optimizer has.
                    raise ValueError(
                        f"state_dict has state for unknown parameter index {index!r} (this "
                        f"optimizer has {len(by_index)} parameters)"
                    )
                # Not a parameter and not this wrapper's: the inner optimizer's, as it is.
                inner_state[index] = entries
                continue
            own = {k[len(self._prefix):]: v for k, v in entries.items() if k.startswith(self._prefix)}
            rest = {k: v for k, v in entries.items() if not k.startswith(self._prefix)}
            if rest:
                inner_state[index] = rest
            if own:
                p = by_index[index]
                self._validate_param_state(p, own)
                # Keep the saved dtype (fp32 filter state for bf16 params); move devices only.
                own_state[p] = {
                    k: v.to(device=p.device) if isinstance(v, Tensor) else v
                    for k, v in own.items()
                }
        self._check_extra_state_dict(state_dict)

        inner_sd = {
            k: v for k, v in state_dict.items()
            if k not in ("state", _STACK_KEY, self._state_keys_key())
            and k not in self._extra_keys()
        }
        inner_sd["state"] = inner_state
        if stack[1:]:
            inner_sd[_STACK_KEY] = stack[1:]
        self.optimizer.load_state_dict(inner_sd)
        self.state.clear()
        self.state.update(own_state)
        self._load_extra_state_dict(state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _validate_param_state(self, param: Tensor, state: dict[str, Any]) -> None:
        """Raise ValueError if a loaded per-parameter state does not fit ``param``."""

    def _extra_keys(self) -> tuple[str, ...]:
        """Top-level state_dict keys owned by this wrapper (beyond per-parameter state)."""
        return ()

    def _extra_state_dict(self) -> dict[str, Any]:
        return {}

    def _check_extra_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Validate this wrapper's top-level keys before anything is loaded."""

    def _load_extra_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load this wrapper's top-level keys (called after everything was validated)."""

    # ------------------------------------------------------------------ pickling

    def __getstate__(self) -> dict[str, Any]:
        # Optimizer.__getstate__ keeps only defaults/state/param_groups, which would lose
        # the inner optimizer. Keep everything else except what torch drops too: the hooks,
        # and the step() an LR scheduler patches onto the instance.
        return {
            k: v for k, v in self.__dict__.items()
            if not k.startswith("_optimizer_") and k not in ("step", "_opt_called", "_nested")
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("restore_grad", True)  # pickled before the option existed
        if isinstance(self.__dict__.get("state"), _WrapperState):
            self.state._owner = self

    def __repr__(self) -> str:
        inner = repr(self.optimizer).replace("\n", "\n  ")
        options = ", ".join(
            f"{k[len(self._prefix):]}={v!r}" for k, v in self._own_defaults().items()
        )
        return f"{type(self).__name__}({options},\n  {inner})"


def _step_without_global_hooks(optimizer: Optimizer) -> None:
    """``optimizer.step()`` as torch's step wrapper runs it, minus the global hooks.

    torch wraps each optimizer class's ``step`` in a function that runs the global hooks,
    then the instance's hooks, around the original (``__wrapped__``); this runs the
    instance's hooks around the original itself. A ``step`` replaced on the instance is
    called as it is, except an LR scheduler's call tracker, whose only effect (recording
    that the optimizer stepped) is reproduced.
    """
    patched = optimizer.__dict__.get("step")
    if patched is not None:
        if not getattr(patched, "_wrapped_by_lr_sched", False):
            patched()
            return
        optimizer._opt_called = True  # type: ignore[attr-defined]
    hooked = type(optimizer).step
    if not getattr(hooked, "hooked", False) or not hasattr(hooked, "__wrapped__"):
        hooked(optimizer)
        return
    args: tuple[Any, ...] = (optimizer,)
    kwargs: dict[str, Any] = {}
    with torch.autograd.profiler.record_function(f"Optimizer.step#{type(optimizer).__name__}.step"):
        for pre_hook in optimizer._optimizer_step_pre_hooks.values():
            result = pre_hook(optimizer, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(
                        f"a step pre hook of {type(optimizer).__name__} must return None or "
                        f"a tuple (new_args, new_kwargs), got {result!r}"
                    )
                args, kwargs = result
        hooked.__wrapped__(*args, **kwargs)
        optimizer._optimizer_step_code()
        for post_hook in optimizer._optimizer_step_post_hooks.values():
            post_hook(optimizer, args, kwargs)


def _refuse_undrivable(optimizer: Optimizer, wrapper: str) -> None:
    """Refuse, at construction, an inner optimizer that a wrapper's step() cannot drive."""
    try:
        closure = inspect.signature(type(optimizer).step).parameters.get("closure")
    except (TypeError, ValueError):  # a step() without a readable signature: let it be
        closure = None
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise ValueError(
            f"optimizer {type(optimizer).__name__} cannot be wrapped by {wrapper}: its step() "
            f"requires a closure, which it re-evaluates within one step (as LBFGS does), "
            f"and every gradient after the first evaluation would reach it untransformed; "
            f"wrap a first-order optimizer (SGD, Adam, AdamW, ...)"
        )
    if isinstance(optimizer, torch.optim.SparseAdam):
        raise ValueError(
            f"optimizer SparseAdam cannot be wrapped by {wrapper}: it steps only on sparse "
            f"gradients and the wrappers' transforms need dense ones; use Adam or AdamW "
            f"with dense gradients"
        )


def _refuse_flattened(state_dict: Mapping[str, Any]) -> None:
    """Refuse what DCP's flattened layout hands back, naming the cause.

    With ``StateDictOptions(flatten_optimizer_state_dict=True)``, set_optimizer_state_dict
    rebuilds each parameter's state from the key names of the *live* optimizer's
    ``state[p]``; a wrapper's ``state[p]`` names only its own entries, unprefixed, so the
    rebuilt state holds an empty dict under each of those names and nothing else (the
    inner optimizer's entries are lost), and the top-level keys are dropped. Those empty
    placeholders are the signature looked for here.
    """
    state = state_dict.get("state")
    if not isinstance(state, Mapping):
        return
    for entries in state.values():
        if isinstance(entries, Mapping) and any(
            isinstance(v, Mapping) and not v for v in entries.values()
        ):
            raise ValueError(
                "state_dict holds empty placeholders where per-parameter state should be: "
                "it was rebuilt by torch.distributed.checkpoint with "
                "flatten_optimizer_state_dict=True, which cannot carry a wrapper's state "
                "(it rebuilds entries from the live optimizer's key names). Save and load "
                "with the default nested layout, StateDictOptions("
                "flatten_optimizer_state_dict=False); nothing was changed"
            )


def _lift_mirror(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The state_dict with the mirrored top-level keys restored (where the top level lacks
    them, as after torch.distributed.checkpoint) and the mirror removed from the groups."""
    groups = state_dict["param_groups"]
    if not isinstance(groups, (list, tuple)) or not all(isinstance(g, Mapping) for g in groups):
        raise ValueError("state_dict's 'param_groups' must be a list of dicts")
    mirror = groups[0].get(_MIRROR_KEY) if groups else None
    out = dict(state_dict)
    if mirror is not None and _STACK_KEY not in out:
        try:
            lifted = torch.load(io.BytesIO(mirror), weights_only=True, map_location="cpu")
        except Exception as exc:
            raise ValueError(
                f"state_dict's param_groups[0][{_MIRROR_KEY!r}] (the wrapper state kept "
                f"for torch.distributed.checkpoint) is unreadable: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(lifted, dict):
            raise ValueError(
                f"state_dict's param_groups[0][{_MIRROR_KEY!r}] holds a "
                f"{type(lifted).__name__}, expected a dict of the wrapper's top-level keys"
            )
        out.update(lifted)
    out["param_groups"] = [{k: v for k, v in g.items() if k != _MIRROR_KEY} for g in groups]
    return out


def _param_indices(groups: list[dict[str, Any]]) -> dict[int, int]:
    """``id(param)`` to its index in a state_dict, numbered as torch's state_dict does."""
    index_of: dict[int, int] = {}
    start = 0
    for group in groups:
        for i, p in enumerate(group["params"], start):
            index_of.setdefault(id(p), i)
        start += len(group["params"])
    return index_of


def _own_keys(group: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k.startswith(prefix)}
