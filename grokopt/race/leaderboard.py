"""The leaderboard: several races (one per task) folded into one table and one figure.

Each race's ``results.json`` already holds, per arm, the steps and seconds to each
threshold over its seeds. The leaderboard lines them up: one row per (task, arm), the
speedup over the task's ``baseline`` arm in steps and in seconds at the first threshold,
and "did not grok" where an arm's seeds did not all reach it. Written as
``leaderboard.json``, ``leaderboard.csv`` and ``leaderboard.png`` (one panel per task:
mean validation accuracy over seeds against steps).
"""

from __future__ import annotations

import csv
import json
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._extras import require_race_extra
from .methods import BASELINE

__all__ = ["leaderboard_rows", "leaderboard_table", "load_results", "write_leaderboard"]



def load_results(paths: Sequence[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """Read races' ``results.json`` files (a folder stands for the file inside it)."""
    out = []
    for path in paths:
        p = Path(path)
        if p.is_dir():
            p = p / "results.json"
        if not p.is_file():
            raise FileNotFoundError(f"results: no race results at {p}")
        out.append(json.loads(p.read_text()))
    return out


def _task_name(cfg: Mapping[str, Any]) -> str:
    return cfg["task"] if cfg.get("p") is None else f"{cfg['task']} mod {cfg['p']}"


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def leaderboard_rows(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, arm), in each race's arm order.

    ``steps_to`` / ``seconds_to`` map each threshold to mean/std/n over the seeds that
    reached it. ``speedup_steps`` and ``speedup_seconds`` compare, at the race's first
    threshold, the baseline's mean with the arm's; they are None unless every seed of both
    reached it ("did not grok").

    Example:
        >>> run = lambda label, seed, step: {"label": label, "seed": seed, "grokked": True,
        ...     "steps_to": {"0.95": step}, "seconds_to": {"0.95": step / 100},
        ...     "final_val_acc": 1.0}
        >>> race = {"config": {"name": "r", "task": "a*b", "p": 97, "thresholds": [0.95]},
        ...         "runs": [run("baseline", 0, 900), run("baseline", 1, 1100),
        ...                  run("grokfast", 0, 400), run("grokfast", 1, 600)]}
        >>> [(r["arm"], r["speedup_steps"]) for r in leaderboard_rows([race])]
        [('baseline', 1.0), ('grokfast', 2.0)]
    """
    rows = []
    for race in results:
        cfg = race["config"]
        keys = [f"{t:g}" for t in cfg["thresholds"]]
        first = keys[0]
        by_arm: dict[str, list[Mapping[str, Any]]] = {}
        for run in race["runs"]:
            by_arm.setdefault(run["label"], []).append(run)

        def mean_to(runs: list[Mapping[str, Any]], what: str) -> float | None:
            values = [r[what][first] for r in runs]
            return None if any(v is None for v in values) else statistics.fmean(values)

        base = by_arm.get(BASELINE)
        for arm, runs in by_arm.items():
            row: dict[str, Any] = {
                "race": cfg["name"], "task": _task_name(cfg), "arm": arm,
                "seeds": len(runs), "grokked": sum(1 for r in runs if r["steps_to"][first] is not None),
                "steps_to": {k: _stats([r["steps_to"][k] for r in runs if r["steps_to"][k] is not None])
                             for k in keys},
                "seconds_to": {k: _stats([r["seconds_to"][k] for r in runs
                                          if r["seconds_to"][k] is not None]) for k in keys},
                "final_val_acc": _stats([r["final_val_acc"] for r in runs]),
                "speedup_steps": None, "speedup_seconds": None,
            }
            if base is not None:
                for what, key in (("steps_to", "speedup_steps"), ("seconds_to", "speedup_seconds")):
                    b, a = mean_to(base, what), mean_to(runs, what)
                    if b is not None and a is not None and a > 0:
                        row[key] = b / a
            rows.append(row)
    return rows


def _fmt(stat: Mapping[str, float] | None, total: int, digits: int = 0) -> str:
    if stat is None:
        return "did not grok"
    text = f"{stat['mean']:,.{digits}f}"
    if stat["n"] > 1:
        text += f" ± {stat['std']:,.{digits}f}"
    if stat["n"] < total:
        text += f" ({stat['n']}/{total})"
    return text


def _flat(row: Mapping[str, Any]) -> dict[str, str]:
    out = {"task": row["task"], "arm": row["arm"], "grokked": f"{row['grokked']}/{row['seeds']}"}
    for k, s in row["steps_to"].items():
        out[f"steps to {float(k):.0%}"] = _fmt(s, row["seeds"])
    for k, s in row["seconds_to"].items():
        out[f"seconds to {float(k):.0%}"] = _fmt(s, row["seeds"], 1)
    su, ss = row["speedup_steps"], row["speedup_seconds"]
    out["speedup steps / seconds"] = "-" if su is None else f"{su:.2f}x / {ss:.2f}x"
    out["final val acc"] = f"{row['final_val_acc']['mean']:.3f}"
    return out


def _flat_rows(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[dict[str, str]]]:
    """Columns (races may use other thresholds: the union, in order) and rows as text."""
    flat = [_flat(r) for r in rows]
    columns: list[str] = []
    for f in flat:
        columns += [c for c in f if c not in columns]
    return columns, [{c: f.get(c, "") for c in columns} for f in flat]


def leaderboard_table(rows: Sequence[Mapping[str, Any]]) -> Any:
    """A rich table of :func:`leaderboard_rows` (what ``grokopt leaderboard`` prints)."""
    from rich.table import Table

    columns, flat = _flat_rows(rows)
    table = Table(title="grokking leaderboard")
    for col in columns:
        table.add_column(col, justify="left" if col in ("task", "arm") else "right")
    for f in flat:
        table.add_row(*f.values())
    return table


def write_leaderboard(results: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike[str],
                      *, plot: bool = True) -> dict[str, str]:
    """Write ``leaderboard.json`` (rows and the races' configs and environments),
    ``leaderboard.csv`` (the table as printed) and ``leaderboard.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = leaderboard_rows(results)
    files = {"json": str(out / "leaderboard.json"), "csv": str(out / "leaderboard.csv")}
    with open(files["json"], "w") as fh:
        json.dump({"rows": rows, "races": [{"config": r["config"], "environment": r.get("environment")}
                                           for r in results]}, fh, indent=1)
    columns, flat = _flat_rows(rows)
    with open(files["csv"], "w", newline="") as fh:
        if flat:
            w = csv.DictWriter(fh, fieldnames=columns)
            w.writeheader()
            w.writerows(flat)
    if plot:
        files["png"] = str(out / "leaderboard.png")
        plot_leaderboard(results, files["png"])
    return files


def arm_order(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every arm of the races once, in order of first appearance.

    Example:
        >>> arm_order([{"runs": [{"label": "a"}, {"label": "b"}, {"label": "a"}]},
        ...            {"runs": [{"label": "c"}, {"label": "b"}]}])
        ['a', 'b', 'c']
    """
    return list(dict.fromkeys(r["label"] for race in results for r in race["runs"]))


def plot_leaderboard(results: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
    """One panel per race: each arm's validation accuracy, mean over seeds, log steps."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        require_race_extra("matplotlib")
    n = len(results)
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 4.2 * rows), dpi=110, squeeze=False)
    arms = arm_order(results)
    # One colour and line style per arm in every panel.
    palette = plt.get_cmap("tab10").colors  # type: ignore[attr-defined]  # (a ListedColormap)
    look: dict[str, tuple[Any, Any]] = {
        a: (palette[i % 10], "-" if i < 10 else "--") for i, a in enumerate(arms)}
    for ax, race in zip(axes.flat, results):
        by_arm: dict[str, list[Mapping[str, Any]]] = {}
        for run in race["runs"]:
            by_arm.setdefault(run["label"], []).append(run)
        for arm, runs in by_arm.items():
            # A run that stopped (it reached the top threshold) keeps its last accuracy.
            steps = sorted({int(s) for r in runs for s in r["curve"]["step"] if s > 0})
            mean = []
            for s in steps:
                values = []
                for r in runs:
                    seen = [v for t, v in zip(r["curve"]["step"], r["curve"]["val_acc"]) if t <= s]
                    values.append(seen[-1])
                mean.append(statistics.fmean(values))
            color, style = look[arm]
            ax.plot(steps, mean, style, color=color, label=arm, lw=1.3)
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_title(_task_name(race["config"]))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation accuracy (mean over seeds)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=look[a][0], linestyle=look[a][1]) for a in arms]
    ncol = min(6, len(arms))
    fig.legend(handles, arms, loc="lower center", ncol=ncol, fontsize=8)
    legend_rows = -(-len(arms) // ncol)
    fig.tight_layout(rect=(0, 0.03 + 0.1 * legend_rows / rows, 1, 1))
    fig.savefig(path)
    plt.close(fig)
