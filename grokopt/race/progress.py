"""What a race shows while it runs: live rich bars, plain log lines, or nothing."""

from __future__ import annotations

import time
from typing import Any

from .._extras import require_race_extra
from .config import threshold_key
from .engine import Run

__all__ = ["Reporter"]


class Reporter:
    """What a race shows while it runs: live rich bars, plain log lines, or nothing.

    Log lines (``log_every`` seconds apart, every evaluation at 0) suit pipes and CI logs:
    a status line per unfinished run each period, plus a line when a run reaches a
    threshold and when it finishes.
    """

    def __init__(self, bars: bool, log_every: float | None, runs: list[Run], title: str) -> None:
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

    def __enter__(self) -> Reporter:
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

    def _status(self, run: Run) -> str:
        c = run.curve
        acc = (f"train {c['train_acc'][-1]:.3f}  val {c['val_acc'][-1]:.3f}" if c["step"]
               else "not evaluated yet")
        return f"{run.spec.label} s{run.seed}: step {run.step}/{run.cfg.steps}  {acc}"

    def _log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f}s] {text}", flush=True)

    def update(self, run: Run) -> None:
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
            hit = run.reached[threshold_key(run.cfg.thresholds[0])]
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

    def _bar(self, run: Run) -> None:
        assert self.progress is not None
        c = run.curve
        tr = f"{c['train_acc'][-1]:.3f}" if c["step"] else "-"
        va = f"{c['val_acc'][-1]:.3f}" if c["step"] else "-"
        status = ""
        if run.done:
            hit = run.reached[threshold_key(run.cfg.thresholds[0])]
            status = f"grokked @ {hit['step']}" if hit else "budget spent"
        total = run.step if run.done else run.cfg.steps
        self.progress.update(self.ids[id(run)], completed=run.step, total=total,
                             train=tr, val=va, status=status)

