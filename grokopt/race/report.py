"""A race's results (:class:`RaceResult`, the per-arm summary) and its outputs:
results.json, results.csv (every curve), race.png and the terminal table."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
import statistics
from dataclasses import dataclass, field
from typing import Any

from .._extras import require_race_extra
from .config import RaceConfig, threshold_key
from .methods import BASELINE

__all__ = ["FORMAT_VERSION", "RaceResult", "plot_race", "results_table", "summarise",
           "write_outputs"]

#: Version of results.json and checkpoint.pt.
FORMAT_VERSION = 1

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
        return {"format_version": FORMAT_VERSION, "config": self.config.to_dict(),
                "fingerprint": self.config.fingerprint(), "environment": self.environment,
                "interrupted": self.interrupted, "summary": self.summary, "runs": self.runs}



def summarise(cfg: RaceConfig, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
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
    ref = next((s for s in summary if s["label"].split(":")[0] == BASELINE), None)
    first = threshold_key(cfg.thresholds[0])
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




# --------------------------------------------------------------------------------------------
# Outputs: JSON, CSV, PNG, terminal table
# --------------------------------------------------------------------------------------------


def write_outputs(result: RaceResult, out_dir: str | os.PathLike[str], *,
                  plot: bool = True) -> dict[str, str]:
    """Write ``results.json``, ``results.csv`` (every curve) and ``race.png`` to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out / "results.json"), "csv": str(out / "results.csv")}
    with open(files["json"], "w") as fh:
        json.dump(result.to_dict(), fh, indent=1)
    with open(files["csv"], "w", newline="") as fh:
        w = csv.writer(fh)
        keys = tuple(result.runs[0]["curve"]) if result.runs else ()
        w.writerow(("label", "seed", "weight_decay", *keys))
        for r in result.runs:
            c = r["curve"]
            for i in range(len(c["step"])):
                w.writerow((r["label"], r["seed"], r["weight_decay"], *(c[k][i] for k in keys)))
    if plot:
        files["png"] = str(out / "race.png")
        plot_race(result, files["png"])
    return files


def plot_race(result: RaceResult, path: str | os.PathLike[str]) -> None:
    """Train (dashed) and validation (solid) accuracy against steps, log x, every run."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        require_race_extra("matplotlib")
    cfg = result.config
    extra = [k for k in ("centroid_alignment", "age")
             if result.runs and k in result.runs[0]["curve"]]
    fig, axes = plt.subplots(1 + len(extra), 1, figsize=(8, 4.8 + 2.4 * len(extra)), dpi=120,
                             sharex=True, squeeze=False)
    ax = axes[0, 0]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, label in enumerate(cfg.methods):
        colour = colours[i % len(colours)]
        first = True
        for r in result.runs:
            if r["label"] != label:
                continue
            c = r["curve"]
            # Step 0 cannot sit on a log axis; it is drawn at step 1.
            steps = [max(s, 1) for s in c["step"]]
            ax.plot(steps, c["train_acc"], "--", color=colour, alpha=0.7, lw=1.2,
                    label=f"{label} train" if first else None)
            ax.plot(steps, c["val_acc"], "-", color=colour, lw=1.8,
                    label=f"{label} val" if first else None)
            for j, key in enumerate(extra, start=1):
                axes[j, 0].plot(steps, c[key], "-", color=colour, lw=1.2)
            first = False
    for j, key in enumerate(extra, start=1):
        axes[j, 0].set_ylabel({"centroid_alignment": "centroid alignment",
                               "age": "AGE (train gradient)"}[key])
        axes[j, 0].grid(alpha=0.3, which="both")
    for t in cfg.thresholds:
        ax.axhline(t, color="grey", lw=0.6, ls=":")
    ax.set_xscale("log")
    axes[-1, 0].set_xlabel("optimizer steps")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    task = cfg.task if cfg.p is None else f"{cfg.task} mod {cfg.p}"
    ax.set_title(f"grokopt race '{cfg.name}': {task} ({len(cfg.seeds)} seed(s))")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt_stat(s: dict[str, Any], fmt: str, total: int) -> str:
    if s["mean"] is None:
        return "-"
    text = format(s["mean"], fmt)
    if s["n"] > 1:
        text += "±" + format(s["std"], fmt)
    if s["n"] < total:
        text += f" ({s['n']}/{total})"
    return text


def results_table(result: RaceResult) -> Any:
    """A ``rich.table.Table`` of the race summary (published numbers beside ours)."""
    try:
        from rich.table import Table
    except ImportError:
        require_race_extra("rich")
    cfg = result.config
    n = len(cfg.seeds)
    task = cfg.task if cfg.p is None else f"{cfg.task} mod {cfg.p}"
    table = Table(title=f"grokopt race '{cfg.name}': {task}, {n} seed(s), budget {cfg.steps} steps"
                  + (" [interrupted]" if result.interrupted else ""))
    table.add_column("method", no_wrap=True)
    table.add_column("wd", justify="right", overflow="fold")
    table.add_column("grok-\nked", justify="right", overflow="fold")
    for t in cfg.thresholds:
        table.add_column(f"steps to\n{t:.0%} val", justify="right", overflow="fold")
    table.add_column(f"seconds\nto {cfg.thresholds[0]:.0%}", justify="right", overflow="fold")
    table.add_column("speedup\nsteps/secs", justify="right", overflow="fold")
    table.add_column("final acc\ntrain/val", justify="right", overflow="fold")
    table.add_column("ms per\nstep", justify="right", overflow="fold")
    if cfg.published:
        table.add_column("published", justify="right", overflow="fold")
    for row in result.summary:
        cells = [row["label"], f"{row['weight_decay']:g}", f"{row['grokked']}/{n}"]
        cells += [_fmt_stat(row["steps_to"][threshold_key(t)], ".0f", n) for t in cfg.thresholds]
        cells.append(_fmt_stat(row["seconds_to"][threshold_key(cfg.thresholds[0])], ".1f", n))
        sp_steps, sp_secs = row["speedup_steps"], row["speedup_seconds"]
        cells.append("-" if sp_steps is None else f"{sp_steps:.2f}x/{sp_secs:.2f}x"
                     if sp_secs else f"{sp_steps:.2f}x")
        tr, va = row["final_train_acc"]["mean"], row["final_val_acc"]["mean"]
        cells.append("-" if tr is None else f"{tr:.3f}/{va:.3f}")
        sps = row["seconds_per_step"]
        cells.append("-" if sps["mean"] is None else f"{1000 * sps['mean']:.1f}")
        if cfg.published:
            cells.append(row["published"] or "-")
        table.add_row(*cells)
    if cfg.published_note:
        table.caption = "published: " + cfg.published_note
    return table
