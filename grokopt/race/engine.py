"""One run of a race (one arm, one seed): its data, model, optimizer and method parts, the
training chunk between evaluations, the evaluation, and its checkpointable state."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grokopt import absolute_gradient_entropy, centroid_alignment

from ..tasks import (
    DecoderTransformer,
    EmbeddingMLP,
    OmnigrokMLP,
    grokfast_split,
    load_digits_task,
    modular_dataset,
    neuralgrok_split,
)
from ..tasks.mnist import load_mnist_task
from .config import IMAGE_TASKS, RaceConfig, threshold_key
from .methods import METHODS, MethodContext, TrainParts, penalty_route, training_step
from .specs import RunSpec

__all__ = ["RaceData", "Run", "build_model", "load_data", "task_loss"]



# --------------------------------------------------------------------------------------------
# Data and models
# --------------------------------------------------------------------------------------------


@dataclass
class RaceData:
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


def load_data(cfg: RaceConfig, seed: int, device: torch.device) -> RaceData:
    if cfg.task in IMAGE_TASKS:
        load = load_digits_task if cfg.task == "digits" else load_mnist_task
        d = load(cfg.digits_train_size, seed=seed)
        x_tr, y_tr, x_te, y_te = d.x_train, d.y_train, d.x_test, d.y_test
        n_total = len(y_tr) + len(y_te)
        n_outer = max(1, round(0.01 * n_total))
        out = dict(x_outer=x_tr[:n_outer], y_outer=y_tr[:n_outer],
                   x_inner=x_tr[n_outer:], y_inner=y_tr[n_outer:])
        extra: dict[str, Any] = dict(num_classes=d.num_classes, vocab_size=None, seq_len=None,
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
    fields: dict[str, Any] = {k: v.to(device) for k, v in tensors.items()}
    return RaceData(**fields, **extra)


def build_model(cfg: RaceConfig, data: RaceData) -> nn.Module:
    kind = cfg.model
    if kind == "auto":
        kind = "omnigrok-mlp" if cfg.task in IMAGE_TASKS else "mlp"
    kw = dict(cfg.model_kwargs)
    dim, vocab, seq_len, classes = data.input_dim, data.vocab_size, data.seq_len, data.num_classes
    if cfg.task in IMAGE_TASKS:
        if kind != "omnigrok-mlp":
            raise ValueError(f"model: the {cfg.task} task takes 'omnigrok-mlp' or 'auto', got {kind!r}")
        assert dim is not None
        build: Callable[..., nn.Module] = lambda: OmnigrokMLP(  # noqa: E731
            dim, num_classes=classes, **kw)
    elif kind == "transformer":
        assert vocab is not None
        build = lambda: DecoderTransformer(vocab, classes, **kw)  # noqa: E731
    elif kind == "mlp":
        assert vocab is not None and seq_len is not None
        build = lambda: EmbeddingMLP(vocab, seq_len, classes, **kw)  # noqa: E731
    else:
        raise ValueError(f"model: modular tasks take 'transformer', 'mlp' or 'auto', got {kind!r}")
    try:
        return build()
    except (TypeError, ValueError) as exc:  # an unknown or ill-typed constructor argument
        raise ValueError(f"model_kwargs: the {kind} model refused {kw!r}: {exc}") from exc


def task_loss(kind: str, num_classes: int) -> Callable[[Tensor, Tensor], Tensor]:
    if kind == "ce":
        return F.cross_entropy

    def mse(logits: Tensor, y: Tensor) -> Tensor:
        return F.mse_loss(logits, F.one_hot(y, num_classes).to(logits.dtype))

    return mse

# --------------------------------------------------------------------------------------------
# One run (one arm, one seed)
# --------------------------------------------------------------------------------------------


class Run:
    def __init__(self, cfg: RaceConfig, spec: RunSpec, seed: int, data: RaceData,
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
            self.model = build_model(cfg, data).to(device)
        opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        self.base = opt_cls(self.model.parameters(), lr=self.lr, betas=cfg.betas,
                            weight_decay=self.weight_decay)
        self.loss_fn = task_loss(cfg.loss, data.num_classes)
        model = self.model
        self.route = penalty_route(model)
        ctx = MethodContext(
            model=model, base_optimizer=self.base, loss_fn=self.loss_fn,
            logits_from_penalty_input=self.route.logits, penalty_input=self.route.name,
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
            threshold_key(t): None for t in cfg.thresholds}
        self.rng_cpu = torch.Generator().manual_seed(seed).get_state()
        self.rng_cuda: Tensor | None = None
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
        # NeuralGrok clips inside its own step (after the amplifier), as its paper does.
        clip = None if self.clip is None or self.spec.uses_outer else (
            list[Tensor](self.model.parameters()), self.clip)
        training_step(self.parts, self.route, self.loss_fn, x, y, self.step, clip)
        self.step += 1

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
        x = self.x_fit[:256]
        inp = self.route.prepare(x).detach()
        align = centroid_alignment(self.route.logits, inp).mean_alignment
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
            if self.reached[threshold_key(t)] is None and va_acc >= t:
                self.reached[threshold_key(t)] = {"step": self.step, "seconds": self.train_seconds}
        top = self.reached[threshold_key(self.cfg.thresholds[-1])]
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
            "grokked": self.reached[threshold_key(self.cfg.thresholds[0])] is not None,
            "final_train_acc": final_tr,
            "final_val_acc": final_va,
            "resumed_from_step": self.resumed_from,
            "curve": c,
        }



