"""The race engine and command line: specs, a tiny end-to-end race, resume after Ctrl-C."""

from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from grokopt.race import (
    METHODS,
    PRESETS,
    Method,
    RaceConfig,
    parse_run_spec,
    register_method,
    run_race,
)

pytest.importorskip("rich")
pytest.importorskip("matplotlib")


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: with two threads on a busy machine OpenMP hand-offs dominate each step.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

TINY = dict(task="a+b", p=11, model="mlp", model_kwargs={"dim": 8, "hidden": 16},
            batch_size=16, steps=12, eval_every=4, weight_decay=0.1, seeds=(0,))


def _curves(result):
    keep = ("step", "train_acc", "val_acc", "train_loss", "val_loss")
    return [(r["label"], r["seed"], {k: r["curve"][k] for k in keep}, r["steps_to"])
            for r in result.runs]


def test_parse_run_spec_components_params_and_training_keys() -> None:
    spec = parse_run_spec("grokalign+grokfast:lamb=5,wd=0.01,weight=1e-4")
    assert spec.components == ("grokalign", "grokfast")  # canonical nesting order
    assert spec.params["grokfast"] == {"alpha": 0.98, "lamb": 5}
    assert spec.params["grokalign"]["weight"] == 1e-4
    assert spec.training == {"weight_decay": 0.01}
    assert parse_run_spec("neuralgrok:hidden=(8,8),c=0.2").params["neuralgrok"]["hidden"] == (8, 8)
    spec = parse_run_spec("grokfast", {"grokfast.lamb": 1.5, "grokalign.weight": 1.0, "lr": 0.1})
    assert spec.params["grokfast"]["lamb"] == 1.5 and spec.training == {"lr": 0.1}


@pytest.mark.parametrize("text,error,match", [
    ("adam", ValueError, "methods: unknown method 'adam'"),
    ("grokfast:beta=1", ValueError, "beta: not a hyperparameter"),
    ("grokfast-ma+grokfast:lamb=1", ValueError, "ambiguous"),
    ("grokfast:lamb", ValueError, "expected key=value"),
    ("baseline+baseline", ValueError, "repeated"),
])
def test_parse_run_spec_errors(text: str, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        parse_run_spec(text)


def test_config_validation_names_argument() -> None:
    with pytest.raises(ValueError, match="device: got 'tpu'; allowed: auto, cpu, cuda"):
        RaceConfig(device="tpu")
    with pytest.raises(ValueError, match="steps"):
        RaceConfig(steps=0)
    with pytest.raises(ValueError, match="task: unknown modular task"):
        RaceConfig(task="a/b")
    with pytest.raises(ValueError, match="distinct"):
        RaceConfig(methods=("baseline", "baseline"))


def test_arms_share_data_init_and_schedule() -> None:
    # Grokfast at lamb=0 is exactly the bare optimizer: the two arms must coincide step for
    # step, which holds only if they get the same weights, batches and evaluation points.
    cfg = RaceConfig(**{**TINY, "seeds": (0, 1)}, methods=("baseline", "grokfast:lamb=0", "grokfast"))
    result = run_race(cfg)
    by = {(r["label"], r["seed"]): r["curve"] for r in result.runs}
    for seed in (0, 1):
        assert by[("baseline", seed)]["train_loss"] == by[("grokfast:lamb=0", seed)]["train_loss"]
        assert by[("baseline", seed)]["step"] == [0, 4, 8, 12]
        assert by[("grokfast", seed)]["train_loss"][0] == by[("baseline", seed)]["train_loss"][0]
        assert by[("grokfast", seed)]["train_loss"][1:] != by[("baseline", seed)]["train_loss"][1:]
    assert by[("baseline", 0)]["train_loss"] != by[("baseline", 1)]["train_loss"]
    assert [s["label"] for s in result.summary] == list(cfg.methods)


def test_tiny_race_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from grokopt.cli import main

    out = tmp_path / "race"
    rc = main(["race", "--task", "a+b", "--p", "11", "--model", "mlp", "--model-kw", "dim=8",
               "--model-kw", "hidden=16", "--methods", "baseline", "grokfast:lamb=3",
               "--steps", "8", "--eval-every", "4", "--batch-size", "16", "--seeds", "2",
               "--threshold", "0.5", "0.9", "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "steps to\n" not in printed and "50% val" in printed and "grokfast:lamb=3" in printed
    data = json.loads((out / "results.json").read_text())
    assert data["environment"]["torch"] == torch.__version__
    assert data["environment"]["device"] == "cpu"
    assert len(data["runs"]) == 4 and len(data["summary"]) == 2
    run = data["runs"][0]
    assert set(run["steps_to"]) == {"0.5", "0.9"} and run["curve"]["step"] == [0, 4, 8]
    assert run["seconds_per_step"] > 0
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 * 3 and {r["label"] for r in rows} == {"baseline", "grokfast:lamb=3"}
    assert (out / "race.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A second identical command finds the finished checkpoint and trains nothing more.
    assert main(["race", "--task", "a+b", "--p", "11", "--model", "mlp", "--model-kw", "dim=8",
                 "--model-kw", "hidden=16", "--methods", "baseline", "grokfast:lamb=3",
                 "--steps", "8", "--eval-every", "4", "--batch-size", "16", "--seeds", "2",
                 "--threshold", "0.5", "0.9", "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "results.json").read_text())["runs"][0]["curve"] == run["curve"]


def test_resume_after_sigint_equals_uninterrupted(tmp_path: Path) -> None:
    cfg = RaceConfig(**{**TINY, "steps": 20, "seeds": (0, 1)}, methods=("baseline", "grokfast"))
    whole = run_race(cfg, out_dir=tmp_path / "whole")
    assert not whole.interrupted

    calls = []

    def interrupt(info: dict) -> None:
        calls.append(info)
        if len(calls) == 3:  # mid-race: some runs ahead of others
            os.kill(os.getpid(), signal.SIGINT)

    part = run_race(cfg, out_dir=tmp_path / "part", callback=interrupt)
    assert part.interrupted and (tmp_path / "part" / "checkpoint.pt").exists()
    assert any(r["steps"] < 20 for r in part.runs)
    resumed = run_race(cfg, out_dir=tmp_path / "part")
    assert not resumed.interrupted
    assert _curves(resumed) == _curves(whole)
    for a, b in zip(resumed.runs, whole.runs):
        assert a["final_val_acc"] == b["final_val_acc"] and a["steps"] == b["steps"] == 20


def test_resume_refuses_a_different_race(tmp_path: Path) -> None:
    run_race(RaceConfig(**{**TINY, "steps": 4}, methods=("baseline",)), out_dir=tmp_path)
    with pytest.raises(RuntimeError, match="different race"):
        run_race(RaceConfig(**{**TINY, "steps": 8}, methods=("baseline",)), out_dir=tmp_path)
    fresh = run_race(RaceConfig(**{**TINY, "steps": 8}, methods=("baseline",)),
                     out_dir=tmp_path, resume=False)
    assert fresh.runs[0]["steps"] == 8


def test_thresholds_steps_and_stop_rule() -> None:
    # A tiny threshold is reached at the first evaluation, before any step.
    cfg = RaceConfig(**TINY, methods=("baseline",), thresholds=(0.01,))
    result = run_race(cfg)
    run = result.runs[0]
    assert run["steps_to"] == {"0.01": 0} and run["grokked"]
    assert run["steps"] == 0  # stops once the highest threshold is reached
    full = run_race(RaceConfig(**TINY, methods=("baseline",), thresholds=(0.01,),
                               stop_at_threshold=False))
    assert full.runs[0]["steps"] == 12


def test_summary_mean_spread_and_speedup() -> None:
    from grokopt.race import _summarise

    cfg = RaceConfig(**{**TINY, "seeds": (0, 1)}, methods=("baseline", "grokfast"),
                     thresholds=(0.95,))

    def rec(label, seed, steps):
        return {"label": label, "seed": seed, "weight_decay": 0.1, "lr": 1e-3,
                "steps_to": {"0.95": steps}, "seconds_to": {"0.95": steps and steps / 100},
                "grokked": steps is not None, "final_train_acc": 1.0, "final_val_acc": 0.9,
                "seconds_per_step": 0.01}

    rows = _summarise(cfg, [rec("baseline", 0, 1000), rec("baseline", 1, 3000),
                            rec("grokfast", 0, 500), rec("grokfast", 1, None)])
    base, fast = rows
    assert base["steps_to"]["0.95"] == {"mean": 2000, "std": pytest.approx(1414.2136), "n": 2}
    assert fast["grokked"] == 1 and fast["steps_to"]["0.95"]["n"] == 1
    assert fast["speedup_steps"] == 4.0 and base["speedup_steps"] == 1.0


def test_registered_custom_method_runs() -> None:
    def apply(ctx, parts, params):
        parts.optimizer = torch.optim.SGD(ctx.model.parameters(), lr=params["step_size"])

    register_method(Method("test-sgd", apply, defaults={"step_size": 0.5}))
    try:
        result = run_race(RaceConfig(**TINY, methods=("test-sgd:step_size=0.1", "baseline")))
        assert result.runs[0]["hyperparameters"] == {"test-sgd": {"step_size": 0.1}}
        assert result.runs[0]["curve"]["train_loss"] != result.runs[1]["curve"]["train_loss"]
    finally:
        del METHODS["test-sgd"]


def test_other_tasks_and_models_run() -> None:
    pytest.importorskip("sklearn")
    digits = run_race(RaceConfig(task="digits", p=None, model_kwargs={"hidden": (16,)}, seeds=(0,),
                                 methods=("baseline",), steps=2, eval_every=2, batch_size=64))
    assert digits.runs[0]["steps"] == 2
    trans = run_race(RaceConfig(task="a*c+b*d-e", p=7, model="transformer", split="neuralgrok",
                                model_kwargs={"dim": 16, "heads": 2, "layers": 1}, seeds=(0,),
                                methods=("baseline",), steps=2, eval_every=2, batch_size=64))
    assert trans.runs[0]["steps"] == 2


@pytest.mark.parametrize("arm", ["grokalign", "grokfast+grokalign", "neuralgrok:hidden=(8,)",
                                 "grokfast-ma:window=3"])
def test_each_method_trains(arm: str) -> None:
    name = arm.split(":")[0].split("+")[-1]
    reason = METHODS[name].unavailable()
    if reason:
        pytest.skip(reason)
    result = run_race(RaceConfig(**{**TINY, "steps": 8}, methods=("baseline", arm)))
    base, other = result.runs
    assert other["steps"] == 8
    assert other["curve"]["train_loss"][1:] != base["curve"]["train_loss"][1:]


def test_presets_are_valid_configs() -> None:
    for preset in PRESETS.values():
        for cfg in preset.configs:
            assert cfg.specs()  # every arm parses (methods available in this checkout)
    assert len(PRESETS["neuralgrok-table1"].configs) == 5
    mul = PRESETS["grokfast-mul"].configs[0]
    assert mul.published["baseline:wd=0"] == "39890"


def test_no_rich_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import sys

    from grokopt.cli import main

    monkeypatch.setitem(sys.modules, "rich.console", None)
    assert main(["race", "--steps", "1"]) == 1
    assert "pip install grokopt[race]" in capsys.readouterr().err


def test_python_dash_m_help() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "grokopt", "race", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--preset" in done.stdout


@pytest.mark.parametrize("arms", [("grokfast-ma:window=3", "grokalign"),
                                  ("neuralgrok:hidden=(8,),meta_every=2",
                                   "grokfast+grokalign")])
def test_resume_equals_uninterrupted_for_every_method(tmp_path: Path, arms) -> None:
    for arm in arms:
        name = arm.split(":")[0].split("+")[-1]
        if METHODS[name].unavailable():
            pytest.skip(METHODS[name].unavailable())
    cfg = RaceConfig(**{**TINY, "steps": 16}, methods=arms)
    whole = run_race(cfg, out_dir=tmp_path / "whole")
    calls = []

    def interrupt(info: dict) -> None:
        calls.append(info)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)

    assert run_race(cfg, out_dir=tmp_path / "part", callback=interrupt).interrupted
    resumed = run_race(cfg, out_dir=tmp_path / "part")
    assert _curves(resumed) == _curves(whole)


def test_matched_baselines_added() -> None:
    from grokopt.race import with_matched_baselines

    cfg = RaceConfig(**TINY, methods=("baseline", "grokfast:wd=0.005", "grokfast-ma:wd=0.1"))
    # TINY's weight decay is 0.1, so only 0.005 lacks a baseline.
    assert with_matched_baselines(cfg).methods[-1] == "baseline:wd=0.005"
    assert len(with_matched_baselines(cfg).methods) == 4


def test_diagnostics_curves(tmp_path: Path) -> None:
    result = run_race(RaceConfig(**{**TINY, "steps": 4}, methods=("baseline",), diagnostics=True),
                      out_dir=tmp_path)
    curve = result.runs[0]["curve"]
    assert len(curve["centroid_alignment"]) == len(curve["age"]) == len(curve["step"]) == 2
    assert all(-1 <= a <= 1 for a in curve["centroid_alignment"]) and curve["age"][0] > 0
    assert (tmp_path / "race.png").exists()


@pytest.mark.slow
def test_default_race_shows_grokking_and_a_speedup() -> None:
    result = run_race(RaceConfig())
    runs = {r["label"]: r for r in result.runs}
    base = runs["baseline"]
    train99 = next(s for s, a in zip(base["curve"]["step"], base["curve"]["train_acc"]) if a >= 0.99)
    # Grokking: the training set is memorised long before validation accuracy rises.
    assert base["steps_to"]["0.95"] is not None and base["steps_to"]["0.95"] > 1.5 * train99
    others = [r for label, r in runs.items() if label != "baseline"]
    assert all(r["steps_to"]["0.95"] is not None for r in others)
    assert min(r["steps_to"]["0.95"] for r in others) < base["steps_to"]["0.95"]
