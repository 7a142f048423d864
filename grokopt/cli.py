"""The ``grokopt`` command line (``grokopt race ...`` or ``python -m grokopt race ...``).

Every rejected argument ends the command the argparse way: the usage, one
``grokopt race: error: argument --FLAG: ...`` line naming the value and what is allowed,
exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .race.config import IMAGE_TASKS
from .race.specs import parse_value
from .tasks import MODULAR_TASKS, canonical_task

__all__ = ["add_bench_arguments", "build_parser", "main", "run_bench"]


# --------------------------------------------------------------------------------------------
# Argument types: each refuses a bad value at parse time, naming what is allowed
# --------------------------------------------------------------------------------------------


def _key_value(text: str) -> tuple[str, Any]:
    # The one KEY=VALUE type of every command: the value reads as in an arm spec.
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), parse_value(value)


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, got {text!r}")
        return value

    return parse


def _float_in(low: float, high: float, *, low_open: bool, high_open: bool,
              allowed: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = (math.isfinite(value) and (value > low if low_open else value >= low)
              and (value < high if high_open else value <= high))
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
        return value

    return parse


_INF = math.inf
_POSITIVE = _float_in(0, _INF, low_open=True, high_open=True, allowed="a positive float")
_NON_NEGATIVE = _float_in(0, _INF, low_open=False, high_open=True, allowed="a float >= 0")


def _task(text: str) -> str:
    if text.strip() in IMAGE_TASKS:
        return text.strip()
    try:
        canonical_task(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"unknown task {text!r}; allowed: {', '.join((*MODULAR_TASKS, *IMAGE_TASKS))}") from None
    return text


def _preset(text: str) -> str:
    from .race import PRESETS

    if text not in PRESETS:
        raise argparse.ArgumentTypeError(
            f"unknown preset {text!r}; allowed: {', '.join(PRESETS)}")
    return text


# --------------------------------------------------------------------------------------------
# The race parser
# --------------------------------------------------------------------------------------------


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return " ".join(_show(v) for v in value)
    if isinstance(value, dict):
        return " ".join(f"{k}={_show(v)}" for k, v in value.items()) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _add_race_parser(sub: Any) -> None:
    from .race import RaceConfig

    quick = RaceConfig()

    def preset(field: str | None = None, shown: str | None = None) -> str:
        # Flags left unset keep the preset's value; name the default preset's value once.
        if shown is None:
            assert field is not None, "preset() needs a field or the text shown"
            shown = _show(getattr(quick, field))
        return f"(default: the preset's; quick: {shown})"

    p = sub.add_parser(
        "race",
        help="train several grokking methods side by side and compare",
        description=(
            "Train the chosen methods on one task with identical data, seeds and evaluation "
            "schedule; report steps and seconds to the validation-accuracy thresholds, write "
            "results.json, results.csv and race.png. With no arguments runs the quick "
            "embedded race. Ctrl-C saves a checkpoint; rerunning the same command continues."
        ),
        epilog=(
            "Method specs: NAME[+NAME...][:KEY=VALUE,...], e.g. 'grokfast:lamb=5,wd=0.01', "
            "'grokfast+grokalign', 'baseline:wd=0.005'. See --list-methods for names and "
            "hyperparameters."
        ),
    )
    d = argparse.SUPPRESS  # unset flags keep the preset's value
    p.add_argument("--preset", type=_preset, default="quick",
                   help="named race, see --list-presets (default: quick)")
    p.add_argument("--list-presets", action="store_true", help="list presets and exit")
    p.add_argument("--list-methods", action="store_true", help="list methods and exit")
    g = p.add_argument_group("task and model")
    g.add_argument("--task", type=_task, default=d,
                   help="a+b, a-b, a*b, a*a-b, a*c+b*d-e, digits or mnist " + preset("task"))
    g.add_argument("--p", type=_int_at_least(2), default=d,
                   help="modulus " + preset("p"))
    g.add_argument("--split", choices=("grokfast", "neuralgrok"), default=d,
                   help="grokfast: --train-fraction for training; neuralgrok: 50%% test, 49%% "
                        "inner, 1%% outer " + preset("split"))
    g.add_argument("--train-fraction", type=_float_in(0, 1, low_open=True, high_open=True,
                                                      allowed="a float in (0, 1)"),
                   default=d, help="of the data, for the grokfast split "
                   + preset("train_fraction"))
    g.add_argument("--digits-train-size", type=_int_at_least(1), default=d,
                   help="training images of digits/mnist " + preset("digits_train_size"))
    g.add_argument("--model", choices=("auto", "transformer", "mlp", "omnigrok-mlp"), default=d,
                   help="auto: the embedding MLP for modular tasks, the Omnigrok MLP for "
                        "digits " + preset("model"))
    g.add_argument("--model-kw", type=_key_value, action="append", default=d,
                   metavar="KEY=VALUE", help="model constructor argument, e.g. layers=1 "
                   + preset("model_kwargs"))
    g.add_argument("--loss", choices=("ce", "mse"), default=d, help=preset("loss"))
    t = p.add_argument_group("training")
    t.add_argument("--methods", nargs="+", default=d, metavar="SPEC",
                   help="the arms, see below " + preset("methods"))
    t.add_argument("--set", dest="overrides", type=_key_value, action="append", default=d,
                   metavar="KEY=VALUE",
                   help="hyperparameter for every arm that has it: grokfast.lamb=5, lamb=5, "
                        "lr=1e-3, wd=0.01 " + preset("overrides"))
    t.add_argument("--optimizer", choices=("adamw", "adam"), default=d,
                   help=preset("optimizer"))
    t.add_argument("--lr", type=_POSITIVE, default=d, help=preset("lr"))
    t.add_argument("--wd", "--weight-decay", dest="weight_decay", type=_NON_NEGATIVE, default=d,
                   help="weight decay of every arm (an arm's own wd=... wins) "
                   + preset("weight_decay"))
    t.add_argument("--betas", type=_float_in(0, 1, low_open=False, high_open=True,
                                             allowed="a float in [0, 1)"),
                   nargs=2, default=d, help=preset("betas"))
    t.add_argument("--batch-size", type=_int_at_least(1), default=d, help=preset("batch_size"))
    t.add_argument("--no-shuffle", dest="shuffle", action="store_false", default=d,
                   help="the same batch order every epoch " + preset(shown="shuffled"))
    t.add_argument("--warmup-steps", type=_int_at_least(0), default=d,
                   help="linear learning-rate warmup " + preset("warmup_steps"))
    t.add_argument("--clip-grad-norm", type=_POSITIVE, default=d,
                   help=preset("clip_grad_norm"))
    t.add_argument("--steps", type=_int_at_least(1), default=d,
                   help="budget of optimizer steps per run " + preset("steps"))
    t.add_argument("--eval-every", type=_int_at_least(1), default=d,
                   help="steps between evaluations " + preset("eval_every"))
    t.add_argument("--threshold", dest="thresholds", nargs="+", default=d,
                   type=_float_in(0, 1, low_open=True, high_open=False,
                                  allowed="a float in (0, 1]"),
                   help="validation accuracies to time " + preset("thresholds"))
    t.add_argument("--full-budget", dest="stop_at_threshold", action="store_false", default=d,
                   help="keep training after the highest threshold is reached "
                   + preset(shown="stop there"))
    t.add_argument("--match-baselines", action="store_true",
                   help="add a baseline arm at every weight decay an arm uses")
    t.add_argument("--diagnostics", action="store_true", default=d,
                   help="also log centroid alignment and AGE curves at every evaluation "
                   + preset(shown="off"))
    t.add_argument("--seeds", type=_int_at_least(1), default=d,
                   help="number of seeds " + preset(shown=str(len(quick.seeds))))
    t.add_argument("--first-seed", type=_int_at_least(0), default=0,
                   help="seeds are FIRST_SEED, FIRST_SEED+1, ... (default: 0)")
    r = p.add_argument_group("running")
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d,
                   help=preset("device"))
    r.add_argument("--out", type=Path, default=None,
                   help="output folder (default: race-out/<race name>-<config hash>)")
    r.add_argument("--threads", type=_int_at_least(1), default=None,
                   help="torch CPU threads (default: 1; for these small models thread "
                        "hand-offs cost more than they save, badly so on a busy machine)")
    r.add_argument("--fresh", action="store_true",
                   help="start over, ignoring a checkpoint or finished results in the output "
                        "folder")
    r.add_argument("--keep-checkpoint", action="store_true",
                   help="keep checkpoint.pt when the race finishes (it is deleted otherwise)")
    r.add_argument("--no-progress", action="store_true",
                   help="plain log lines instead of live progress bars (what a pipe or a log "
                        "file gets anyway)")
    r.add_argument("--log-every", type=_NON_NEGATIVE, default=30.0, metavar="SECONDS",
                   help="without bars: seconds between status lines, 0 for one at every "
                        "evaluation (default: 30)")
    r.add_argument("--checkpoint-every", type=_POSITIVE, default=30.0, metavar="SECONDS",
                   help="seconds between checkpoints (default: 30)")
    p.set_defaults(func=lambda args: _race_command(args, p))


def build_parser() -> argparse.ArgumentParser:
    """The ``grokopt`` argument parser (subcommands added here)."""
    parser = argparse.ArgumentParser(
        prog="grokopt", description="Make networks grok sooner: tools around grokopt.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_race_parser(sub)
    _add_leaderboard_parser(sub)
    _add_bench_parser(sub)
    return parser


def _add_leaderboard_parser(sub: Any) -> None:
    p = sub.add_parser(
        "leaderboard", help="fold finished races (one per task) into one table and figure",
        description="Read finished races' results.json and write leaderboard.json, "
                    "leaderboard.csv and leaderboard.png (one panel per task) to --out.")
    p.add_argument("results", nargs="+", type=Path, metavar="RESULTS",
                   help="a race's results.json, or the folder holding it")
    p.add_argument("--out", type=Path, default=Path("race-out") / "leaderboard",
                   help="output folder (default: %(default)s)")
    p.set_defaults(func=lambda args: _leaderboard_command(args, p))


def _leaderboard_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from rich.console import Console

    from .race.leaderboard import (leaderboard_rows, leaderboard_table, load_results,
                                   write_leaderboard)

    try:
        results = load_results(args.results)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        parser.error(f"argument RESULTS: {exc}")
    console = Console(width=160)
    console.print(leaderboard_table(leaderboard_rows(results)))
    files = write_leaderboard(results, args.out)
    console.print("wrote " + ", ".join(files.values()), highlight=False)
    return 0


def _add_bench_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="time and peak memory per training step of each method")
    add_bench_arguments(p)
    p.set_defaults(func=lambda args: run_bench(args, parser=p))


# --------------------------------------------------------------------------------------------
# grokopt bench
# --------------------------------------------------------------------------------------------


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``grokopt bench`` options to ``parser``; pair with :func:`run_bench`.

    Example:
        >>> p = add_bench_arguments(argparse.ArgumentParser())
        >>> args = p.parse_args(["--model", "omnigrok-mlp", "--methods", "grokfast", "--repeats", "3"])
        >>> args.model, args.methods, args.repeats
        ('omnigrok-mlp', ['grokfast'], 3)
    """
    from .bench import BUILTIN_MODELS, DEFAULT_METHODS
    from .race import METHODS

    parser.description = parser.description or (
        "Time and peak memory per training step of each grokopt method, as ratios to the "
        "baseline step, on a built-in model or your own; prints a table and writes JSON.")
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
                   help=f"arm specs as in a race, from {', '.join(METHODS)}; combine with '+', "
                        f"add :KEY=VALUE,... (default: "
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


_BENCH_FLAGS = {
    "model": "--model", "model_kwargs": "--model-kw", "input_shape": "--input-shape",
    "make_batch": "--make-batch", "input_shape/make_batch": "--input-shape/--make-batch",
    "batch_size": "--batch-size", "outer_batch_size": "--outer-batch-size",
    "device": "--device", "methods": "--methods", "repeats": "--repeats", "steps": "--steps",
    "warmup": "--warmup", "threads": "--threads", "seed": "--seed",
}


def run_bench(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    """Run :func:`grokopt.bench.bench` from parsed :func:`add_bench_arguments` options;
    print the table.

    ``package.module:factory`` paths are imported from the current folder too, as with
    ``python -m``. Returns the exit status: 0, or 2 on a rejected argument, reported as one
    ``error:`` line naming it (through ``parser.error`` when ``parser`` is given).
    """
    from .bench import BUILTIN_MODELS, bench

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
        field, rest = _leading_field(message)
        if field in _BENCH_FLAGS:
            message = f"argument {_BENCH_FLAGS[field]}: {rest}"
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


# --------------------------------------------------------------------------------------------
# From arguments to checked race configurations
# --------------------------------------------------------------------------------------------

_FIELDS = ("task", "p", "split", "train_fraction", "digits_train_size", "model", "loss",
           "methods", "optimizer", "lr", "weight_decay", "betas", "batch_size", "shuffle",
           "warmup_steps", "clip_grad_norm", "steps", "eval_every", "thresholds",
           "stop_at_threshold", "device", "diagnostics")

# The flag that sets each field named at the start of a library error message.
_FLAGS = {
    "task": "--task", "p": "--p", "split": "--split", "train_fraction": "--train-fraction",
    "train_size": "--digits-train-size", "digits_train_size": "--digits-train-size",
    "model": "--model", "model_kwargs": "--model-kw", "loss": "--loss",
    "optimizer": "--optimizer", "lr": "--lr", "weight_decay": "--wd", "betas": "--betas",
    "batch_size": "--batch-size", "warmup_steps": "--warmup-steps",
    "clip_grad_norm": "--clip-grad-norm", "steps": "--steps", "eval_every": "--eval-every",
    "thresholds": "--threshold", "seeds": "--seeds", "device": "--device",
    "overrides": "--set", "methods": "--methods",
}


def _refuse(parser: argparse.ArgumentParser, exc: BaseException, args: argparse.Namespace,
            cfg: Any = None) -> NoReturn:
    """``parser.error`` with the flag of the field a library error names."""
    message = " ".join(str(exc).split())
    field, rest = _leading_field(message)
    flag = _FLAGS.get(field)
    if field == "methods" and not hasattr(args, "methods"):
        flag = "--preset"  # the arms came from the preset (with --set and --wd applied)
        rest = f"{cfg.name if cfg is not None else args.preset}: {rest}"
    parser.error(f"argument {flag}: {rest}" if flag else message)


def _leading_field(message: str) -> tuple[str, str]:
    """``("steps", "must be ...")`` from ``"steps must be ..."`` or ``"steps: ..."``: library
    errors start with the argument's name (grokopt/_checks.py's style, or "name: ...")."""
    match = re.match(r"([\w/.]+)(?:: | (?=must ))", message)
    if match is None:
        return "", message
    return match.group(1), message[match.end():]


def _configs_from_args(args: argparse.Namespace) -> list[Any]:
    from .race import PRESETS

    changes: dict[str, Any] = {k: getattr(args, k) for k in _FIELDS if hasattr(args, k)}
    for key in ("methods", "thresholds", "betas"):
        if key in changes:
            changes[key] = tuple(changes[key])
    configs = []
    for base in PRESETS[args.preset].configs:
        cfg_changes = dict(changes)
        # Switching between an image task and a modular one changes the model: the preset's
        # model arguments belong to the other model.
        switched = "task" in cfg_changes and (
            (cfg_changes["task"] in IMAGE_TASKS) != (base.task in IMAGE_TASKS))
        base_kw = {} if switched else base.model_kwargs
        if hasattr(args, "model_kw"):
            cfg_changes["model_kwargs"] = {**base_kw, **dict(args.model_kw)}
        if hasattr(args, "overrides"):
            cfg_changes["overrides"] = {**base.overrides, **dict(args.overrides)}
        if hasattr(args, "seeds"):
            cfg_changes["seeds"] = tuple(range(args.first_seed, args.first_seed + args.seeds))
        elif args.first_seed:
            cfg_changes["seeds"] = tuple(s + args.first_seed for s in base.seeds)
        if "task" in cfg_changes and "p" not in cfg_changes and cfg_changes["task"] != base.task:
            cfg_changes["p"] = None if cfg_changes["task"] in IMAGE_TASKS else (
                7 if cfg_changes["task"] in ("a*c+b*d-e", "poly7", "poly") else base.p or 97)
        if switched and "model" not in cfg_changes:
            cfg_changes["model"] = "auto"
            cfg_changes.setdefault("model_kwargs", {})
        cfg = dataclasses.replace(base, **cfg_changes)
        if args.match_baselines:
            from .race import with_matched_baselines

            cfg = with_matched_baselines(cfg)
        configs.append(cfg)
    return configs


def _check_set(parser: argparse.ArgumentParser, cfg: Any, overrides: dict[str, Any]) -> None:
    """Each ``--set KEY=VALUE`` must set something in an arm, and each value must be one the
    method accepts; checked one key at a time so that the error names that key."""
    from .race import check_config

    specs = cfg.specs()
    for key, value in overrides.items():
        arms = list(dict.fromkeys(
            "+".join(s.components) for s in specs if key in s.applied_overrides))
        if not arms:
            names = {"lr", "wd", "weight_decay"}
            for s in specs:
                for c in s.components:
                    names.update(s.params[c])
                    names.update(f"{c}.{k}" for k in s.params[c])
            parser.error(f"argument --set: {key}={value!r} sets nothing in any arm of "
                         f"{cfg.name!r} ({', '.join(cfg.methods)}); allowed: "
                         f"{', '.join(sorted(names))}")
        try:
            check_config(dataclasses.replace(cfg, methods=tuple(arms), overrides={key: value}))
        except (ValueError, TypeError) as exc:
            if not str(exc).startswith(("methods: ", "overrides: ")):
                raise  # not this key's fault (a model argument, say): reported by its flag
            reason = exc.__cause__ if isinstance(exc.__cause__, (ValueError, TypeError)) else exc
            text = " ".join(str(reason).split())
            parser.error(f"argument --set: {key}={value!r}: {text.removeprefix('overrides: ')}")


def _checked_configs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[Any]:
    """The races to run, every arm built once: a bad argument stops here, before training."""
    from .race import check_config, check_out_dir

    try:
        configs = _configs_from_args(args)
    except (ValueError, TypeError) as exc:
        _refuse(parser, exc, args)
    for cfg in configs:
        try:
            if hasattr(args, "overrides"):
                _check_set(parser, cfg, dict(args.overrides))
            check_config(cfg)
        except (ValueError, TypeError, RuntimeError) as exc:
            _refuse(parser, exc, args, cfg)
        if not args.fresh:
            try:
                check_out_dir(cfg, _out_dir(args, cfg, len(configs)))
            except RuntimeError as exc:
                parser.error(f"argument --out: {' '.join(str(exc).split())}")
    return configs


def _out_dir(args: argparse.Namespace, cfg: Any, n_configs: int) -> Path:
    if args.out is None:
        return Path("race-out") / f"{cfg.name}-{cfg.fingerprint()[:8]}"
    return args.out / cfg.name if n_configs > 1 else args.out


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def _list_methods(console: Any) -> None:
    from rich.table import Table

    from .race import METHODS

    table = Table(title="race methods (combine with '+')")
    for col in ("name", "hyperparameters (defaults)", "what", "status"):
        table.add_column(col)
    for m in METHODS.values():
        reason = m.unavailable()
        hp = ", ".join(f"{k}={v!r}" for k, v in m.defaults.items()) or "-"
        table.add_row(m.name, hp, m.summary, "unavailable: " + reason if reason else "ok")
    console.print(table)


def _list_presets(console: Any) -> None:
    from rich.table import Table

    from .race import PRESETS

    table = Table(title="race presets")
    table.add_column("preset")
    table.add_column("what")
    table.add_column("arms")
    for p in PRESETS.values():
        arms = "; ".join(sorted({", ".join(c.methods) for c in p.configs}))
        table.add_row(p.name, p.description, arms)
    console.print(table)


def _race_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        from rich.console import Console
    except ImportError:
        print("error: grokopt race needs the optional packages rich, matplotlib and "
              "scikit-learn; install them with: pip install grokopt[race]", file=sys.stderr)
        return 1
    import torch

    console = Console()
    if not console.is_terminal:  # pipes and logs: do not squeeze the table to 80 columns
        console = Console(width=max(console.width, 140))
    if args.list_methods:
        _list_methods(console)
        return 0
    if args.list_presets:
        _list_presets(console)
        return 0
    try:
        configs = _checked_configs(parser, args)
    except ImportError as exc:  # scikit-learn for the digits task
        print(f"error: {exc}", file=sys.stderr)
        return 1
    default_threads = torch.get_num_threads()
    try:
        return _run_configs(console, args, configs)
    finally:
        torch.set_num_threads(default_threads)


def _run_configs(console: Any, args: argparse.Namespace, configs: list[Any]) -> int:
    import torch

    from .race import results_table, run_race

    interrupted = False
    finished = []
    for cfg in configs:
        # Measured on a busy 2-core CPU: one thread ran the quick race 3x and the p=97
        # transformer 6x faster than two (OpenMP hand-offs dominate these small models).
        torch.set_num_threads(1 if args.threads is None else args.threads)
        # Live bars need a terminal; in a pipe or a log they would show only at the end.
        bars = console.is_terminal and not args.no_progress
        result = run_race(cfg, out_dir=_out_dir(args, cfg, len(configs)), resume=not args.fresh,
                          progress=bars, log_every=None if bars else args.log_every,
                          keep_checkpoint=args.keep_checkpoint,
                          checkpoint_every=args.checkpoint_every)
        console.print(results_table(result))
        env = result.environment
        console.print(f"device {env['device']} · torch {env['torch']} · {env['platform']}",
                      highlight=False)
        console.print("wrote " + ", ".join(result.files.values()), highlight=False)
        if result.interrupted:
            console.print("[yellow]interrupted: checkpoint saved; rerun the same command "
                          "to continue[/yellow]")
            interrupted = True
            break
        finished.append(result.to_dict())
    if len(configs) > 1 and not interrupted:  # a preset of several tasks: one leaderboard
        from .race.leaderboard import leaderboard_rows, leaderboard_table, write_leaderboard

        console.print(leaderboard_table(leaderboard_rows(finished)))
        out = args.out if args.out is not None else Path("race-out") / args.preset
        console.print("wrote " + ", ".join(write_leaderboard(finished, out).values()),
                      highlight=False)
    return 130 if interrupted else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``grokopt`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
