"""The grokking race: train several methods side by side on one task and compare.

Every arm of a race (a method, possibly with its own hyperparameters) is trained for every
seed from the same data split, the same initial weights and the same batch order, with the
same evaluation schedule. The race reports, per arm, the steps and training seconds to reach
each validation-accuracy threshold, the final accuracies, the seconds per step and whether it
grokked within the budget, aggregated over seeds.

Use it from Python::

    from grokopt import RaceConfig, run_race
    result = run_race(RaceConfig(methods=("baseline", "grokfast"), steps=2000), out_dir="out")
    for row in result.summary:
        print(row["label"], row["steps_to"]["0.95"])

or from the command line: ``grokopt race --help``.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .._checks import check_float
from .config import IMAGE_TASKS, RaceConfig
from .device import cuda_ids, environment, resolve_device
from .engine import Run, load_data
from .progress import Reporter
from .report import FORMAT_VERSION, RaceResult, summarise, write_outputs

__all__ = ["check_config", "check_out_dir", "run_race"]

_CHECKPOINT = "checkpoint.pt"


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
        ValueError: methods: arm 'grokfast:lamb=-3': lamb must be a finite float >= 0 (or a 0-d float tensor), got -3
    """
    device = resolve_device(config.device)
    specs = config.specs()
    with torch.random.fork_rng(devices=cuda_ids(device)):
        data = load_data(config, config.seeds[0], device)
        for spec in specs:
            Run(config, spec, config.seeds[0], data, device)


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
    if (not isinstance(stored, dict) or stored.get("format_version") != FORMAT_VERSION
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
    check_float("log_every", log_every, minimum=0, allow_none=True)
    check_float("checkpoint_every", checkpoint_every, minimum=0, min_open=True)
    device = resolve_device(cfg.device)
    specs = cfg.specs()
    out = Path(out_dir) if out_dir is not None else None
    ckpt = out / _CHECKPOINT if out is not None else None

    if out is not None and resume:
        check_out_dir(cfg, out)
    if out is not None and ckpt is not None and resume and not ckpt.exists():
        done = _finished_result(cfg, out)
        if done is not None:
            Reporter(progress, log_every, [], "").note(
                f"grokopt race '{cfg.name}': already finished in {out}, showing its stored "
                "results (--fresh, or resume=False, runs it again)")
            done.files = write_outputs(done, out)
            return done

    stop = threading.Event()
    runs: list[Run] = []
    datasets = {seed: load_data(cfg, seed, device) for seed in cfg.seeds}
    # Runs set the global RNG per chunk (see Run.train_until); the caller's state survives.
    with torch.random.fork_rng(devices=cuda_ids(device)):
        for seed in cfg.seeds:
            for spec in specs:
                runs.append(Run(cfg, spec, seed, datasets[seed], device))
        resumed = False
        if ckpt is not None and resume and ckpt.exists():
            state = torch.load(ckpt, map_location=device, weights_only=True)
            for run, rs in zip(runs, state["runs"]):
                run.load_state_dict(rs)
                run.resumed_from = run.step
            resumed = True

        def save() -> None:
            _save_checkpoint(ckpt, cfg, runs)

        previous = None
        if handle_sigint and threading.current_thread() is threading.main_thread():
            def on_sigint(signum: int, frame: Any) -> None:
                if stop.is_set():  # a second Ctrl-C means "now", without saving
                    raise KeyboardInterrupt
                stop.set()

            previous = signal.signal(signal.SIGINT, on_sigint)
        title = f"grokopt race '{cfg.name}': {cfg.task}" + (
            f" mod {cfg.p}" if cfg.task not in IMAGE_TASKS else "") + f" on {device}"
        try:
            with Reporter(progress, log_every, runs, title) as report:
                if resumed:
                    for run in runs:
                        report.note(f"{run.spec.label} s{run.seed}: resumed from step "
                                    f"{run.step}" + (" (finished)" if run.done else ""))
                _round_robin(cfg, runs, stop, report, callback, save, checkpoint_every)
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
    result = RaceResult(cfg, records, summarise(cfg, records), environment(device),
                        interrupted=stop.is_set())
    if out is not None:
        result.files = write_outputs(result, out)
    return result


def _round_robin(cfg: RaceConfig, runs: list[Run], stop: threading.Event, report: Reporter,
                 callback: Callable[[dict[str, Any]], None] | None,
                 save: Callable[[], None], checkpoint_every: float) -> None:
    """Advance every unfinished run ``eval_every`` steps at a time until all are done or
    ``stop`` is set, evaluating after each chunk and saving every ``checkpoint_every`` s."""
    last_save = time.monotonic()
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


def _save_checkpoint(ckpt: Path | None, cfg: RaceConfig, runs: list[Run]) -> None:
    """Write the race's checkpoint atomically (a temporary file, then a rename)."""
    if ckpt is None:
        return
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    tmp = ckpt.with_suffix(".tmp")
    torch.save({"format_version": FORMAT_VERSION, "fingerprint": cfg.fingerprint(),
                "config": cfg.to_dict(), "runs": [r.state_dict() for r in runs]}, tmp)
    os.replace(tmp, ckpt)
