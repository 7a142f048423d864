"""The base for "transform the gradients inside step(), then let any optimizer step".

A wrapper is a real :class:`torch.optim.Optimizer` (so LR schedulers accept it and step
hooks fire) that *shares* the inner optimizer's ``param_groups`` instead of copying them,
stores its own per-parameter state apart from the inner optimizer's (which lazy optimizers
such as Adam must find empty at their first step), shows both through one ``state`` view, and
writes one ``state_dict`` in the standard torch format with its own entries under namespaced
keys.

Wrappers nest: ``AmplifiedOptimizer(Grokfast(AdamW(...)))`` works because every level shares
the same group dicts and every level strips its own keys from a state_dict on the way in.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterator, Mapping, MutableMapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._checks import check_bool

__all__ = ["SKIP_STEP", "GradientTransform", "TransformResult"]

# A state_dict's top-level key listing the wrappers, outermost first, that produced it.
_STACK_KEY = "grokopt_stack"


#: On CPU, a transform that writes into scratch (Grokfast's steady step, OrthoGrad under
#: ``restore_grad``) keeps the scratch of gradients of this size and more from one step to
#: the next: fresh CPU memory of that size comes from the OS page by page (a page fault per
#: 4 KiB), which costs several times the transform itself; smaller tensors come from the
#: allocator's pools and are allocated each step. A constant, not a setting: the modules
#: that use it import their own reference to it.
KEEP_SCRATCH_BYTES = 256 * 1024


class _Skip:
    """The type of :data:`SKIP_STEP`."""

    def __repr__(self) -> str:
        return "SKIP_STEP"

    def __reduce__(self) -> str:
        # copy, deepcopy and pickle give back the one SKIP_STEP (looked up by name)
        return "SKIP_STEP"


#: What :meth:`GradientTransform._transform_gradients` returns to skip the step: nothing was
#: changed and the inner optimizer must not step.
SKIP_STEP = _Skip()

#: What :meth:`GradientTransform._transform_gradients` returns: None (step the inner
#: optimizer), :data:`SKIP_STEP` (skip the step) or a 0-d bool tensor ``found_inf``.
TransformResult = Tensor | _Skip | None

# Every wrapper's key prefix, to tell a wrapper's entries from an inner optimizer's.
_PREFIXES: dict[str, str] = {}


class _ParamStateView(MutableMapping):
    """One parameter's state across a wrapper stack: the inner optimizer's entries as they
    are, this wrapper's under ``f"{prefix}{name}"``, and, on the stack's anchor parameter,
    the wrapper-wide entries (see :meth:`GradientTransform._extra_state_dict`).

    Reads and writes go to where each entry is stored, so the usual "move the optimizer
    state to a device" loop (``state[k] = v.to(device)``) reaches every entry.
    """

    __slots__ = ("_owner", "_param")

    def __init__(self, owner: GradientTransform, param: Tensor) -> None:
        self._owner = owner
        self._param = param

    def _inner(self) -> Any:
        return self._owner.optimizer.state

    def _own(self) -> dict[str, Any]:
        return self._owner.own_state.get(self._param, {})

    def _wide(self) -> tuple[str, ...]:
        return tuple(self._owner._wide_entries()) if self._owner._is_anchor(self._param) else ()

    def __getitem__(self, key: str) -> Any:
        prefix = self._owner._prefix
        if isinstance(key, str) and key.startswith(prefix):
            name = key[len(prefix):]
            own = self._own()
            if name in own:
                return own[name]
            if key in self._wide():
                return self._owner._wide_entries()[key]
            raise KeyError(key)
        inner = self._inner()
        if self._param in inner:
            return inner[self._param][key]
        raise KeyError(key)

    def __setitem__(self, key: str, value: Any) -> None:
        prefix = self._owner._prefix
        if isinstance(key, str) and key.startswith(prefix):
            if key in self._wide():
                self._owner._set_wide_entry(key, value)
                return
            self._owner.own_state[self._param][key[len(prefix):]] = value
            self._owner._state_edited()
        else:
            self._inner()[self._param][key] = value

    def __delitem__(self, key: str) -> None:
        prefix = self._owner._prefix
        if isinstance(key, str) and key.startswith(prefix) and key[len(prefix):] in self._own():
            del self._owner.own_state[self._param][key[len(prefix):]]
            self._owner._state_edited()
            return
        inner = self._inner()
        if self._param not in inner or key not in inner[self._param]:
            raise KeyError(key)
        del inner[self._param][key]

    def __iter__(self) -> Iterator[str]:
        inner = self._inner()
        if self._param in inner:
            yield from inner[self._param]
        prefix = self._owner._prefix
        for name in self._own():
            yield prefix + name
        yield from self._wide()

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return repr(dict(self))


class _StateView(MutableMapping):
    """A wrapper's ``state``: ``state[p]`` is a :class:`_ParamStateView` over every optimizer
    of the stack; keys that are not parameters (``opt.state["my_counter"] = 3``) are the
    wrapper's own, as in torch.

    Its truth value means "this optimizer has training state": DCP initialises an optimizer
    whose ``state`` is empty by stepping it once with zero gradients, which must not happen
    to one that has state only in its counters (NeuralGrok with a stateless inner optimizer).
    """

    __slots__ = ("_owner",)

    def __init__(self, owner: GradientTransform) -> None:
        self._owner = owner

    def _is_param(self, key: Any) -> bool:
        return isinstance(key, Tensor) and id(key) in self._owner._param_ids()

    def __getitem__(self, key: Any) -> Any:
        if self._is_param(key):
            return _ParamStateView(self._owner, key)
        # torch's state is a defaultdict: an unknown key gets a fresh dict.
        return self._owner.own_state[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        if self._is_param(key):
            if not isinstance(value, Mapping):
                raise TypeError(
                    f"state[param] must be a dict of that parameter's entries, got "
                    f"{type(value).__name__}"
                )
            view = _ParamStateView(self._owner, key)
            for k in list(view):
                if k not in value and k not in view._wide():
                    del view[k]
            for k, v in value.items():
                view[k] = v
            return
        self._owner.own_state[key] = value

    def __delitem__(self, key: Any) -> None:
        if self._is_param(key):
            found = False
            if key in self._owner.own_state:
                del self._owner.own_state[key]
                self._owner._state_edited()
                found = True
            inner = self._owner.optimizer.state
            if key in inner:
                del inner[key]
                found = True
            if not found:
                raise KeyError(key)
            return
        del self._owner.own_state[key]

    def _param_keys(self) -> list[Tensor]:
        own, inner = self._owner.own_state, self._owner.optimizer.state
        seen: set[int] = set()
        out = []
        for group in self._owner.param_groups:
            for p in group["params"]:
                if id(p) not in seen and (p in own or p in inner):
                    seen.add(id(p))
                    out.append(p)
        return out

    def __iter__(self) -> Iterator[Any]:
        yield from self._param_keys()
        ids = self._owner._param_ids()
        for key in self._owner.own_state:
            if not (isinstance(key, Tensor) and id(key) in ids):
                yield key

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, key: Any) -> bool:
        if self._is_param(key):
            return key in self._owner.own_state or key in self._owner.optimizer.state
        return key in self._owner.own_state

    def __bool__(self) -> bool:
        return bool(self._owner.own_state) or self._owner._has_state()

    def __repr__(self) -> str:
        return repr({k: dict(v) if isinstance(v, MutableMapping) else v for k, v in self.items()})


class GradientTransform(Optimizer):
    """Base class: transform ``p.grad`` in :meth:`step`, then step the inner optimizer.

    Subclasses set ``_prefix`` (the namespace of their keys in param groups and state),
    pass the defaults of their per-group hyperparameters (keyed without the prefix) to
    ``__init__``, and implement :meth:`_validate_group` (called when a group's options
    change, not at every step) and :meth:`_transform_gradients` (which returns ``None`` to
    step, :data:`SKIP_STEP` to skip, or a device-side ``found_inf``; only the base class
    steps the inner optimizer). A subclass keeps its per-parameter entries in
    ``self.own_state[p]`` (a dict, keys without the prefix); ``state[p]`` shows them with
    the prefix beside the inner optimizer's.

    Hyperparameters live in each param group under ``f"{prefix}{name}"`` (for example
    ``group["grokfast_lamb"]``). The prefix is needed because the inner optimizer owns the
    same dicts and already uses plain names (RMSprop has its own ``alpha``).

    Args:
        optimizer: the inner optimizer (any :class:`torch.optim.Optimizer`, including
            another grokopt wrapper).
        hyperparameters: this wrapper's per-group hyperparameters, keyed without prefix.
        restore_grad: what ``p.grad`` holds after :meth:`step`. ``True`` (default): the
            gradient backward produced, the same tensor, bit for bit, as after any torch
            optimizer; the transform works on a scratch copy (or writes new tensors) that
            the inner optimizer steps on, so a step holds one extra gradient-sized buffer,
            freed before ``step()`` returns, except that on a CPU Grokfast and OrthoGrad
            keep theirs from step to step (see each wrapper's ``restore_grad``): an inner
            optimizer or hook that keeps a reference to ``p.grad`` across steps must copy
            it.
            ``False``: the transformed gradient, written in place (what the methods'
            reference code does), with no extra buffer. In a stack of wrappers the
            outermost one decides, and the inner ones work on its scratch copy: one extra
            buffer for the whole stack. Measured with 4 x 1024^2 fp32 parameters (16 MiB of
            gradients) under foreach AdamW, the peak extra memory of a step is 16 MiB in
            place (AdamW's own temporaries, as bare) and 32 MiB restoring for NeuralGrok;
            Grokfast and OrthoGrad keep their 16 MiB allocated between steps on a CPU, so
            their steps (and Grokfast(OrthoGrad(...))'s) read 16 MiB either way
            (benchmarks/test_restore_grad_bench.py,
            ``benchmarks/results/restore-grad-cpu.json``). A behaviour switch, kept out of
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
    optimizer: Optimizer  # the wrapped optimizer (set in __init__)
    #: What :meth:`_transform_gradients` returns to skip the step (also ``grokopt.wrapper.SKIP_STEP``).
    SKIP_STEP = SKIP_STEP

    def __init__(
        self,
        optimizer: Optimizer,
        hyperparameters: Mapping[str, Any],
        *,
        restore_grad: bool = True,
    ) -> None:
        check_bool("restore_grad", restore_grad)
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
        # This wrapper's own per-parameter entries (unprefixed) and its non-parameter keys;
        # the inner optimizer's stay in its own state, where lazy optimizers look for them.
        self.own_state: defaultdict[Any, dict[str, Any]] = defaultdict(dict)
        # id(group) -> (group, option values) last validated; see _check_groups.
        self._checked: dict[int, tuple[dict[str, Any], list[Any]]] = {}
        # Optimizer.__init__ installs the step-hook machinery and calls add_param_group for
        # each group; during construction that only fills in this wrapper's defaults.
        super().__init__(list(optimizer.param_groups), options)
        self._ready = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls._prefix:
            _PREFIXES.setdefault(cls._prefix, cls.__name__)

    @property  # type: ignore[override]
    def state(self) -> _StateView:
        """Every per-parameter entry of the stack: ``state[p]`` holds the inner optimizer's
        entries as they are and this wrapper's under ``f"{prefix}{name}"`` (for example
        ``state[p]["exp_avg"]`` and ``state[p]["grokfast_ema"]``); writes go to where each
        entry is stored."""
        return _StateView(self)

    @state.setter
    def state(self, value: Any) -> None:
        # Optimizer.__init__ assigns a fresh defaultdict; the storage is own_state.
        if self.__dict__.get("_ready", False):
            raise AttributeError(
                f"{type(self).__name__}.state is a view of the stack's state; change entries "
                f"through it or load a state_dict"
            )

    def _has_state(self) -> bool:
        """Whether this optimizer holds training state beyond its per-parameter entries."""
        return bool(self.optimizer.state)

    def _param_ids(self) -> set[int]:
        """``id`` of every parameter; cached while the groups' parameter lists are the
        same objects of the same lengths (a loop over ``state`` would otherwise scan every
        parameter once per entry)."""
        groups = self.param_groups
        key = (id(groups), tuple((id(g["params"]), len(g["params"])) for g in groups))
        cached = self.__dict__.get("_ids_cache")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_ids_cache"] = (
                key, {id(p) for group in groups for p in group["params"]})
        return cached[1]

    def _anchor(self) -> Tensor | None:
        """The parameter whose state entry also carries the wrapper-wide state: the first
        one that requires grad (DCP keeps state only for those), else the first one."""
        params = [p for group in self.param_groups for p in group["params"]]
        return next((p for p in params if p.requires_grad), params[0] if params else None)

    def _is_anchor(self, param: Tensor) -> bool:
        return bool(self._extra_keys()) and self._anchor() is param

    def _set_wide_entry(self, key: str, value: Any) -> None:
        """Write one wrapper-wide entry: checked and loaded like a state_dict's (its value
        is copied into the wrapper's own objects, which keep their device)."""
        flat = self._wide_entries()
        flat[key] = value
        tree = _unflatten_tree(flat)
        self._check_extra_state_dict(tree)
        self._load_extra_state_dict(tree)

    def _wide_entries(self) -> dict[str, Any]:
        """The wrapper-wide state as flat entries: ``"name/key/subkey"`` -> leaf, the form
        that every torch's DCP flattened layout carries (before torch 2.9 or so it takes no
        nested dicts in per-parameter state)."""
        return _flatten_tree(self._extra_state_dict())

    # ------------------------------------------------------------------ param groups

    @property
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
        self._check_groups()
        pairs: list[tuple[Tensor, Tensor]] = []
        counts = []  # gradients per group, in order
        for group in self.param_groups:
            n = len(pairs)
            pairs += [(p, g) for p in group["params"] if (g := p.grad) is not None]
            counts.append(len(pairs) - n)
        if any(g.is_sparse for _, g in pairs):
            raise RuntimeError(
                f"{type(self).__name__} does not support sparse gradients; use "
                f"dense gradients (e.g. nn.Embedding(sparse=False))"
            )
        # Called by an outer wrapper, the gradients are already its scratch copies.
        restore = self.restore_grad and not self.__dict__.get("_nested", False)
        users = pairs if restore else []
        if restore and self._makes_scratch:
            self._scratch_owed = True
        elif restore:
            self._swap_in_scratch(users)
        self._step_pairs = pairs
        self._step_counts = counts
        try:
            found_inf = self._transform_gradients()
            if isinstance(found_inf, bool):
                raise TypeError(
                    f"{type(self).__name__}._transform_gradients returned {found_inf!r}; it "
                    f"must return None (step the inner optimizer), SKIP_STEP (skip the step) "
                    f"or a 0-d bool tensor found_inf"
                )
            if not isinstance(found_inf, _Skip):  # (SKIP_STEP)
                if users and self._makes_scratch and isinstance(self.optimizer, GradientTransform):
                    # A nested wrapper writes into the gradients it is given: it must not
                    # be given the user's, which the transform left where it changed nothing.
                    for p, g in users:
                        if p.grad is g:
                            p.grad = g.clone()
                self._inner_step(found_inf)
        finally:
            self.__dict__.pop("_scratch_owed", None)
            self.__dict__.pop("_step_pairs", None)
            self.__dict__.pop("_step_counts", None)
            for p, g in users:
                p.grad = g
        return loss

    #: Whether the transform gives the user's gradients back by itself under
    #: ``restore_grad``: it never writes into them, and points ``p.grad`` at new tensors
    #: for what it changes (see :meth:`_making_scratch`). Otherwise the base copies every
    #: gradient first.
    _makes_scratch: bool = False

    def _gradients_at_step(self) -> tuple[list[tuple[Tensor, Tensor]], list[int]]:
        """Inside :meth:`step`: the ``(param, grad)`` pairs the step began with, over all
        groups in order (the user's gradients: a scratch swap happens after), and how many
        of them each group holds."""
        return self.__dict__["_step_pairs"], self.__dict__["_step_counts"]

    def _state_edited(self) -> None:
        """Called when an entry of this wrapper's is written or deleted through ``state``;
        a subclass drops what it cached of its state."""

    @staticmethod
    def _as_gradient(out: Tensor, g: Tensor) -> Tensor:
        """A transform's output ``out`` for gradient ``g``, to point ``p.grad`` at under
        ``restore_grad``: in ``g``'s dtype and memory layout, as the inner optimizer would
        get ``g`` without the wrapper (a fused optimizer walks memory: channels_last and
        transposed gradients stay so); ``out`` itself where it already is."""
        if out.dtype == g.dtype and out.stride() == g.stride():
            return out
        return torch.empty_like(g).copy_(out)

    def _making_scratch(self) -> bool:
        """Whether this step's transform must leave the gradients it is given unwritten
        (``restore_grad`` under a wrapper with ``_makes_scratch``)."""
        return self.__dict__.get("_scratch_owed", False)

    def _check_groups(self) -> None:
        """Fill in missing defaults and validate each group's options once per change.

        A group's options are validated when they differ from the values last validated
        (a scheduler may change them between steps), so an unchanged group costs one
        comparison per option, not a validation, per step. Tensor values compare by
        identity: a 0-d tensor changed in place is the caller's to keep valid.
        """
        self._fill_defaults()
        checked = self._checked
        live = set()
        for group in self.param_groups:
            values = [v for k, v in group.items() if k.startswith(self._prefix)]
            live.add(id(group))
            last = checked.get(id(group))
            if (last is not None and last[0] is group and len(last[1]) == len(values)
                    and all(_same_value(a, b) for a, b in zip(last[1], values))):
                continue
            self._validate_group(_own_keys(group, self._prefix))
            checked[id(group)] = (group, values)
        for key in [k for k in checked if k not in live]:
            del checked[key]

    def _swap_in_scratch(self, users: list[tuple[Tensor, Tensor]]) -> None:
        """Point every ``p.grad`` of the (param, grad) pairs at a copy.

        Pointer swaps, not copies back: the user gets the very tensor backward wrote (a
        DDP bucket view stays one), and the copies are freed when the step ends.
        """
        for p, g in users:
            p.grad = g.clone()

    def _transform_gradients(self) -> TransformResult:
        """Transform ``p.grad`` in place for every parameter, and say how the step goes on.

        Returns ``None`` to step the inner optimizer, :data:`SKIP_STEP` to skip the step
        (nothing may have changed), or a 0-d bool tensor ``found_inf`` on the gradients'
        device: the inner optimizer (a fused torch optimizer, which reads it on the
        device) then steps with it, and leaves parameters and state unchanged where it is
        true. Only this base class steps the inner optimizer.
        """
        raise NotImplementedError

    def _inner_step_context(self) -> contextlib.AbstractContextManager[None]:
        """A context around the inner step (a subclass may adjust the groups in it)."""
        return contextlib.nullcontext()

    def _inner_step(self, found_inf: Tensor | None = None) -> None:
        """Step the inner optimizer, with a device-side ``found_inf`` when one is given."""
        with self._inner_step_context():
            if found_inf is None:
                self._step_inner_optimizer()
                return
            inner = self.optimizer
            inner.found_inf = found_inf.float()  # type: ignore[attr-defined]
            inner.grad_scale = None  # type: ignore[attr-defined]
            try:
                self._step_inner_optimizer()
            finally:
                del inner.found_inf, inner.grad_scale  # type: ignore[attr-defined]

    def _step_inner_optimizer(self) -> None:
        """``self.optimizer.step()`` without torch's global step hooks (they fired for this
        wrapper's own step); the inner optimizer's own hooks still run. Private to this
        class: subclasses return what the step needs from :meth:`_transform_gradients`."""
        inner = self.optimizer
        nested = isinstance(inner, GradientTransform)
        if nested:
            inner.__dict__["_nested"] = True
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

        Standard torch format: ``state`` keyed by parameter index, each entry holding what
        ``state[p]`` shows (the inner optimizer's entries and this wrapper's under
        ``f"{prefix}{name}"``; a wrapper with state of its own that belongs to no parameter,
        such as NeuralGrok's amplifier, keeps it in the entry of its anchor parameter, the
        first that requires grad), ``param_groups`` with ``params`` lists and this
        wrapper's prefixed hyperparameters, plus ``grokopt_stack`` naming the wrappers.
        That layout survives torch.distributed.checkpoint in both its nested and its
        flattened form, which keep only ``state`` and ``param_groups``. Entries of ``state``
        under keys that are not parameters are passed through as they are;
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
        for key, entries in self.own_state.items():
            if isinstance(key, Tensor) and id(key) in index_of:
                if entries:
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
        extra = self._wide_entries()
        if extra:
            anchor = self._anchor()
            if anchor is None:
                raise ValueError(f"{type(self).__name__} has no parameters to save state with")
            state.setdefault(index_of[id(anchor)], {}).update(extra)
        out = {k: v for k, v in inner.items() if k not in ("state", "param_groups")}
        # Groups that lack this wrapper's keys (see _fill_defaults) are saved with the
        # values that their next step would use.
        defaults = self._own_defaults()
        out.update(state=state, param_groups=[{**defaults, **g} for g in inner["param_groups"]])
        out[_STACK_KEY] = [type(self).__name__, *inner.get(_STACK_KEY, [])]
        if own_keys:
            out[self._state_keys_key()] = own_keys
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, out)
            if result is not None:
                out = result
        return out

    def _state_keys_key(self) -> str:
        """The top-level key listing this wrapper's non-parameter ``state`` keys."""
        return f"{self._prefix}state_keys"

    def _stack_prefixes(self) -> set[str]:
        prefixes = set()
        opt: Optimizer = self
        while isinstance(opt, GradientTransform):
            prefixes.add(opt._prefix)
            opt = opt.optimizer
        return prefixes

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict produced by :meth:`state_dict` of the same wrapper stack.

        Also one carried by torch.distributed.checkpoint (``set_optimizer_state_dict``, in
        the nested or the flattened layout), which drops ``grokopt_stack``: the wrapper's
        prefixed hyperparameters in the param groups then identify it.

        Everything is checked before anything changes: a state from another wrapper or a
        plain optimizer, a different number of groups or parameters, missing keys or
        wrongly shaped tensors raise ``ValueError`` and leave this optimizer (and the inner
        one) untouched. The load hooks registered on this wrapper run as in torch: the pre
        hooks get a shallow copy of ``state_dict`` and may return another one to load
        instead, the post hooks run once everything is loaded. ``state`` entries under keys
        that are not parameter indices go back to this wrapper when its state_dict listed
        them as its own, else to the inner optimizer, as they are; an int key of the inner
        optimizer's that is not a parameter index is refused, though, as state saved for
        more parameters than there are (torch would keep it).
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
        state_dict = _drop_legacy_mirror(state_dict)
        self._check_producer(state_dict)
        by_index = self._match_params(state_dict["param_groups"])
        inner_state, own_state, flat = self._route_entries(state_dict, by_index)
        wide = _unflatten_tree(flat) or self._legacy_extra_state(state_dict)
        self._check_extra_state_dict(wide)

        inner_sd = {
            k: v for k, v in state_dict.items()
            if k not in ("state", _STACK_KEY, self._state_keys_key(), *self._extra_keys())
        }
        inner_sd["state"] = inner_state
        stack = state_dict.get(_STACK_KEY)
        if stack and stack[1:]:
            inner_sd[_STACK_KEY] = stack[1:]
        self.optimizer.load_state_dict(inner_sd)
        self.own_state.clear()
        self.own_state.update(own_state)
        self._state_edited()
        self._checked.clear()
        self._load_extra_state_dict(wide)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _check_producer(self, state_dict: Mapping[str, Any]) -> None:
        """Refuse a state_dict that this wrapper stack did not produce: a different stack,
        or (no stack key, as after DCP) groups without any of this wrapper's keys."""
        saved_groups = state_dict["param_groups"]
        if not isinstance(saved_groups, (list, tuple)) or not all(
            isinstance(g, Mapping) for g in saved_groups
        ):
            raise ValueError("state_dict's 'param_groups' must be a list of dicts")
        stack = state_dict.get(_STACK_KEY)
        ours = any(k.startswith(self._prefix) for g in saved_groups for k in g
                   if isinstance(k, str))
        if (stack is not None and (not stack or stack[0] != type(self).__name__)) or (
            stack is None and not ours
        ):
            plain = (
                f"; to add {type(self).__name__} to a run saved with the bare optimizer, load "
                f"this state_dict into the inner optimizer instead, before or after wrapping "
                f"(wrapper.optimizer.load_state_dict(sd)): this wrapper then starts fresh "
                f"with its defaults"
            ) if not stack else ""
            raise ValueError(
                f"state_dict was not produced by {type(self).__name__} (its wrapper stack is "
                f"{list(stack) if stack else 'a plain optimizer'}); load it into the "
                f"optimizer that saved it{plain}"
            )

    def _match_params(self, saved_groups: list[Mapping[str, Any]]) -> dict[Any, Tensor]:
        """Saved parameter index -> live parameter, once groups and sizes are checked."""
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} parameter groups, this optimizer has "
                f"{len(self.param_groups)}"
            )
        params: list[tuple[Any, Tensor]] = []
        for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"param group {i} of state_dict has {len(saved['params'])} parameters, "
                    f"this optimizer's has {len(group['params'])}"
                )
            self._validate_group(_own_keys(saved, self._prefix))
            params.extend(zip(saved["params"], group["params"]))
        return dict(params)

    def _route_entries(
        self, state_dict: Mapping[str, Any], by_index: dict[Any, Tensor]
    ) -> tuple[dict[Any, Any], dict[Any, Any], dict[str, Any]]:
        """Split a state_dict's ``state`` by owner, checking each piece: the inner
        optimizer's entries, this wrapper's own (per parameter and non-parameter keys), and
        its wrapper-wide entries."""
        own_keys = state_dict.get(self._state_keys_key(), [])
        if not isinstance(own_keys, (list, tuple)) or any(
            not isinstance(k, Hashable) or k not in state_dict["state"] or k in by_index
            for k in own_keys
        ):
            raise ValueError(
                f"state_dict's {self._state_keys_key()!r} must list keys of its 'state' that "
                f"are not parameter indices, got {own_keys!r}"
            )
        stack_prefixes = self._stack_prefixes()
        roots = set(self._extra_keys())
        inner_state: dict[Any, Any] = {}
        own_state: dict[Any, Any] = {}
        wide: dict[str, Any] = {}
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
            own, rest = {}, {}
            for k, v in entries.items():
                if isinstance(k, str) and k.split("/", 1)[0] in roots:
                    wide[k] = v
                    continue
                if isinstance(v, Mapping) and not v:
                    raise ValueError(
                        f"state_dict's state[{index!r}][{k!r}] is an empty placeholder: the "
                        f"checkpoint lacks this entry (torch.distributed.checkpoint's "
                        f"flattened layout rebuilds entries from the live optimizer's key "
                        f"names; the optimizer that saved it had a different configuration)"
                    )
                foreign = _PREFIXES.get(next(
                    (q for q in _PREFIXES if isinstance(k, str) and k.startswith(q)), ""))
                if isinstance(k, str) and k.startswith(self._prefix):
                    own[k[len(self._prefix):]] = v
                elif foreign and not any(k.startswith(q) for q in stack_prefixes):
                    raise ValueError(
                        f"state_dict's state[{index!r}] holds {k!r}, an entry of {foreign}, "
                        f"which is not in this optimizer's wrapper stack"
                    )
                else:
                    rest[k] = v
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
        return inner_state, own_state, wide

    def _validate_param_state(self, param: Tensor, state: dict[str, Any]) -> None:
        """Raise ValueError if a loaded per-parameter state does not fit ``param``."""

    def _extra_keys(self) -> tuple[str, ...]:
        """Names (prefixed) of this wrapper's wrapper-wide state: state that belongs to no
        parameter. It is kept in the anchor parameter's entry (see :meth:`state_dict`)."""
        return ()

    def _extra_state_dict(self) -> dict[str, Any]:
        """The wrapper-wide state, ``{name: value}`` for each of :meth:`_extra_keys`.

        Each value is a tensor, an int, a float, or a dict of those (nested dicts allowed)
        with ``str`` keys that contain no ``"."`` nor ``"/"``: the base stores it flattened,
        as ``"name/key/subkey"`` entries, which every layout of torch.distributed.checkpoint
        carries, and hands it back nested to :meth:`_check_extra_state_dict`.
        """
        return {}

    def _legacy_extra_state(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        """The wrapper-wide state of a checkpoint written by grokopt 0.1, which kept it at
        the state_dict's top level, converted to the current form ({} if there is none)."""
        return {}

    def _check_extra_state_dict(self, extra: Mapping[str, Any]) -> None:
        """Validate the wrapper-wide entries found in a state_dict (some may be missing)
        before anything is loaded."""

    def _load_extra_state_dict(self, extra: Mapping[str, Any]) -> None:
        """Load the wrapper-wide entries (called after everything was validated)."""

    # ------------------------------------------------------------------ pickling

    def __getstate__(self) -> dict[str, Any]:
        # Optimizer.__getstate__ keeps only defaults/state/param_groups, which would lose
        # the inner optimizer. Keep everything else except what torch drops too: the hooks,
        # and the step() an LR scheduler patches onto the instance.
        return {
            k: v for k, v in self.__dict__.items()
            if not k.startswith("_optimizer_")
            and k not in ("step", "_opt_called", "_nested", "_checked", "_bucket_cache",
                          "_scratch_owed", "_ids_cache", "_step_pairs",
                          "_step_counts", "_fast_plan", "_flat_buffers", "_scalars",
                          "_kept_scratch", "_kept_stacks")
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("restore_grad", True)  # pickled before the option existed
        self.__dict__.setdefault("_checked", {})
        if "state" in self.__dict__:  # pickled before the state view: it was the own state
            self.own_state = defaultdict(dict, self.__dict__.pop("state"))

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
    hooked: Any = type(optimizer).step
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


def _same_value(a: Any, b: Any) -> bool:
    """Whether a group option still holds the value last validated."""
    if a is b:
        return True
    if isinstance(a, Tensor) or isinstance(b, Tensor) or type(a) is not type(b):
        return False
    try:
        return bool(a == b)
    except Exception:  # a value whose == does not give a bool: validate again
        return False


def _flatten_tree(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a/b/c": leaf}`` (empty dicts leave no entry)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(_flatten_tree(value, name))
        else:
            out[name] = value
    return out


def _unflatten_tree(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`_flatten_tree`."""
    out: dict[str, Any] = {}
    for name, value in flat.items():
        *path, last = name.split("/")
        node = out
        for part in path:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"state_dict's entry {name!r} clashes with a value at {part!r}")
        node[last] = value
    return out


# grokopt 0.1 also copied a wrapper's top-level state_dict entries into param_groups[0]
# under this key (as torch.save bytes) for torch.distributed.checkpoint; the state now
# lives where DCP keeps it, and the copy of an old checkpoint is dropped on load.
_LEGACY_MIRROR_KEY = "grokopt_top_level"


def _drop_legacy_mirror(state_dict: dict[str, Any]) -> dict[str, Any]:
    groups = state_dict.get("param_groups")
    if isinstance(groups, (list, tuple)) and any(
        isinstance(g, Mapping) and _LEGACY_MIRROR_KEY in g for g in groups
    ):
        return {**state_dict, "param_groups": [
            {k: v for k, v in g.items() if k != _LEGACY_MIRROR_KEY} for g in groups]}
    return state_dict
