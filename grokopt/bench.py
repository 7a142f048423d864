"""``grokopt bench``: what each grokopt method costs per training step, on your model.

For a model (a built-in reference model by name, or ``package.module:factory`` for your own
``nn.Module``) on one device, every method and combination of the race's method registry (``grokopt race
--list-methods``) is measured against the ``baseline`` step of the same base optimizer
(AdamW), in one run:

- time per training step: warm-up steps first, then ``repeats`` repetitions of ``steps``
  steps each; the methods take turns within each repetition (in a rotating order), so a load
  change on a shared machine hits all of them alike. Median and interquartile range over the
  repetitions; CUDA is synchronised before each clock read. NeuralGrok's meta-step (every
  ``meta_every`` steps, 4 by default) is inside the timed steps, so its cost is averaged in.
- peak memory of training (parameters, gradients, optimizer and method state, activations
  and transients), measured from just before the model is built, one method at a time:
  ``torch.cuda.max_memory_allocated`` on CUDA. On CPU the analogue is taken from the
  profiler's allocation records (``torch.profiler`` with ``profile_memory=True``): every
  allocation and free of torch's CPU allocator, summed in time order, peak of the running
  sum. That counts tensor bytes exactly like the CUDA figure does, unlike ``tracemalloc``
  (blind to torch's allocator) or the process RSS (which mixes in the allocator's caching,
  fragmentation and Python itself).

Ratios are ``median(method) / median(baseline)`` of the recorded per-step times, and
``peak(method) / peak(baseline)``. The environment (device, torch, Python, CPU, threads) is
written beside the numbers.

Use it from Python::

    from grokopt.bench import bench
    result = bench("decoder", methods=("grokfast", "neuralgrok"), out="bench.json")
    print(result.format_table())

or from the command line: ``grokopt bench --model decoder --out bench.json``.
"""

from __future__ import annotations

import gc
import importlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_bool, check_int, check_type
from .race.device import environment, resolve_device, sync
from .race.methods import (
    BASELINE,
    METHODS,
    MethodContext,
    TrainParts,
    penalty_route,
    training_step,
)
from .race.specs import RunSpec, parse_run_spec

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_METHODS",
    "BenchResult",
    "MethodResult",
    "bench",
]

_FORMAT_VERSION = 1

#: Arms measured by default (any arm of the race's registry can be asked for, combined with
#: "+" and with hyperparameters, e.g. "grokfast:lamb=5"). "baseline" is always measured.
DEFAULT_METHODS = (
    BASELINE,
    "grokfast",
    "grokfast-ma",
    "neuralgrok",
    "grokalign",
    "grokfast+grokalign",
    "grokfast+neuralgrok",
)

_META_EVERY = 4  # batches cycled: NeuralGrok's default meta-step period (docs/methods.md)
_LR = 1e-3
_BETAS = (0.9, 0.98)
_WEIGHT_DECAY = 0.01

BatchMaker = Callable[[int, torch.Generator], tuple[Tensor, Tensor]]



# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def _modular_batch(batch_size: int, gen: torch.Generator, p: int = 97) -> tuple[Tensor, Tensor]:
    # "a op b =" as 4 tokens (op = p, "=" = p + 1), the layout of the Grokfast runs.
    a = torch.randint(0, p, (batch_size,), generator=gen)
    b = torch.randint(1, p, (batch_size,), generator=gen)
    tokens = torch.stack([a, torch.full_like(a, p), b, torch.full_like(a, p + 1)], 1)
    return tokens, (a * b) % p


def _image_batch(batch_size: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    return torch.rand(batch_size, 784, generator=gen), torch.randint(0, 10, (batch_size,), generator=gen)


def _decoder() -> nn.Module:
    from .tasks.models import DecoderTransformer

    return DecoderTransformer(vocab_size=99, num_classes=99)


def _omnigrok() -> nn.Module:
    from .tasks.models import OmnigrokMLP

    return OmnigrokMLP(784, (196, 196, 196), 10, init_scale=8.0)


def _embedding_mlp() -> nn.Module:
    from .tasks.models import EmbeddingMLP

    return EmbeddingMLP(vocab_size=99, seq_len=4, num_classes=99)


@dataclass(frozen=True)
class _ModelSpec:
    factory: Callable[[], nn.Module]
    make_batch: BatchMaker
    batch_size: int
    outer_batch_size: int
    description: str


#: Built-in reference models: name -> what it is (batch sizes of the papers' runs).
BUILTIN_MODELS: dict[str, _ModelSpec] = {
    "decoder": _ModelSpec(
        _decoder, _modular_batch, 512, 93,
        "Grokfast/NeuralGrok decoder transformer (dim 128, 2 layers, 4 heads; 422,784 "
        "parameters), x*y mod 97 tokens, batch 512, outer batch 93"),
    "omnigrok-mlp": _ModelSpec(
        _omnigrok, _image_batch, 256, 64,
        "GrokAlign/Omnigrok MLP 784-196-196-196-10 (bias-free ReLU, init x8), batch 256 of "
        "random 28x28 images, outer batch 64"),
    "embedding-mlp": _ModelSpec(
        _embedding_mlp, _modular_batch, 512, 93,
        "embedding MLP for modular arithmetic (4 tokens x 128 -> 256 -> 99), batch 512, "
        "outer batch 93"),
}


def _import_object(path: str, arg: str) -> Any:
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{arg}: expected 'package.module:name', got {path!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{arg}: cannot import module {module_name!r} ({exc})") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{arg}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{arg}: {path!r} is not callable")
    return obj


def _resolve_model(
    model: str | Callable[..., nn.Module],
    model_kwargs: Mapping[str, Any],
    input_shape: Sequence[int] | None,
    make_batch: str | BatchMaker | None,
    batch_size: int | None,
    outer_batch_size: int | None,
) -> tuple[str, _ModelSpec]:
    if isinstance(model, str) and model in BUILTIN_MODELS:
        spec = BUILTIN_MODELS[model]
        if model_kwargs:
            raise ValueError(f"model_kwargs: built-in model {model!r} takes none, got {dict(model_kwargs)!r}")
        name = model
        factory, maker = spec.factory, spec.make_batch
        if input_shape is not None or make_batch is not None:
            raise ValueError(f"input_shape/make_batch: built-in model {model!r} makes its own batches")
    else:
        if isinstance(model, str):
            if ":" not in model:
                raise ValueError(
                    f"model: {model!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) "
                    f"nor an import path 'package.module:factory'")
            target = _import_object(model, "model")
            name = model
        elif callable(model) and not isinstance(model, nn.Module):
            target, name = model, getattr(model, "__qualname__", type(model).__name__)
        else:
            raise TypeError(
                f"model: expected a built-in name, 'package.module:factory' or a factory "
                f"callable (each method needs a fresh model), got {type(model).__name__}")
        kwargs = dict(model_kwargs)

        def factory() -> nn.Module:
            built = target(**kwargs)
            if not isinstance(built, nn.Module):
                raise TypeError(f"model: the factory {name!r} returned {type(built).__name__}, not an nn.Module")
            return built

        if make_batch is not None:
            if input_shape is not None:
                raise ValueError("input_shape/make_batch: give one of them, not both")
            maker = _import_object(make_batch, "make_batch") if isinstance(make_batch, str) else make_batch
            if not callable(maker):
                raise TypeError(f"make_batch: expected a callable or 'package.module:fn', got {make_batch!r}")
        elif input_shape is not None:
            shape = tuple(input_shape)
            if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
                raise ValueError(f"input_shape: expected positive ints (one sample's shape), got {input_shape!r}")
            maker = _random_input_maker(factory, shape)
        else:
            raise ValueError(
                f"input_shape/make_batch: model {name!r} is not built in; give input_shape "
                f"(one sample's shape, e.g. (784,)) or make_batch ('package.module:fn', "
                f"called as fn(batch_size, generator) -> (inputs, targets))")
        spec = _ModelSpec(factory, maker, 64, 16, f"{name}(**{kwargs!r})")
    check_int("batch_size", batch_size, minimum=1, allow_none=True)
    check_int("outer_batch_size", outer_batch_size, minimum=1, allow_none=True)
    spec = _ModelSpec(spec.factory, spec.make_batch, batch_size or spec.batch_size,
                      outer_batch_size or spec.outer_batch_size, spec.description)
    return name, spec


def _random_input_maker(factory: Callable[[], nn.Module], shape: tuple[int, ...]) -> BatchMaker:
    """Gaussian inputs of ``shape`` and class targets over the model's output width."""
    classes: list[int] = []

    def make(batch_size: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randn((batch_size, *shape), generator=gen)
        if not classes:
            with torch.no_grad():
                out = factory()(x[:2])
            if not isinstance(out, Tensor) or out.dim() != 2:
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(
                    f"input_shape: the model must map (batch, *input_shape) to logits "
                    f"(batch, classes) for random class targets; it returned {got} (give "
                    f"make_batch for other outputs)")
            classes.append(out.shape[1])
        return x, torch.randint(0, classes[0], (batch_size,), generator=gen)

    return make




# --------------------------------------------------------------------------------------------
# Methods: the race's registry and arm specs
# --------------------------------------------------------------------------------------------


def _parse_methods(methods: Sequence[str]) -> list[RunSpec]:
    """The arms to measure, ``baseline`` first (every ratio's denominator)."""
    if isinstance(methods, str) or not isinstance(methods, Sequence) or not methods:
        raise ValueError(f"methods must be a non-empty sequence of method specs (from "
                         f"{', '.join(METHODS)}), got {methods!r}")
    specs: list[RunSpec] = []
    seen: set[str] = set()
    for label in methods:
        check_type("methods", label, str, "a sequence of strings")
        spec = parse_run_spec(label)  # "methods: unknown method ...; allowed: ..."
        key = repr((spec.components, spec.params, spec.training))
        if key in seen:
            raise ValueError(f"methods: {label!r} is listed twice")
        seen.add(key)
        specs.append(spec)
    if not any(s.components == (BASELINE,) and not s.training for s in specs):
        specs.insert(0, parse_run_spec(BASELINE))
    specs.sort(key=lambda s: s.components != (BASELINE,) or bool(s.training))
    return specs


def _meta_every(spec: RunSpec) -> int | None:
    params = spec.params.get("neuralgrok")
    return None if params is None else int(params["meta_every"])


def _task_loss(logits: Tensor, y: Tensor) -> Tensor:
    if y.is_floating_point():
        return F.mse_loss(logits, y)
    return F.cross_entropy(logits, y)


class _Trainer:
    """One arm's model, optimizer and training step on fixed, pre-made batches, built by the
    race's registry exactly as a race arm is (the same methods, defaults and penalty route)."""

    def __init__(self, spec: _ModelSpec, arm: RunSpec, device: torch.device, seed: int,
                 batches: list[tuple[Tensor, Tensor]], outer: tuple[Tensor, Tensor]) -> None:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)  # same initial weights for every method
            model = spec.factory()
        self.model = model.to(device).train()
        self.batches = batches
        self.step_count = 0
        self.route = penalty_route(self.model)
        lr = float(arm.training.get("lr", _LR))
        base = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=_BETAS,
                                 weight_decay=float(arm.training.get("weight_decay",
                                                                     _WEIGHT_DECAY)))
        # Class targets train with cross-entropy itself (so StableMax can stand in for it).
        self.loss_fn = F.cross_entropy if not batches[0][1].is_floating_point() else _task_loss
        clip = arm.training.get("clip_grad_norm")
        ctx = MethodContext(
            model=self.model, base_optimizer=base, loss_fn=self.loss_fn,
            logits_from_penalty_input=self.route.logits, penalty_input=self.route.name,
            outer=outer, lr=lr, device=device, seed=seed, clip_grad_norm=clip)
        self.parts = TrainParts(optimizer=base)
        for name in arm.components:
            METHODS[name].apply(ctx, self.parts, arm.params[name])
        self.clip = None if clip is None or arm.uses_outer else (
            list[Tensor](self.model.parameters()), float(clip))

    def step(self) -> None:
        x, y = self.batches[self.step_count % len(self.batches)]
        training_step(self.parts, self.route, self.loss_fn, x, y, self.step_count, self.clip)
        self.step_count += 1


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def _cpu_peak(run: Callable[[], Any]) -> tuple[int, int, Any]:
    """(peak, retained) bytes of torch CPU allocations made while ``run()`` runs, and its result."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        value = run()
    # The raw allocation records, not prof.events(): those fold most records into the ops
    # that made them and lose the order needed for a peak.
    records = [e for e in prof.profiler.kineto_results.events()
               if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    records.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in records:
        live += e.nbytes()
        peak = max(peak, live)
    return peak, live, value


def _measure_memory(make: Callable[[], _Trainer], n_steps: int, device: torch.device) -> tuple[int, int]:
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        trainer = make()
        for _ in range(n_steps):
            trainer.step()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        retained = torch.cuda.memory_allocated(device) - base
        del trainer
        return peak, retained

    def run() -> _Trainer:
        trainer = make()
        for _ in range(n_steps):
            trainer.step()
        return trainer

    peak, retained, trainer = _cpu_peak(run)
    del trainer
    return peak, retained


def _trial(trainer: _Trainer, n_steps: int) -> None:
    for _ in range(n_steps):
        trainer.step()


def _quartiles(samples: Sequence[float]) -> tuple[float, float, float]:
    if not samples:
        return math.nan, math.nan, math.nan
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q1, med, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return q1, med, q3



# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class MethodResult:
    """One method's numbers: per-repetition seconds per step, their median and quartiles,
    peak and retained memory, and the ratios to the baseline step; or, for a method that cannot
    apply to the model, ``not_applicable`` (the reason) and no numbers.

    Example:
        >>> r = MethodResult("grokfast", ("grokfast",), [0.1, 0.2, 0.3, 0.4, 0.5])
        >>> r.median_s, round(r.iqr_s, 6)
        (0.3, 0.2)
    """

    method: str
    components: tuple[str, ...]
    seconds_per_step: list[float]
    peak_bytes: int | None = None
    retained_bytes: int | None = None
    time_ratio: float = math.nan
    memory_ratio: float | None = None
    not_applicable: str | None = None
    q1_s: float = field(init=False)
    median_s: float = field(init=False)
    q3_s: float = field(init=False)
    iqr_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.q1_s, self.median_s, self.q3_s = _quartiles(self.seconds_per_step)
        self.iqr_s = self.q3_s - self.q1_s


def _json_row(m: MethodResult) -> dict[str, Any]:
    row = {**asdict(m), "components": list(m.components)}
    # NaN is not JSON: a method without numbers (not applicable) has null ones.
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


@dataclass
class BenchResult:
    """What :func:`bench` returns; :meth:`to_dict` is the JSON written to ``out``.

    Example:
        >>> base = MethodResult("baseline", ("baseline",), [0.1, 0.1], time_ratio=1.0)
        >>> res = BenchResult("m", "cpu", {}, {}, [base], "none")
        >>> res.to_dict()["methods"][0]["time_ratio"]
        1.0
    """

    model: str
    device: str
    config: dict[str, Any]
    environment: dict[str, Any]
    methods: list[MethodResult]
    memory_method: str
    path: str | None = None

    def __getitem__(self, method: str) -> MethodResult:
        for m in self.methods:
            if m.method == method:
                return m
        raise KeyError(method)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": _FORMAT_VERSION,
            "model": self.model,
            "device": self.device,
            "config": self.config,
            "environment": self.environment,
            "memory_method": self.memory_method,
            "methods": [_json_row(m) for m in self.methods],
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` as JSON (parent folders are created)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        self.path = str(p)
        return p

    def _rows(self) -> list[list[str]]:
        rows = []
        for m in self.methods:
            if m.not_applicable is not None:
                rows.append([m.method, "-", "-", "not applicable", "-", "-"])
                continue
            mem = "-" if m.peak_bytes is None else f"{m.peak_bytes / 2**20:.1f}"
            mem_ratio = "-" if m.memory_ratio is None else f"{m.memory_ratio:.2f}x"
            rows.append([m.method, f"{1e3 * m.median_s:.2f}", f"{1e3 * m.iqr_s:.2f}",
                         f"{m.time_ratio:.2f}x", mem, mem_ratio])
        return rows

    _HEADER = ("method", "ms/step (median)", "IQR ms", "time vs baseline", "peak MiB",
               "memory vs baseline")

    def title(self) -> str:
        env = self.environment
        where = env.get("device_name") or env.get("cpu", "")
        n = self.config.get("parameters")
        size = f"{n:,}" if isinstance(n, int) else "?"
        return (f"grokopt bench: {self.model} ({size} parameters), "
                f"{self.device} [{where}], torch {env.get('torch')}, "
                f"{env.get('torch_threads')} thread(s)")

    def format_table(self) -> str:
        """The results as a plain-text table (what the command prints without rich).

        Example:
            >>> base = MethodResult("baseline", ("baseline",), [0.1, 0.1], time_ratio=1.0)
            >>> print(BenchResult("m", "cpu", {}, {}, [base], "none").format_table().splitlines()[2])
            baseline  100.00            0.00    1.00x             -          -
        """
        rows = [list(self._HEADER)] + self._rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(self._HEADER))]
        lines = [self.title()]
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        lines += self._reasons()
        return "\n".join(lines)

    def _reasons(self) -> list[str]:
        return [f"{m.method}: not applicable: {m.not_applicable}" for m in self.methods
                if m.not_applicable is not None]

    def rich_table(self) -> Any:
        """The results as a ``rich.table.Table`` (needs the ``[race]`` extra)."""
        from rich.table import Table

        caption = "\n".join([f"peak memory: {self.memory_method}", *self._reasons()])
        table = Table(title=self.title(), caption=caption, caption_justify="left")
        for i, h in enumerate(self._HEADER):
            table.add_column(h, justify="left" if i == 0 else "right")
        for r in self._rows():
            table.add_row(*r)
        return table




# --------------------------------------------------------------------------------------------
# The function
# --------------------------------------------------------------------------------------------


def bench(
    model: str | Callable[..., nn.Module] = "decoder",
    *,
    device: str | torch.device = "cpu",
    methods: Sequence[str] = DEFAULT_METHODS,
    model_kwargs: Mapping[str, Any] | None = None,
    input_shape: Sequence[int] | None = None,
    make_batch: str | BatchMaker | None = None,
    batch_size: int | None = None,
    outer_batch_size: int | None = None,
    repeats: int = 7,
    steps: int = 8,
    warmup: int = 4,
    memory: bool = True,
    threads: int | None = None,
    seed: int = 0,
    out: str | os.PathLike[str] | None = None,
) -> BenchResult:
    """Time and peak memory per training step of each method, relative to the baseline step.

    Every arm trains a fresh copy of the model (same initial weights, same batches) with
    AdamW (lr 1e-3, betas (0.9, 0.98), weight decay 0.01) and is built by the race's method
    registry, with its defaults (``grokopt race --list-methods``, docs/race.md): e.g.
    ``grokfast`` EMA (alpha 0.98, lamb 2), ``neuralgrok`` (amplifier (128, 128), meta-step
    every 4 steps on a held-out batch of ``outer_batch_size``; the meta-step is inside the
    timed steps), ``grokalign`` (weight 1e-3, one probe, estimator "vjp", penalty from the
    task's own forward), and ``orthograd``, ``stablemax``, ``egd``, ``muon``. An arm may set
    hyperparameters as in a race (``"grokfast:lamb=5,wd=0"``). ``"baseline"`` is always
    measured (the denominator). Each arm first trains for one meta-step cycle; one that
    cannot apply to the model (GrokAlign on a model with BatchNorm in training mode, or with
    integer inputs and no ``embed()``; StableMax with float targets) is reported as not
    applicable, with the reason, and the others are measured as usual.

    Args:
        model: a name in :data:`BUILTIN_MODELS`, ``"package.module:factory"``, or a factory
            callable; the factory is called with ``model_kwargs`` once per method.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
        methods: arm specs: names of the race's registry combined with ``"+"``,
            optionally with ``:key=value,...``.
        model_kwargs: keyword arguments of the factory (not for built-in models).
        input_shape: for your own model: one sample's shape; inputs are Gaussian and the
            targets random classes over the model's output width (cross-entropy).
        make_batch: instead of ``input_shape``: ``fn(batch_size, generator) -> (inputs,
            targets)`` (or its import path) giving CPU tensors; integer targets train with
            cross-entropy, float targets with MSE.
        batch_size, outer_batch_size: override the model's defaults (built-in: the papers').
        repeats: timed repetitions (the median and IQR are over these).
        steps: training steps per repetition; a multiple of ``meta_every`` when NeuralGrok is measured
            (so that every repetition holds the same number of meta-steps).
        warmup: untimed steps per method first (allocation, lazy state, one meta-step).
        memory: also measure peak memory (a separate pass per method).
        threads: torch CPU threads during the run (restored afterwards); None leaves them.
        seed: seed of the initial weights and the batches.
        out: write the JSON here.

    Returns:
        a :class:`BenchResult`; a method that could not apply has ``not_applicable`` set (the
        reason) and no numbers.

    Raises:
        ValueError: a bad argument (the message starts with its name), or a model whose
            baseline training step fails (``model: ...``).

    Example:
        >>> res = bench("grokopt.tasks.models:OmnigrokMLP", model_kwargs=dict(in_dim=8,
        ...             hidden=(16,), num_classes=3), input_shape=(8,), batch_size=16,
        ...             methods=("grokfast",), repeats=2, steps=2, warmup=1, memory=False)
        >>> [m.method for m in res.methods], res["baseline"].time_ratio
        (['baseline', 'grokfast'], 1.0)
    """
    dev = resolve_device(device)
    arms = _parse_methods(methods)
    check_int("repeats", repeats, minimum=1)
    check_int("steps", steps, minimum=1)
    check_int("warmup", warmup, minimum=0)
    check_int("seed", seed, minimum=0)
    check_bool("memory", memory)
    check_int("threads", threads, minimum=1, allow_none=True)
    for arm in arms:
        period = _meta_every(arm)
        if period is not None and steps % period:
            raise ValueError(
                f"steps must be a multiple of meta_every={period} when {arm.label!r} is "
                f"measured (every repetition then holds the same number of meta-steps), "
                f"got {steps}")
    if model_kwargs is not None:
        check_type("model_kwargs", model_kwargs, Mapping, "a mapping or None")
    name, spec = _resolve_model(model, model_kwargs or {}, input_shape, make_batch,
                                batch_size, outer_batch_size)

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        batches, outer = _make_batches(spec, seed, dev)

        def make(arm: RunSpec) -> _Trainer:
            return _Trainer(spec, arm, dev, seed, batches, outer)

        probe = make(arms[0])
        n_params = sum(p.numel() for p in probe.model.parameters())
        float_input = probe.route.prepare(batches[0][0]).is_floating_point()
        del probe
        peaks, not_applicable = _try_each(arms, make, name, float_input, memory, dev)
        samples = _time_each(arms, make, not_applicable, repeats, steps, warmup, dev)
        env = environment(dev)
    finally:
        torch.set_num_threads(old_threads)

    results = []
    for arm in arms:
        peak, retained = peaks.get(arm.label, (None, None))
        results.append(MethodResult(arm.label, arm.components, samples[arm.label], peak,
                                    retained, not_applicable=not_applicable.get(arm.label)))
    _set_ratios(results)
    config = dict(model=name, description=spec.description, parameters=n_params,
                  batch_size=spec.batch_size, outer_batch_size=spec.outer_batch_size,
                  methods=[arm.label for arm in arms], repeats=repeats, steps=steps,
                  warmup=warmup, seed=seed, base_optimizer=dict(name="AdamW", lr=_LR,
                  betas=list(_BETAS), weight_decay=_WEIGHT_DECAY))
    result = BenchResult(name, str(dev), config, env, results, _memory_method(memory, dev))
    if out is not None:
        result.save(out)
    return result


def _make_batches(spec: _ModelSpec, seed: int, dev: torch.device
                  ) -> tuple[list[tuple[Tensor, Tensor]], tuple[Tensor, Tensor]]:
    """Distinct batches, cycled (making data is not timed), and NeuralGrok's outer batch."""
    gen = torch.Generator().manual_seed(seed)
    made = [spec.make_batch(spec.batch_size, gen) for _ in range(_META_EVERY)]
    made.append(spec.make_batch(spec.outer_batch_size, gen))
    for b in made:
        if not isinstance(b, (tuple, list)) or len(b) != 2 or not all(
                isinstance(t, Tensor) for t in b):
            raise ValueError("make_batch must return (inputs, targets) tensors, got "
                             f"{type(b).__name__}")
    moved = [(b[0].to(dev), b[1].to(dev)) for b in made]
    return moved[:-1], moved[-1]


def _try_each(arms: list[RunSpec], make: Callable[[RunSpec], _Trainer], name: str,
              float_input: bool, memory: bool, dev: torch.device
              ) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
    """Train each arm for one meta-step cycle before anything is timed (measuring its peak
    memory on the way when asked): an arm that cannot apply to this model is reported as
    such, with the reason, and the others are still measured. The baseline failing means
    the model or batches are wrong."""
    peaks: dict[str, tuple[int, int]] = {}
    not_applicable: dict[str, str] = {}
    for arm in arms:
        if "grokalign" in arm.components and not float_input:
            not_applicable[arm.label] = (
                f"grokalign differentiates w.r.t. the model's input, but {name!r} takes "
                f"integer inputs and has no embed()/forward_embeddings()")
            continue
        try:
            if memory:
                peaks[arm.label] = _measure_memory(lambda: make(arm), _META_EVERY, dev)
            else:
                _trial(make(arm), _META_EVERY)
        except (ValueError, TypeError, RuntimeError, NotImplementedError) as exc:
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())
            if arm is arms[0]:
                raise ValueError(f"model: the {BASELINE} training step of {name!r} failed "
                                 f"({reason})") from exc
            not_applicable[arm.label] = reason
    return peaks, not_applicable


def _time_each(arms: list[RunSpec], make: Callable[[RunSpec], _Trainer],
               not_applicable: Mapping[str, str], repeats: int, steps: int, warmup: int,
               dev: torch.device) -> dict[str, list[float]]:
    """Seconds per step of each applicable arm, ``repeats`` times ``steps`` steps; the arms
    take turns within each repetition, in a rotating order."""
    trainers = {arm.label: make(arm) for arm in arms if arm.label not in not_applicable}
    for trainer in trainers.values():
        for _ in range(warmup):
            trainer.step()
    sync(dev)
    samples: dict[str, list[float]] = {arm.label: [] for arm in arms}
    labels = list(trainers)
    for rep in range(repeats):
        # Rotate who goes first: no method always runs right after another's allocations.
        for label in labels[rep % len(labels):] + labels[:rep % len(labels)]:
            trainer = trainers[label]
            sync(dev)
            t0 = time.perf_counter()
            for _ in range(steps):
                trainer.step()
            sync(dev)
            samples[label].append((time.perf_counter() - t0) / steps)
    return samples


def _set_ratios(results: list[MethodResult]) -> None:
    base = results[0]
    for r in results:
        if r.not_applicable is not None:
            continue
        r.time_ratio = r.median_s / base.median_s
        if r.peak_bytes is not None and base.peak_bytes:
            r.memory_ratio = r.peak_bytes / base.peak_bytes


def _memory_method(memory: bool, dev: torch.device) -> str:
    if not memory:
        return "not measured"
    if dev.type == "cuda":
        return ("torch.cuda.max_memory_allocated from just before the model is built, "
                f"over {_META_EVERY} steps")
    return ("torch.profiler CPU allocation records (profile_memory=True): peak of live torch "
            f"tensor bytes from just before the model is built, over {_META_EVERY} steps")
