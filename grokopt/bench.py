"""``grokopt bench``: what each grokopt method costs per training step, on your model.

For a model (a built-in reference model by name, or ``package.module:factory`` for your own
``nn.Module``) on one device, every method and combination is measured against the plain
step of the same base optimizer (AdamW), in one run:

- time per training step: warm-up steps first, then ``repeats`` repetitions of ``steps``
  steps each; the methods take turns within each repetition (in a rotating order), so a load
  change on a shared machine hits all of them alike. Median and interquartile range over the
  repetitions; CUDA is synchronised before each clock read. NeuralGrok's meta-step (every
  ``meta_every=4`` steps) is inside the timed steps, so its cost is averaged in.
- peak memory of training (parameters, gradients, optimizer and method state, activations
  and transients), measured from just before the model is built, one method at a time:
  ``torch.cuda.max_memory_allocated`` on CUDA. On CPU the analogue is taken from the
  profiler's allocation records (``torch.profiler`` with ``profile_memory=True``): every
  allocation and free of torch's CPU allocator, summed in time order, peak of the running
  sum. That counts tensor bytes exactly like the CUDA figure does, unlike ``tracemalloc``
  (blind to torch's allocator) or the process RSS (which mixes in the allocator's caching,
  fragmentation and Python itself).

Ratios are ``median(method) / median(plain)`` of the recorded per-step times, and
``peak(method) / peak(plain)``. The environment (device, torch, Python, CPU, threads) is
written beside the numbers.

Use it from Python::

    from grokopt.bench import bench
    result = bench("decoder", methods=("grokfast", "neuralgrok"), out="bench.json")
    print(result.format_table())

or from the command line: ``grokopt bench --model decoder --out bench.json``.
"""

from __future__ import annotations

import argparse
import ast
import gc
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BUILTIN_MODELS",
    "COMPONENTS",
    "DEFAULT_METHODS",
    "BenchResult",
    "MethodResult",
    "add_bench_arguments",
    "bench",
    "run_from_args",
]

_FORMAT_VERSION = 1

#: Method components; combine with "+" (e.g. "grokfast+grokalign"). "plain" stands alone.
COMPONENTS = ("plain", "grokfast", "grokfast-ma", "neuralgrok", "grokalign")

DEFAULT_METHODS = (
    "plain",
    "grokfast",
    "grokfast-ma",
    "neuralgrok",
    "grokalign",
    "grokfast+grokalign",
    "grokfast+neuralgrok",
)

_META_EVERY = 4  # NeuralGrok's meta-step period for the two-operand tasks (docs/methods.md)
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


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


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
    if batch_size is not None:
        _check_int("batch_size", batch_size, 1)
    if outer_batch_size is not None:
        _check_int("outer_batch_size", outer_batch_size, 1)
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
# Methods
# --------------------------------------------------------------------------------------------


def _parse_methods(methods: Sequence[str]) -> list[tuple[str, tuple[str, ...]]]:
    if isinstance(methods, str) or not isinstance(methods, Sequence) or not methods:
        raise ValueError(f"methods: expected a non-empty sequence of method names, got {methods!r}")
    parsed: list[tuple[str, tuple[str, ...]]] = []
    seen: set[frozenset[str]] = set()
    for label in methods:
        if not isinstance(label, str):
            raise ValueError(f"methods: expected strings, got {label!r}")
        parts = tuple(p.strip() for p in label.split("+"))
        for p in parts:
            if p not in COMPONENTS:
                raise ValueError(f"methods: unknown method {p!r} in {label!r}; allowed: "
                                 f"{', '.join(COMPONENTS)}, combined with '+'")
        if len(set(parts)) != len(parts):
            raise ValueError(f"methods: {label!r} names a method twice")
        if "plain" in parts and len(parts) > 1:
            raise ValueError(f"methods: 'plain' cannot be combined ({label!r})")
        if {"grokfast", "grokfast-ma"} <= set(parts):
            raise ValueError(f"methods: {label!r} combines both Grokfast filters; pick one")
        key = frozenset(parts)
        if key in seen:
            raise ValueError(f"methods: {label!r} is listed twice")
        seen.add(key)
        parsed.append(("+".join(parts), parts))
    # The plain step is every ratio's denominator: always measured, always first.
    if frozenset({"plain"}) not in seen:
        parsed.insert(0, ("plain", ("plain",)))
    else:
        parsed.sort(key=lambda m: m[0] != "plain")
    return parsed


class _Trainer:
    """One method's model, optimizer and training step on fixed, pre-made batches."""

    def __init__(self, spec: _ModelSpec, parts: tuple[str, ...], device: torch.device, seed: int,
                 batches: list[tuple[Tensor, Tensor]], outer: tuple[Tensor, Tensor]) -> None:
        from .grokalign import GrokAlignLoss
        from .grokfast import Grokfast
        from .neuralgrok import AmplifiedOptimizer

        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)  # same initial weights for every method
            model = spec.factory()
        self.model = model.to(device).train()
        self.batches, self.outer = batches, outer
        self.step_count = 0
        # Token models: GrokAlign differentiates w.r.t. the embeddings (the paper's choice);
        # the bare Sequential of an Omnigrok MLP takes the piecewise-linear fast path.
        if hasattr(model, "embed") and hasattr(model, "forward_embeddings"):
            self.prepare: Callable[[Tensor], Tensor] = model.embed
            self.logits: Callable[[Tensor], Tensor] = model.forward_embeddings
        elif type(getattr(model, "net", None)) is nn.Sequential and hasattr(model, "num_classes"):
            self.prepare, self.logits = (lambda x: x.flatten(1)), model.net
        else:
            self.prepare, self.logits = (lambda x: x), model
        opt: torch.optim.Optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=_LR, betas=_BETAS, weight_decay=_WEIGHT_DECAY)
        if "grokfast" in parts:
            opt = Grokfast(opt, alpha=0.98, lamb=2.0)
        elif "grokfast-ma" in parts:
            opt = Grokfast(opt, filter="ma", window=100, lamb=5.0)
        self.amplified = "neuralgrok" in parts
        if self.amplified:
            opt = AmplifiedOptimizer(opt, hidden=(128, 128), meta_every=_META_EVERY)
        self.opt = opt
        self.align = None
        if "grokalign" in parts:
            gen = torch.Generator(device=device).manual_seed(seed + 1)
            self.align = GrokAlignLoss(self.logits, weight=1e-3, estimator="vjp", generator=gen)

    def loss_fn(self, logits: Tensor, y: Tensor) -> Tensor:
        if y.is_floating_point():
            return F.mse_loss(logits, y)
        return F.cross_entropy(logits, y)

    def step(self) -> None:
        x, y = self.batches[self.step_count % len(self.batches)]
        self.step_count += 1
        inp = self.prepare(x)
        if self.align is not None:
            logits, penalty = self.align.forward_with_penalty(inp)
            loss = self.loss_fn(logits, y) + penalty
        else:
            loss = self.loss_fn(self.logits(inp), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.amplified:
            x_out, y_out = self.outer
            self.opt.maybe_meta_step(  # type: ignore[attr-defined]
                self.model, lambda fwd: self.loss_fn(fwd(x_out), y_out),
                inner_loss=lambda m: self.loss_fn(m(x), y))


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _resolve_device(device: Any) -> torch.device:
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise ValueError(f"device: expected 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device: expected 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} requested but torch.cuda.is_available() is False")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _cpu_peak(run: Callable[[], Any]) -> tuple[int, int, Any]:
    """(peak, retained) bytes of torch CPU allocations made while ``run()`` runs, and its result."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        value = run()
    # The raw allocation records, not prof.events(): those fold most records into the ops
    # that made them and lose the order needed for a peak.
    records = [e for e in prof.profiler.kineto_results.events()  # type: ignore[union-attr]
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
        _sync(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        trainer = make()
        for _ in range(n_steps):
            trainer.step()
        _sync(device)
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


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _environment(device: torch.device) -> dict[str, Any]:
    from . import __version__

    env: dict[str, Any] = {
        "grokopt": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, device_memory_bytes=props.total_memory,
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return env


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class MethodResult:
    """One method's numbers: per-repetition seconds per step, their median and quartiles,
    peak and retained memory, and the ratios to the plain step; or, for a method that cannot
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
        >>> plain = MethodResult("plain", ("plain",), [0.1, 0.1], time_ratio=1.0)
        >>> res = BenchResult("m", "cpu", {}, {}, [plain], "none")
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

    _HEADER = ("method", "ms/step (median)", "IQR ms", "time vs plain", "peak MiB",
               "memory vs plain")

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
            >>> plain = MethodResult("plain", ("plain",), [0.1, 0.1], time_ratio=1.0)
            >>> print(BenchResult("m", "cpu", {}, {}, [plain], "none").format_table().splitlines()[2])
            plain   100.00            0.00    1.00x          -          -
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
    """Time and peak memory per training step of each method, relative to the plain step.

    Every method trains a fresh copy of the model (same initial weights, same batches) with
    AdamW (lr 1e-3, betas (0.9, 0.98), weight decay 0.01) and the method's defaults:
    ``grokfast`` EMA (alpha 0.98, lamb 2), ``grokfast-ma`` (window 100, lamb 5),
    ``neuralgrok`` (amplifier (128, 128), meta-step every 4 steps on a held-out batch of
    ``outer_batch_size``, the paper's recomputed g_hat; the meta-step is inside the timed
    steps), ``grokalign`` (weight 1e-3, one probe, the default estimator "vjp", penalty from the task's
    own forward). "plain" is always measured (the denominator). Each method first trains
    for one meta-step cycle; one that cannot apply to the model (GrokAlign on a model with
    BatchNorm in training mode, or with integer inputs and no ``embed()``) is reported as not
    applicable, with the reason, and the others are measured as usual.

    Args:
        model: a name in :data:`BUILTIN_MODELS`, ``"package.module:factory"``, or a factory
            callable; the factory is called with ``model_kwargs`` once per method.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
        methods: method labels: names in :data:`COMPONENTS`, combined with ``"+"``.
        model_kwargs: keyword arguments of the factory (not for built-in models).
        input_shape: for your own model: one sample's shape; inputs are Gaussian and the
            targets random classes over the model's output width (cross-entropy).
        make_batch: instead of ``input_shape``: ``fn(batch_size, generator) -> (inputs,
            targets)`` (or its import path) giving CPU tensors; integer targets train with
            cross-entropy, float targets with MSE.
        batch_size, outer_batch_size: override the model's defaults (built-in: the papers').
        repeats: timed repetitions (the median and IQR are over these).
        steps: training steps per repetition; a multiple of 4 when NeuralGrok is measured
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
            plain training step fails (``model: ...``).

    Example:
        >>> res = bench("grokopt.tasks.models:OmnigrokMLP", model_kwargs=dict(in_dim=8,
        ...             hidden=(16,), num_classes=3), input_shape=(8,), batch_size=16,
        ...             methods=("grokfast",), repeats=2, steps=2, warmup=1, memory=False)
        >>> [m.method for m in res.methods], res["plain"].time_ratio
        (['plain', 'grokfast'], 1.0)
    """
    dev = _resolve_device(device)
    parsed = _parse_methods(methods)
    _check_int("repeats", repeats, 1)
    _check_int("steps", steps, 1)
    _check_int("warmup", warmup, 0)
    _check_int("seed", seed, 0)
    if not isinstance(memory, bool):
        raise ValueError(f"memory: expected a bool, got {memory!r}")
    if threads is not None:
        _check_int("threads", threads, 1)
    if any("neuralgrok" in parts for _, parts in parsed) and steps % _META_EVERY:
        raise ValueError(
            f"steps: must be a multiple of meta_every={_META_EVERY} when NeuralGrok is measured, "
            f"so that every repetition holds the same number of meta-steps; got {steps}")
    if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
        raise ValueError(f"model_kwargs: expected a mapping, got {model_kwargs!r}")
    name, spec = _resolve_model(model, model_kwargs or {}, input_shape, make_batch,
                                batch_size, outer_batch_size)

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(seed)
        n_batches = _META_EVERY  # distinct batches, cycled: data making is not timed
        batches = [tuple(t.to(dev) for t in spec.make_batch(spec.batch_size, gen))
                   for _ in range(n_batches)]
        outer = tuple(t.to(dev) for t in spec.make_batch(spec.outer_batch_size, gen))
        for b in [*batches, outer]:
            if len(b) != 2 or not all(isinstance(t, Tensor) for t in b):
                raise ValueError("make_batch: must return (inputs, targets) tensors")

        def make(parts: tuple[str, ...]) -> _Trainer:
            return _Trainer(spec, parts, dev, seed, batches, outer)  # type: ignore[arg-type]

        probe = make(("plain",))
        n_params = sum(p.numel() for p in probe.model.parameters())
        float_input = probe.prepare(batches[0][0]).is_floating_point()
        del probe

        # Each method is tried (for one meta-step cycle) before anything is timed: one that
        # cannot apply to this model is reported as such, with the reason, and the others
        # are still measured. The plain step failing means the model or batches are wrong.
        n_trial = _META_EVERY
        peaks: dict[str, tuple[int, int]] = {}
        not_applicable: dict[str, str] = {}
        for label, parts in parsed:
            if "grokalign" in parts and not float_input:
                not_applicable[label] = (
                    f"grokalign differentiates w.r.t. the model's input, but {name!r} takes "
                    f"integer inputs and has no embed()/forward_embeddings()")
                continue
            try:
                if memory:
                    peaks[label] = _measure_memory(lambda: make(parts), n_trial, dev)
                else:
                    _trial(make(parts), n_trial)
            except (ValueError, TypeError, RuntimeError, NotImplementedError) as exc:
                reason = " ".join(f"{type(exc).__name__}: {exc}".split())
                if parts == ("plain",):
                    raise ValueError(f"model: the plain training step of {name!r} failed "
                                     f"({reason})") from exc
                not_applicable[label] = reason

        trainers = {label: make(parts) for label, parts in parsed if label not in not_applicable}
        for trainer in trainers.values():
            for _ in range(warmup):
                trainer.step()
        _sync(dev)
        samples: dict[str, list[float]] = {label: [] for label, _ in parsed}
        labels = list(trainers)
        for rep in range(repeats):
            # Rotate who goes first: no method always runs right after another's allocations.
            for label in labels[rep % len(labels):] + labels[:rep % len(labels)]:
                trainer = trainers[label]
                _sync(dev)
                t0 = time.perf_counter()
                for _ in range(steps):
                    trainer.step()
                _sync(dev)
                samples[label].append((time.perf_counter() - t0) / steps)
        env = _environment(dev)
    finally:
        torch.set_num_threads(old_threads)

    results = [MethodResult(label, parts, samples[label],
                            *(peaks[label] if label in peaks else (None, None)),
                            not_applicable=not_applicable.get(label))
               for label, parts in parsed]
    plain = results[0]
    for r in results:
        if r.not_applicable is not None:
            continue
        r.time_ratio = r.median_s / plain.median_s
        if r.peak_bytes is not None and plain.peak_bytes:
            r.memory_ratio = r.peak_bytes / plain.peak_bytes
    memory_method = (
        "not measured" if not memory else
        "torch.cuda.max_memory_allocated from just before the model is built, over 4 steps"
        if dev.type == "cuda" else
        "torch.profiler CPU allocation records (profile_memory=True): peak of live torch "
        "tensor bytes from just before the model is built, over 4 steps")
    config = dict(model=name, description=spec.description, parameters=n_params,
                  batch_size=spec.batch_size, outer_batch_size=spec.outer_batch_size,
                  methods=[label for label, _ in parsed], repeats=repeats, steps=steps,
                  warmup=warmup, seed=seed, base_optimizer=dict(name="AdamW", lr=_LR,
                  betas=list(_BETAS), weight_decay=_WEIGHT_DECAY), meta_every=_META_EVERY)
    result = BenchResult(name, str(dev), config, env, results, memory_method)
    if out is not None:
        result.save(out)
    return result


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _key_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed: Any = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value  # a bare word is a string
    return key.strip(), parsed


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``grokopt bench`` options to ``parser``; pair with :func:`run_from_args`.

    Example:
        >>> p = add_bench_arguments(argparse.ArgumentParser())
        >>> args = p.parse_args(["--model", "omnigrok-mlp", "--methods", "grokfast", "--repeats", "3"])
        >>> args.model, args.methods, args.repeats
        ('omnigrok-mlp', ['grokfast'], 3)
    """
    parser.description = parser.description or (
        "Time and peak memory per training step of each grokopt method, as ratios to the "
        "plain step, on a built-in model or your own; prints a table and writes JSON.")
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="decoder",
                   help=f"built-in ({', '.join(BUILTIN_MODELS)}) or package.module:factory, "
                        f"importable from the current folder (default: decoder)")
    g.add_argument("--model-kw", dest="model_kw", type=_key_value, action="append", default=[],
                   metavar="KEY=VALUE", help="factory keyword argument (repeatable)")
    g.add_argument("--input-shape", dest="input_shape", type=int, nargs="+", default=None,
                   metavar="N", help="your model: one sample's shape (random inputs, class targets)")
    g.add_argument("--make-batch", dest="make_batch", default=None, metavar="MODULE:FN",
                   help="your model, instead of --input-shape: fn(batch_size, generator) -> "
                        "(inputs, targets)")
    g.add_argument("--batch-size", dest="batch_size", type=int, default=None,
                   help="(default: the built-in model's, 64 for yours)")
    g.add_argument("--outer-batch-size", dest="outer_batch_size", type=int, default=None,
                   help="NeuralGrok's held-out batch (default: the built-in model's, 16 for "
                        "yours)")
    g.add_argument("--list-models", dest="list_models", action="store_true",
                   help="list the built-in models and exit")
    r = parser.add_argument_group("measurement")
    r.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    r.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="METHOD",
                   help=f"from {', '.join(COMPONENTS)}; combine with '+' (default: "
                        f"{' '.join(DEFAULT_METHODS)})")
    r.add_argument("--repeats", type=int, default=7, help="timed repetitions (default: 7)")
    r.add_argument("--steps", type=int, default=8, help="steps per repetition (default: 8)")
    r.add_argument("--warmup", type=int, default=4,
                   help="untimed steps per method first (default: 4)")
    r.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the peak-memory pass")
    r.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads, 1 is steadiest on a busy machine (default: torch's)")
    r.add_argument("--seed", type=int, default=0,
                   help="of the initial weights and the batches (default: 0)")
    r.add_argument("--out", default=None, help="JSON path (default: bench-MODEL-DEVICE.json)")
    return parser


_FLAGS = {
    "model": "--model", "model_kwargs": "--model-kw", "input_shape": "--input-shape",
    "make_batch": "--make-batch", "input_shape/make_batch": "--input-shape/--make-batch",
    "batch_size": "--batch-size", "outer_batch_size": "--outer-batch-size",
    "device": "--device", "methods": "--methods", "repeats": "--repeats", "steps": "--steps",
    "warmup": "--warmup", "threads": "--threads", "seed": "--seed",
}


def run_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    """Run :func:`bench` from parsed :func:`add_bench_arguments` options; print the table.

    ``package.module:factory`` paths are imported from the current folder too, as with
    ``python -m``. Returns the exit status: 0, or 2 on a rejected argument, reported as one
    ``error:`` line naming it (through ``parser.error`` when ``parser`` is given).
    """
    if args.list_models:
        for name, spec in BUILTIN_MODELS.items():
            print(f"{name}: {spec.description}")
        return 0
    # A console script's sys.path starts at its own folder, not the caller's: put the
    # current folder first, as `python -m` does, so `--model mymod:make` finds ./mymod.py.
    if not {"", ".", os.getcwd()} & set(sys.path):
        sys.path.insert(0, os.getcwd())
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in args.model)
    out = args.out or f"bench-{safe}-{str(args.device).replace(':', '')}.json"
    try:
        result = bench(
            args.model, device=args.device, methods=tuple(args.methods),
            model_kwargs=dict(args.model_kw), input_shape=args.input_shape,
            make_batch=args.make_batch, batch_size=args.batch_size,
            outer_batch_size=args.outer_batch_size, repeats=args.repeats, steps=args.steps,
            warmup=args.warmup, memory=args.memory, threads=args.threads, seed=args.seed,
            out=out)
    except (ValueError, TypeError) as exc:
        message = " ".join(str(exc).split())
        field, sep, rest = message.partition(": ")
        if sep and field in _FLAGS:
            message = f"argument {_FLAGS[field]}: {rest}"
        if parser is not None:
            parser.error(message)
        print(f"error: {message}", file=sys.stderr)
        return 2
    try:
        from rich.console import Console
    except ImportError:  # rich comes with grokopt[race]; the table reads fine without it
        print(result.format_table())
        print(f"peak memory: {result.memory_method}")
    else:
        console = Console()
        if not console.is_terminal:
            console = Console(width=max(console.width, 120))
        console.print(result.rich_table())
    print(f"wrote {result.path}")
    return 0
