"""The grokking race: train several methods side by side on one task and compare.

Every arm of a race (a method, possibly with its own hyperparameters) is trained for every
seed from the same data split, the same initial weights and the same batch order, with the
same evaluation schedule. The race reports, per arm, the steps and training seconds to reach
each validation-accuracy threshold, the final accuracies, the seconds per step and whether it
grokked within the budget, aggregated over seeds.

Use it from Python::

    from grokopt.race import RaceConfig, run_race
    result = run_race(RaceConfig(methods=("baseline", "grokfast"), steps=2000), out_dir="out")
    for row in result.summary:
        print(row["label"], row["steps_to"]["0.95"])

or from the command line: ``grokopt race --help``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .race_config import (
    _DEVICES,
    IMAGE_TASKS,
    PRESETS,
    Preset,
    RaceConfig,
    _tkey,
    with_matched_baselines,
)
from .race_methods import (
    METHODS,
    Method,
    MethodContext,
    RunSpec,
    TrainParts,
    parse_run_spec,
    register_method,
)
from .race_report import plot_race, results_table, write_outputs
from .tasks import (
    DecoderTransformer,
    EmbeddingMLP,
    OmnigrokMLP,
    grokfast_split,
    load_digits_task,
    modular_dataset,
    neuralgrok_split,
)
from .tasks.digits import require_race_extra
from .tasks.mnist import load_mnist_task

__all__ = [
    "METHODS",
    "PRESETS",
    "Method",
    "MethodContext",
    "Preset",
    "RaceConfig",
    "RaceResult",
    "RunSpec",
    "TrainParts",
    "check_config",
    "check_out_dir",
    "parse_run_spec",
    "plot_race",
    "register_method",
    "resolve_device",
    "results_table",
    "run_race",
    "with_matched_baselines",
    "write_outputs",
]

_CHECKPOINT = "checkpoint.pt"
_FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# Data and models
# --------------------------------------------------------------------------------------------


@dataclass
class _Data:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    x_inner: Tensor
    y_inner: Tensor
    x_outer: Tensor
    y_outer: Tensor
    num_classes: int
    vocab_size: int | None
    seq_len: int | None
    input_dim: int | None


def _load_data(cfg: RaceConfig, seed: int, device: torch.device) -> _Data:
    if cfg.task in IMAGE_TASKS:
        load = load_digits_task if cfg.task == "digits" else load_mnist_task
        d = load(cfg.digits_train_size, seed=seed)
        x_tr, y_tr, x_te, y_te = d.x_train, d.y_train, d.x_test, d.y_test
        n_total = len(y_tr) + len(y_te)
        n_outer = max(1, round(0.01 * n_total))
        out = dict(x_outer=x_tr[:n_outer], y_outer=y_tr[:n_outer],
                   x_inner=x_tr[n_outer:], y_inner=y_tr[n_outer:])
        extra = dict(num_classes=d.num_classes, vocab_size=None, seq_len=None,
                     input_dim=d.input_dim)
    else:
        m = modular_dataset(cfg.task, cfg.p)
        if cfg.split == "neuralgrok":
            s = neuralgrok_split(len(m), seed)
        else:
            s = grokfast_split(len(m), seed, cfg.train_fraction)
        inner, outer = s.inner, s.outer
        if len(outer) == 0:  # an outer slice for NeuralGrok arms, from the training half
            n_outer = max(1, round(0.01 * len(m)))
            inner, outer = s.train[n_outer:], s.train[:n_outer]
        x, y = m.inputs, m.labels
        x_tr, y_tr, x_te, y_te = x[s.train], y[s.train], x[s.test], y[s.test]
        out = dict(x_outer=x[outer], y_outer=y[outer], x_inner=x[inner], y_inner=y[inner])
        extra = dict(num_classes=m.num_classes, vocab_size=m.vocab_size, seq_len=m.seq_len,
                     input_dim=None)
    tensors = dict(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, **out)
    return _Data(**{k: v.to(device) for k, v in tensors.items()}, **extra)


def _build_model(cfg: RaceConfig, data: _Data) -> nn.Module:
    kind = cfg.model
    if kind == "auto":
        kind = "omnigrok-mlp" if cfg.task in IMAGE_TASKS else "mlp"
    kw = dict(cfg.model_kwargs)
    if cfg.task in IMAGE_TASKS:
        if kind != "omnigrok-mlp":
            raise ValueError(f"model: the {cfg.task} task takes 'omnigrok-mlp' or 'auto', got {kind!r}")
        build: Callable[..., nn.Module] = lambda: OmnigrokMLP(  # noqa: E731
            data.input_dim, num_classes=data.num_classes, **kw)
    elif kind == "transformer":
        assert data.vocab_size is not None
        build = lambda: DecoderTransformer(data.vocab_size, data.num_classes, **kw)  # noqa: E731
    elif kind == "mlp":
        assert data.vocab_size is not None and data.seq_len is not None
        build = lambda: EmbeddingMLP(  # noqa: E731
            data.vocab_size, data.seq_len, data.num_classes, **kw)
    else:
        raise ValueError(f"model: modular tasks take 'transformer', 'mlp' or 'auto', got {kind!r}")
    try:
        return build()
    except (TypeError, ValueError) as exc:  # an unknown or ill-typed constructor argument
        raise ValueError(f"model_kwargs: the {kind} model refused {kw!r}: {exc}") from exc


def _loss_fn(kind: str, num_classes: int) -> Callable[[Tensor, Tensor], Tensor]:
    if kind == "ce":
        return F.cross_entropy

    def mse(logits: Tensor, y: Tensor) -> Tensor:
        return F.mse_loss(logits, F.one_hot(y, num_classes).to(logits.dtype))

    return mse


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` fails clearly without one."""
    if device not in _DEVICES:
        raise ValueError(f"device: got {device!r}; allowed: {', '.join(_DEVICES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: 'cuda' requested but torch.cuda.is_available() is False")
    return torch.device(device)


# --------------------------------------------------------------------------------------------
# One run (one arm, one seed)
# --------------------------------------------------------------------------------------------


class _Run:
    def __init__(self, cfg: RaceConfig, spec: RunSpec, seed: int, data: _Data,
                 device: torch.device) -> None:
        self.cfg, self.spec, self.seed, self.device = cfg, spec, seed, device
        self.data = data
        self.lr = float(spec.training.get("lr", cfg.lr))
        self.weight_decay = float(spec.training.get("weight_decay", cfg.weight_decay))
        self.clip = spec.training.get("clip_grad_norm", cfg.clip_grad_norm)
        if spec.uses_outer:
            self.x_fit, self.y_fit = data.x_inner, data.y_inner
        else:
            self.x_fit, self.y_fit = data.x_train, data.y_train
        # Same seed -> same initial weights in every arm; the caller's RNG is left alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = _build_model(cfg, data).to(device)
        opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        self.base = opt_cls(self.model.parameters(), lr=self.lr, betas=cfg.betas,
                            weight_decay=self.weight_decay)
        self.tokens = data.vocab_size is not None
        self.loss_fn = _loss_fn(cfg.loss, data.num_classes)
        model = self.model
        # What a Jacobian penalty differentiates: embeddings -> logits for token models; the
        # bare Sequential of the Omnigrok MLP lets GrokAlign take its piecewise-linear path.
        if self.tokens:
            fwd_emb = model.forward_embeddings
        elif isinstance(model, OmnigrokMLP):
            fwd_emb = model.net
        else:
            fwd_emb = model
        self.fwd = fwd_emb
        ctx = MethodContext(
            model=model, base_optimizer=self.base, loss_fn=self.loss_fn,
            logits_from_penalty_input=fwd_emb,
            penalty_input="embeddings" if self.tokens else "input",
            outer=(data.x_outer, data.y_outer) if spec.uses_outer else None,
            lr=self.lr, device=device, seed=seed, clip_grad_norm=self.clip,
        )
        self.parts = TrainParts(optimizer=self.base)
        for comp in spec.components:
            try:
                METHODS[comp].apply(ctx, self.parts, spec.params[comp])
            except (TypeError, ValueError) as exc:  # a hyperparameter the method refuses
                raise ValueError(f"methods: arm {spec.label!r}: {exc}") from exc
        self.step = 0
        self.train_seconds = 0.0
        self.done = False
        keys = ["step", "train_acc", "val_acc", "train_loss", "val_loss", "train_seconds"]
        if cfg.diagnostics:
            keys += ["centroid_alignment", "age"]
        self.curve: dict[str, list[float]] = {k: [] for k in keys}
        self.reached: dict[str, dict[str, float] | None] = {
            _tkey(t): None for t in cfg.thresholds}
        self.rng_cpu = torch.Generator().manual_seed(seed).get_state()
        self.rng_cuda = None
        self._perm: Tensor | None = None
        self._perm_epoch = -1
        self.resumed_from: int | None = None

    # Batch order is a pure function of (seed, step): resuming needs no sampler state.
    def _batch(self, step: int) -> tuple[Tensor, Tensor]:
        n, bs = len(self.y_fit), self.cfg.batch_size
        if bs >= n:
            return self.x_fit, self.y_fit
        per_epoch = math.ceil(n / bs)
        epoch, k = divmod(step, per_epoch)
        if epoch != self._perm_epoch:
            if self.cfg.shuffle:
                g = torch.Generator().manual_seed(1_000_003 * self.seed + epoch)
                self._perm = torch.randperm(n, generator=g).to(self.device)
            else:
                self._perm = torch.arange(n, device=self.device)
            self._perm_epoch = epoch
        assert self._perm is not None
        idx = self._perm[k * bs:(k + 1) * bs]
        return self.x_fit[idx], self.y_fit[idx]

    def _train_step(self) -> None:
        x, y = self._batch(self.step)
        if self.cfg.warmup_steps:
            factor = min(1.0, (self.step + 1) / self.cfg.warmup_steps)
            for group in self.parts.optimizer.param_groups:
                # As an LR scheduler does: initial_lr is the group's base lr (NeuralGrok's
                # lookahead uses it, lookahead_lr="base"), and a method that brings its own
                # optimizer (Muon) may give its groups other base lrs than the arm's.
                group.setdefault("initial_lr", group["lr"])
                group["lr"] = group["initial_lr"] * factor
        inp = self.model.embed(x) if self.tokens else x
        loss_fn = self.parts.loss_fn or self.loss_fn
        if self.parts.forward is not None:
            logits, extra = self.parts.forward(inp)
            loss = loss_fn(logits, y) + extra
        else:
            logits = self.fwd(inp)
            loss = loss_fn(logits, y)
        for penalty in self.parts.penalties:
            loss = loss + penalty(inp, logits)
        opt = self.parts.optimizer
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip is not None and not self.spec.uses_outer:
            # NeuralGrok clips inside its own step (after the amplifier), as its paper does.
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        opt.step()
        self.step += 1
        for hook in self.parts.after_step:
            hook(self.step, x, y)

    def train_until(self, target: int, stop: threading.Event) -> None:
        torch.set_rng_state(self.rng_cpu)
        if self.rng_cuda is not None:
            torch.cuda.set_rng_state(self.rng_cuda, self.device)
        self.model.train()
        sync = self.device.type == "cuda"
        t0 = time.perf_counter()
        try:
            while self.step < target and not stop.is_set():
                self._train_step()
        finally:
            if sync:
                torch.cuda.synchronize(self.device)
            self.train_seconds += time.perf_counter() - t0
            self.rng_cpu = torch.get_rng_state()
            if self.device.type == "cuda":
                self.rng_cuda = torch.cuda.get_rng_state(self.device)

    @torch.no_grad()
    def _accuracy(self, x: Tensor, y: Tensor) -> tuple[float, float]:
        correct, total_loss = 0, 0.0
        for xb, yb in zip(x.split(4096), y.split(4096)):
            logits = self.model(xb)
            correct += int((logits.argmax(-1) == yb).sum())
            total_loss += float(self.loss_fn(logits, yb)) * len(yb)
        return correct / len(y), total_loss / len(y)

    def _diagnostics(self) -> tuple[float, float]:
        from .centroids import centroid_alignment
        from .metrics import absolute_gradient_entropy

        x = self.x_fit[:256]
        inp = self.model.embed(x).detach() if self.tokens else x
        align = centroid_alignment(self.fwd, inp).mean_alignment
        params = [p for p in self.model.parameters() if p.requires_grad]
        grads = [torch.zeros_like(p) for p in params]
        for xb, yb in zip(self.x_fit.split(4096), self.y_fit.split(4096)):
            loss = self.loss_fn(self.model(xb), yb) * (len(yb) / len(self.y_fit))
            for g, d in zip(grads, torch.autograd.grad(loss, params, allow_unused=True)):
                if d is not None:
                    g.add_(d)
        return float(align), float(absolute_gradient_entropy(grads))

    def evaluate(self) -> None:
        self.model.eval()
        tr_acc, tr_loss = self._accuracy(self.x_fit, self.y_fit)
        va_acc, va_loss = self._accuracy(self.data.x_test, self.data.y_test)
        self.model.train()
        c = self.curve
        c["step"].append(self.step)
        c["train_acc"].append(tr_acc)
        c["val_acc"].append(va_acc)
        c["train_loss"].append(tr_loss)
        c["val_loss"].append(va_loss)
        c["train_seconds"].append(self.train_seconds)
        if self.cfg.diagnostics:
            align, age = self._diagnostics()
            c["centroid_alignment"].append(align)
            c["age"].append(age)
        for hook in self.parts.after_eval:
            hook(self.step, va_acc)
        for t in self.cfg.thresholds:
            if self.reached[_tkey(t)] is None and va_acc >= t:
                self.reached[_tkey(t)] = {"step": self.step, "seconds": self.train_seconds}
        top = self.reached[_tkey(self.cfg.thresholds[-1])]
        if self.step >= self.cfg.steps or (self.cfg.stop_at_threshold and top is not None):
            self.done = True

    def state_dict(self) -> dict[str, Any]:
        return {
            "label": self.spec.label, "seed": self.seed, "step": self.step,
            "train_seconds": self.train_seconds, "done": self.done,
            "curve": self.curve, "reached": self.reached,
            "model": self.model.state_dict(), "optimizer": self.parts.optimizer.state_dict(),
            "generators": {k: g.get_state() for k, g in self.parts.generators.items()},
            "rng_cpu": self.rng_cpu, "rng_cuda": self.rng_cuda,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.parts.optimizer.load_state_dict(state["optimizer"])
        for k, g in self.parts.generators.items():
            g.set_state(state["generators"][k])
        self.step = int(state["step"])
        self.train_seconds = float(state["train_seconds"])
        self.done = bool(state["done"])
        self.curve = {k: list(v) for k, v in state["curve"].items()}
        self.reached = dict(state["reached"])
        self.rng_cpu = state["rng_cpu"]
        self.rng_cuda = state["rng_cuda"]

    def record(self) -> dict[str, Any]:
        c = self.curve
        final_tr = c["train_acc"][-1] if c["step"] else None
        final_va = c["val_acc"][-1] if c["step"] else None
        return {
            "label": self.spec.label,
            "components": list(self.spec.components),
            "seed": self.seed,
            "hyperparameters": self.spec.params,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "steps": self.step,
            "train_seconds": self.train_seconds,
            "seconds_per_step": self.train_seconds / self.step if self.step else None,
            "steps_to": {k: (v["step"] if v else None) for k, v in self.reached.items()},
            "seconds_to": {k: (v["seconds"] if v else None) for k, v in self.reached.items()},
            "grokked": self.reached[_tkey(self.cfg.thresholds[0])] is not None,
            "final_train_acc": final_tr,
            "final_val_acc": final_va,
            "resumed_from_step": self.resumed_from,
            "curve": c,
        }




# --------------------------------------------------------------------------------------------
# The race
# --------------------------------------------------------------------------------------------


@dataclass
class RaceResult:
    """What :func:`run_race` returns: per-run records, per-arm summary, files written.

    Example:
        >>> from grokopt import RaceConfig, run_race
        >>> result = run_race(RaceConfig(task="a*b", p=7, methods=("baseline", "grokfast"),
        ...                              steps=4, eval_every=2, seeds=(0,)))
        >>> [row["label"] for row in result.summary], result.interrupted
        (['baseline', 'grokfast'], False)
    """

    config: RaceConfig
    runs: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    environment: dict[str, Any]
    interrupted: bool = False
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": _FORMAT_VERSION, "config": self.config.to_dict(),
                "fingerprint": self.config.fingerprint(), "environment": self.environment,
                "interrupted": self.interrupted, "summary": self.summary, "runs": self.runs}


def _environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def _summarise(cfg: RaceConfig, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def stats(values: list[float | None]) -> dict[str, Any]:
        got = [v for v in values if v is not None]
        return {
            "mean": statistics.fmean(got) if got else None,
            "std": statistics.stdev(got) if len(got) > 1 else (0.0 if got else None),
            "n": len(got),
        }

    summary = []
    for label in cfg.methods:
        mine = [r for r in runs if r["label"] == label]
        if not mine:
            continue
        row = {
            "label": label,
            "weight_decay": mine[0]["weight_decay"],
            "lr": mine[0]["lr"],
            "seeds": [r["seed"] for r in mine],
            "grokked": sum(r["grokked"] for r in mine),
            "steps_to": {k: stats([r["steps_to"][k] for r in mine]) for k in mine[0]["steps_to"]},
            "seconds_to": {k: stats([r["seconds_to"][k] for r in mine]) for k in mine[0]["seconds_to"]},
            "final_train_acc": stats([r["final_train_acc"] for r in mine]),
            "final_val_acc": stats([r["final_val_acc"] for r in mine]),
            "seconds_per_step": stats([r["seconds_per_step"] for r in mine]),
            "published": cfg.published.get(label),
        }
        summary.append(row)
    ref = next((s for s in summary if s["label"].split(":")[0] == "baseline"), None)
    first = _tkey(cfg.thresholds[0])
    for row in summary:
        row["speedup_steps"] = row["speedup_seconds"] = None
        if ref is not None:
            a, b = ref["steps_to"][first]["mean"], row["steps_to"][first]["mean"]
            if a and b:
                row["speedup_steps"] = a / b
            a, b = ref["seconds_to"][first]["mean"], row["seconds_to"][first]["mean"]
            if a and b:
                row["speedup_seconds"] = a / b
    return summary


class _Reporter:
    """What a race shows while it runs: live rich bars, plain log lines, or nothing.

    Log lines (``log_every`` seconds apart, every evaluation at 0) suit pipes and CI logs:
    a status line per unfinished run each period, plus a line when a run reaches a
    threshold and when it finishes.
    """

    def __init__(self, bars: bool, log_every: float | None, runs: list[_Run], title: str) -> None:
        self.log_every = None if bars else log_every
        self.title = title
        self.progress = None
        self.runs = runs
        self.t0 = self.last_block = time.monotonic()
        self.told: dict[int, set[str]] = {id(r): set() for r in runs}
        if not bars:
            return
        try:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn)
        except ImportError:
            require_race_extra("rich")
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("train {task.fields[train]}  val {task.fields[val]}"),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
        )
        self.ids = {}
        for run in runs:
            self.ids[id(run)] = self.progress.add_task(
                f"{run.spec.label} s{run.seed}", total=run.cfg.steps, completed=run.step,
                train="-", val="-", status="")
            self._bar(run)

    @property
    def enabled(self) -> bool:
        return self.progress is not None or self.log_every is not None

    def __enter__(self) -> _Reporter:
        if self.progress is not None:
            self.progress.console.print(f"[bold]{self.title}", highlight=False)
            self.progress.start()
        elif self.log_every is not None:
            print(self.title, flush=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def note(self, text: str) -> None:
        """One plain line, above the bars when they are live."""
        if self.progress is not None:
            self.progress.console.print(text, highlight=False, markup=False)
        elif self.log_every is not None:
            print(text, flush=True)

    def _status(self, run: _Run) -> str:
        c = run.curve
        acc = (f"train {c['train_acc'][-1]:.3f}  val {c['val_acc'][-1]:.3f}" if c["step"]
               else "not evaluated yet")
        return f"{run.spec.label} s{run.seed}: step {run.step}/{run.cfg.steps}  {acc}"

    def _log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f}s] {text}", flush=True)

    def update(self, run: _Run) -> None:
        if self.progress is not None:
            self._bar(run)
        if self.log_every is None:
            return
        told = self.told[id(run)]
        for key, hit in run.reached.items():
            if hit is not None and key not in told:
                told.add(key)
                self._log(f"{run.spec.label} s{run.seed}: {float(key):.0%} val reached at step "
                          f"{hit['step']} ({hit['seconds']:.1f} s training)")
        if run.done and "done" not in told:
            told.add("done")
            hit = run.reached[_tkey(run.cfg.thresholds[0])]
            self._log(self._status(run) + ("  grokked" if hit else "  budget spent")
                      + ", finished")
            return
        if self.log_every == 0:
            self._log(self._status(run))
        elif time.monotonic() - self.last_block >= self.log_every:
            self.last_block = time.monotonic()
            for r in self.runs:
                if not r.done:
                    self._log(self._status(r))

    def _bar(self, run: _Run) -> None:
        assert self.progress is not None
        c = run.curve
        tr = f"{c['train_acc'][-1]:.3f}" if c["step"] else "-"
        va = f"{c['val_acc'][-1]:.3f}" if c["step"] else "-"
        status = ""
        if run.done:
            hit = run.reached[_tkey(run.cfg.thresholds[0])]
            status = f"grokked @ {hit['step']}" if hit else "budget spent"
        total = run.step if run.done else run.cfg.steps
        self.progress.update(self.ids[id(run)], completed=run.step, total=total,
                             train=tr, val=va, status=status)


def _cuda_ids(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def check_config(config: RaceConfig) -> None:
    """Build every arm of ``config`` once (data, model, optimizer, method parts; first seed)
    without training, so a bad setting fails in seconds instead of mid-race.

    Raises what building a run raises, its message starting with the field at fault:
    ``methods: arm 'grokfast:lamb=-3': ...`` for a hyperparameter a method refuses,
    ``overrides: ...`` for an override key no method has, ``model_kwargs: ...``,
    ``device: ...``, ``p: ...``. The caller's random state is left as it was.

    Example:
        >>> check_config(RaceConfig(task="a+b", p=7, methods=("grokfast:lamb=-3",)))
        Traceback (most recent call last):
        ...
        ValueError: methods: arm 'grokfast:lamb=-3': lamb must be >= 0, got -3
    """
    device = resolve_device(config.device)
    specs = config.specs()
    with torch.random.fork_rng(devices=_cuda_ids(device)):
        data = _load_data(config, config.seeds[0], device)
        for spec in specs:
            _Run(config, spec, config.seeds[0], data, device)


def check_out_dir(config: RaceConfig, out_dir: str | os.PathLike[str]) -> None:
    """Raise the ``RuntimeError`` that :func:`run_race` raises on resuming in ``out_dir``
    when the checkpoint or the finished results there belong to another race (another
    configuration). Nothing is trained or written.

    Example:
        >>> check_out_dir(RaceConfig(), "no-such-folder")  # nothing there: fine
    """
    out = Path(out_dir)
    ckpt, results = out / _CHECKPOINT, out / "results.json"
    if ckpt.exists():
        found = torch.load(ckpt, map_location="cpu", weights_only=True).get("fingerprint")
        what = ckpt
    elif results.exists():
        try:
            found = json.loads(results.read_text()).get("fingerprint")
        except (ValueError, AttributeError):
            found = None
        what = results
    else:
        return
    if found != config.fingerprint():
        raise RuntimeError(
            f"{what} holds a different race (another configuration); pass "
            "resume=False (--fresh) to start over or choose another output folder")


def _finished_result(cfg: RaceConfig, out: Path) -> RaceResult | None:
    """The stored result of this very race in ``out``, when it ran to the end there."""
    path = out / "results.json"
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if (not isinstance(stored, dict) or stored.get("format_version") != _FORMAT_VERSION
            or stored.get("fingerprint") != cfg.fingerprint() or stored.get("interrupted")
            is not False):
        return None
    return RaceResult(cfg, stored["runs"], stored["summary"], stored["environment"])


def run_race(
    config: RaceConfig | None = None,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    resume: bool = True,
    progress: bool = False,
    log_every: float | None = None,
    keep_checkpoint: bool = False,
    checkpoint_every: float = 30.0,
    callback: Callable[[dict[str, Any]], None] | None = None,
    handle_sigint: bool = True,
) -> RaceResult:
    """Run a race and return its results; with ``out_dir``, checkpoint and write outputs.

    Runs advance round-robin, ``eval_every`` steps at a time, so all bars move together.
    With ``out_dir`` set, the race checkpoints to ``out_dir/checkpoint.pt`` every
    ``checkpoint_every`` seconds and on Ctrl-C, and when ``resume`` is true continues from a
    checkpoint of the same configuration (saying so, per run: "resumed from step N"); the
    continued race gives the same curves as an uninterrupted one. A race that finishes
    deletes its checkpoint (``keep_checkpoint=True`` keeps it); rerun with ``resume`` on,
    a finished race returns the results it stored in ``out_dir/results.json`` instead of
    training again.
    A first Ctrl-C (SIGINT) stops at the next step boundary, saves and returns a result with
    ``interrupted=True``; outputs (JSON, CSV, PNG) are then written for the partial race.
    ``progress`` shows live bars; without them, ``log_every`` seconds (0: every evaluation)
    prints plain status lines instead, and ``None`` prints nothing.
    ``callback(info)`` is called after every evaluation with the run's label, seed, step and
    accuracies. Seconds are training time only (forward, backward, step; evaluations are not
    counted), accumulated across resumptions.

    Example:
        >>> cfg = RaceConfig(task="a+b", p=11, methods=("baseline",), steps=4, eval_every=2,
        ...                  seeds=(0,))
        >>> result = run_race(cfg)
        >>> [r["steps"] for r in result.runs]
        [4]
    """
    cfg = config if config is not None else RaceConfig()
    if log_every is not None and not (isinstance(log_every, (int, float))
                                      and not isinstance(log_every, bool)
                                      and math.isfinite(log_every) and log_every >= 0):
        raise ValueError(f"log_every: expected None or seconds >= 0, got {log_every!r}")
    if not (isinstance(checkpoint_every, (int, float)) and not isinstance(checkpoint_every, bool)
            and checkpoint_every > 0):
        raise ValueError(f"checkpoint_every: expected seconds > 0, got {checkpoint_every!r}")
    device = resolve_device(cfg.device)
    specs = cfg.specs()
    out = Path(out_dir) if out_dir is not None else None
    ckpt = out / _CHECKPOINT if out is not None else None

    if out is not None and resume:
        check_out_dir(cfg, out)
    if out is not None and ckpt is not None and resume and not ckpt.exists():
        done = _finished_result(cfg, out)
        if done is not None:
            _Reporter(progress, log_every, [], "").note(
                f"grokopt race '{cfg.name}': already finished in {out}, showing its stored "
                "results (--fresh, or resume=False, runs it again)")
            done.files = write_outputs(done, out)
            return done

    stop = threading.Event()
    runs: list[_Run] = []
    datasets = {seed: _load_data(cfg, seed, device) for seed in cfg.seeds}
    # Runs set the global RNG per chunk (see _Run.train_until); the caller's state survives.
    with torch.random.fork_rng(devices=_cuda_ids(device)):
        for seed in cfg.seeds:
            for spec in specs:
                runs.append(_Run(cfg, spec, seed, datasets[seed], device))
        resumed = False
        if ckpt is not None and resume and ckpt.exists():
            state = torch.load(ckpt, map_location=device, weights_only=True)
            for run, rs in zip(runs, state["runs"]):
                run.load_state_dict(rs)
                run.resumed_from = run.step
            resumed = True

        def save() -> None:
            if ckpt is None:
                return
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"format_version": _FORMAT_VERSION, "fingerprint": cfg.fingerprint(),
                        "config": cfg.to_dict(), "runs": [r.state_dict() for r in runs]}, tmp)
            os.replace(tmp, ckpt)

        previous = None
        if handle_sigint and threading.current_thread() is threading.main_thread():
            def on_sigint(signum: int, frame: Any) -> None:
                if stop.is_set():  # a second Ctrl-C means "now", without saving
                    raise KeyboardInterrupt
                stop.set()

            previous = signal.signal(signal.SIGINT, on_sigint)
        title = f"grokopt race '{cfg.name}': {cfg.task}" + (
            f" mod {cfg.p}" if cfg.task not in IMAGE_TASKS else "") + f" on {device}"
        last_save = time.monotonic()
        try:
            with _Reporter(progress, log_every, runs, title) as report:
                if resumed:
                    for run in runs:
                        report.note(f"{run.spec.label} s{run.seed}: resumed from step "
                                    f"{run.step}" + (" (finished)" if run.done else ""))
                while not stop.is_set():
                    active = [r for r in runs if not r.done]
                    if not active:
                        break
                    for run in active:
                        if run.step == 0 and not run.curve["step"]:
                            run.evaluate()  # the starting point of every curve
                            report.update(run)
                            if run.done:
                                continue
                        target = min(cfg.steps, (run.step // cfg.eval_every + 1) * cfg.eval_every)
                        run.train_until(target, stop)
                        if stop.is_set():
                            break
                        run.evaluate()
                        report.update(run)
                        if callback is not None:
                            callback({"label": run.spec.label, "seed": run.seed,
                                      "step": run.step, "train_acc": run.curve["train_acc"][-1],
                                      "val_acc": run.curve["val_acc"][-1], "done": run.done})
                    if not stop.is_set() and time.monotonic() - last_save > checkpoint_every:
                        save()
                        last_save = time.monotonic()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        # Only at a step boundary: an exception (a second Ctrl-C included) may have struck
        # mid-update, so it leaves the last periodic checkpoint as it was.
        if stop.is_set() or keep_checkpoint:
            save()
        elif ckpt is not None:
            ckpt.unlink(missing_ok=True)

    records = [r.record() for r in runs]
    result = RaceResult(cfg, records, _summarise(cfg, records), _environment(device),
                        interrupted=stop.is_set())
    if out is not None:
        result.files = write_outputs(result, out)
    return result
