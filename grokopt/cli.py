"""The ``grokopt`` command line (``grokopt race ...`` or ``python -m grokopt race ...``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]


def _key_value(text: str) -> tuple[str, Any]:
    from .race_methods import _parse_value

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), _parse_value(value)


def _add_race_parser(sub: Any) -> None:
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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = argparse.SUPPRESS  # unset flags keep the preset's value
    p.add_argument("--preset", default="quick", help="named race (see --list-presets)")
    p.add_argument("--list-presets", action="store_true", help="list presets and exit")
    p.add_argument("--list-methods", action="store_true", help="list methods and exit")
    g = p.add_argument_group("task and model")
    g.add_argument("--task", default=d, help="a+b, a-b, a*b, a*a-b, a*c+b*d-e or digits")
    g.add_argument("--p", type=int, default=d, help="modulus")
    g.add_argument("--split", choices=("grokfast", "neuralgrok"), default=d)
    g.add_argument("--train-fraction", type=float, default=d)
    g.add_argument("--digits-train-size", type=int, default=d)
    g.add_argument("--model", choices=("auto", "transformer", "mlp", "omnigrok-mlp"), default=d)
    g.add_argument("--model-kw", type=_key_value, action="append", default=d,
                   metavar="KEY=VALUE", help="model constructor argument, e.g. layers=1")
    g.add_argument("--loss", choices=("ce", "mse"), default=d)
    t = p.add_argument_group("training")
    t.add_argument("--methods", nargs="+", default=d, metavar="SPEC")
    t.add_argument("--set", dest="overrides", type=_key_value, action="append", default=d,
                   metavar="KEY=VALUE",
                   help="hyperparameter for every arm: grokfast.lamb=5, lr=1e-3, wd=0.01")
    t.add_argument("--optimizer", choices=("adamw", "adam"), default=d)
    t.add_argument("--lr", type=float, default=d)
    t.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, default=d,
                   help="weight decay of every arm (an arm's own wd=... wins)")
    t.add_argument("--betas", type=float, nargs=2, default=d)
    t.add_argument("--batch-size", type=int, default=d)
    t.add_argument("--no-shuffle", dest="shuffle", action="store_false", default=d)
    t.add_argument("--warmup-steps", type=int, default=d)
    t.add_argument("--clip-grad-norm", type=float, default=d)
    t.add_argument("--steps", type=int, default=d, help="budget of optimizer steps per run")
    t.add_argument("--eval-every", type=int, default=d)
    t.add_argument("--threshold", dest="thresholds", type=float, nargs="+", default=d)
    t.add_argument("--full-budget", dest="stop_at_threshold", action="store_false", default=d,
                   help="keep training after the highest threshold is reached")
    t.add_argument("--match-baselines", action="store_true",
                   help="add a baseline arm at every weight decay an arm uses")
    t.add_argument("--diagnostics", action="store_true", default=d,
                   help="also log centroid alignment and AGE curves at every evaluation")
    t.add_argument("--seeds", type=int, default=d, help="number of seeds")
    t.add_argument("--first-seed", type=int, default=0)
    r = p.add_argument_group("running")
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d)
    r.add_argument("--out", type=Path, default=None,
                   help="output folder (default race-out/<race name>-<config hash>)")
    r.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1: for these small models thread "
                        "hand-offs cost more than they save, badly so on a busy machine)")
    r.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    r.add_argument("--no-progress", action="store_true", help="no live progress bars")
    r.add_argument("--checkpoint-every", type=float, default=30.0, help="seconds")
    p.set_defaults(func=_race_command)


def build_parser() -> argparse.ArgumentParser:
    """The ``grokopt`` argument parser (subcommands added here)."""
    parser = argparse.ArgumentParser(
        prog="grokopt", description="Make networks grok sooner: tools around grokopt.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_race_parser(sub)
    _add_bench_parser(sub)
    return parser


def _add_bench_parser(sub: Any) -> None:
    try:
        from .bench import add_bench_arguments, run_from_args
    except ImportError:  # the benchmark module is optional in a partial checkout
        return
    p = sub.add_parser("bench", help="time and peak memory per training step of each method")
    add_bench_arguments(p)
    p.set_defaults(func=run_from_args)


_FIELDS = ("task", "p", "split", "train_fraction", "digits_train_size", "model", "loss",
           "methods", "optimizer", "lr", "weight_decay", "betas", "batch_size", "shuffle",
           "warmup_steps", "clip_grad_norm", "steps", "eval_every", "thresholds",
           "stop_at_threshold", "device", "diagnostics")


def _configs_from_args(args: argparse.Namespace) -> list[Any]:
    from .race import PRESETS

    if args.preset not in PRESETS:
        raise ValueError(f"--preset: unknown preset {args.preset!r}; allowed: "
                         + ", ".join(PRESETS))
    changes: dict[str, Any] = {k: getattr(args, k) for k in _FIELDS if hasattr(args, k)}
    for key in ("methods", "thresholds", "betas"):
        if key in changes:
            changes[key] = tuple(changes[key])
    configs = []
    for base in PRESETS[args.preset].configs:
        cfg_changes = dict(changes)
        if hasattr(args, "model_kw"):
            cfg_changes["model_kwargs"] = {**base.model_kwargs, **dict(args.model_kw)}
        if hasattr(args, "overrides"):
            cfg_changes["overrides"] = {**base.overrides, **dict(args.overrides)}
        if hasattr(args, "seeds"):
            cfg_changes["seeds"] = tuple(range(args.first_seed, args.first_seed + args.seeds))
        elif args.first_seed:
            cfg_changes["seeds"] = tuple(s + args.first_seed for s in base.seeds)
        if "task" in cfg_changes and "p" not in cfg_changes and cfg_changes["task"] != base.task:
            cfg_changes["p"] = None if cfg_changes["task"] == "digits" else (
                7 if cfg_changes["task"] in ("a*c+b*d-e", "poly7", "poly") else base.p or 97)
        if cfg_changes.get("task") == "digits" and "model" not in cfg_changes:
            cfg_changes["model"] = "auto"
            cfg_changes.setdefault("model_kwargs", {})
        cfg = dataclasses.replace(base, **cfg_changes)
        if args.match_baselines:
            from .race import with_matched_baselines

            cfg = with_matched_baselines(cfg)
        configs.append(cfg)
    return configs


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


def _race_command(args: argparse.Namespace) -> int:
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
        configs = _configs_from_args(args)
        for cfg in configs:
            cfg.specs()  # reject unknown or unavailable methods before any training
    except (ValueError, TypeError, RuntimeError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    if args.threads is not None and args.threads < 1:
        console.print(f"[red]error:[/red] --threads: expected an int >= 1, got {args.threads}")
        return 2
    default_threads = torch.get_num_threads()
    try:
        return _run_configs(console, args, configs)
    finally:
        torch.set_num_threads(default_threads)


def _run_configs(console: Any, args: argparse.Namespace, configs: list[Any]) -> int:
    import torch

    from .race import results_table, run_race

    interrupted = False
    for cfg in configs:
        # Measured on a busy 2-core CPU: one thread ran the quick race 3x and the p=97
        # transformer 6x faster than two (OpenMP hand-offs dominate these small models).
        torch.set_num_threads(1 if args.threads is None else args.threads)
        if args.out is None:
            out = Path("race-out") / f"{cfg.name}-{cfg.fingerprint()[:8]}"
        else:
            out = args.out / cfg.name if len(configs) > 1 else args.out
        try:
            result = run_race(cfg, out_dir=out, resume=not args.fresh,
                              progress=not args.no_progress,
                              checkpoint_every=args.checkpoint_every)
        except RuntimeError as exc:  # e.g. a checkpoint of another race in --out
            console.print(f"[red]error:[/red] {exc}", highlight=False)
            return 2
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
    return 130 if interrupted else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``grokopt`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
