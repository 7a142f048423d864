"""The leaderboard: rows computed by hand from synthetic races, and the command line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from grokopt.race.leaderboard import leaderboard_rows, load_results, write_leaderboard


def _run(label, seed, s95, s99, secs_per_step=0.01, val=1.0):
    return {"label": label, "seed": seed,
            "steps_to": {"0.95": s95, "0.99": s99},
            "seconds_to": {"0.95": None if s95 is None else s95 * secs_per_step,
                           "0.99": None if s99 is None else s99 * secs_per_step},
            "final_val_acc": val,
            "curve": {"step": [0, 10, 20], "val_acc": [0.0, 0.5, val]}}


def _race(name, runs, thresholds=(0.95, 0.99), task="a*b", p=97):
    return {"config": {"name": name, "task": task, "p": p, "thresholds": list(thresholds)},
            "environment": {"device": "cpu"}, "runs": runs}


RACE = _race("lb", [
    _run("baseline", 0, 1000, 1200), _run("baseline", 1, 3000, 3200),
    _run("fast", 0, 500, 600, secs_per_step=0.04), _run("fast", 1, 1500, 1700, secs_per_step=0.04),
    _run("stuck", 0, 800, None), _run("stuck", 1, None, None, val=0.3),
])


def test_rows_by_hand():
    rows = {r["arm"]: r for r in leaderboard_rows([RACE])}
    assert list(rows) == ["baseline", "fast", "stuck"]
    base, fast, stuck = rows["baseline"], rows["fast"], rows["stuck"]
    assert base["steps_to"]["0.95"] == {"mean": 2000.0, "std": pytest.approx(1414.2135623), "n": 2}
    # Speedup in steps: 2000 / 1000; in seconds: 20 s / 40 s (4x the cost per step).
    assert fast["speedup_steps"] == pytest.approx(2.0)
    assert fast["speedup_seconds"] == pytest.approx(0.5)
    # One seed never reached 95%: no speedup, one of two grokked, the mean over the one.
    assert stuck["grokked"] == 1 and stuck["speedup_steps"] is None
    assert stuck["steps_to"]["0.95"] == {"mean": 800.0, "std": 0.0, "n": 1}
    assert stuck["steps_to"]["0.99"] is None
    assert stuck["final_val_acc"]["mean"] == pytest.approx(0.65)


def test_a_race_without_baseline_has_no_speedups():
    rows = leaderboard_rows([_race("x", [_run("fast", 0, 10, 20)])])
    assert rows[0]["speedup_steps"] is None and rows[0]["speedup_seconds"] is None


def test_files_hold_every_task_and_the_union_of_thresholds(tmp_path):
    mnist = _race("m", [_run("baseline", 0, 100, 100)], thresholds=(0.85,), task="mnist", p=None)
    for run in mnist["runs"]:
        run["steps_to"] = {"0.85": 100}
        run["seconds_to"] = {"0.85": 1.0}
    files = write_leaderboard([RACE, mnist], tmp_path)
    rows = list(csv.DictReader(open(files["csv"])))
    assert [(r["task"], r["arm"]) for r in rows] == [
        ("a*b mod 97", "baseline"), ("a*b mod 97", "fast"), ("a*b mod 97", "stuck"),
        ("mnist", "baseline")]
    assert rows[2]["steps to 95%"] == "800 (1/2)" and rows[2]["steps to 99%"] == "did not grok"
    assert rows[1]["speedup steps / seconds"] == "2.00x / 0.50x"
    assert rows[3]["steps to 85%"] == "100" and rows[3]["steps to 95%"] == ""
    saved = json.loads(Path(files["json"]).read_text())
    assert len(saved["rows"]) == 4 and saved["races"][1]["config"]["task"] == "mnist"
    assert Path(files["png"]).stat().st_size > 10_000


def test_command_line(tmp_path, capsys):
    from grokopt.cli import main

    (tmp_path / "race").mkdir()
    (tmp_path / "race" / "results.json").write_text(json.dumps(RACE))
    assert main(["leaderboard", str(tmp_path / "race"), "--out", str(tmp_path / "lb")]) == 0
    assert (tmp_path / "lb" / "leaderboard.csv").exists()
    assert "2.00x / 0.50x" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["leaderboard", str(tmp_path / "nothing")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument RESULTS: results: no race results at" in err and "Traceback" not in err


def test_load_results_reads_a_file_or_its_folder(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(RACE))
    assert load_results([tmp_path])[0] == load_results([tmp_path / "results.json"])[0] == RACE


def test_a_preset_of_several_tasks_writes_a_leaderboard(tmp_path, monkeypatch):
    from grokopt.cli import main
    from grokopt.race import PRESETS, Preset, RaceConfig

    tiny = dict(p=11, model="mlp", model_kwargs={"dim": 8, "hidden": 16}, batch_size=16,
                steps=4, eval_every=2, seeds=(0,), methods=("baseline", "grokfast"))
    preset = Preset("two-tasks", "test", (RaceConfig(name="t-add", task="a+b", **tiny),
                                          RaceConfig(name="t-mul", task="a*b", **tiny)))
    monkeypatch.setitem(PRESETS, "two-tasks", preset)
    assert main(["race", "--preset", "two-tasks", "--out", str(tmp_path), "--no-progress"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "leaderboard.csv")))
    assert [(r["task"], r["arm"]) for r in rows] == [
        ("a+b mod 11", "baseline"), ("a+b mod 11", "grokfast"),
        ("a*b mod 11", "baseline"), ("a*b mod 11", "grokfast")]
    assert (tmp_path / "t-add" / "results.json").exists()


def test_the_readme_leaderboards_are_the_recorded_ones() -> None:
    # Every figure of the README's two leaderboard tables must be what the committed
    # leaderboard files hold, at the precision the README prints it.
    import json
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    section = text[text.index("## Which method groks fastest?"):text.index("Which to pick")]
    tables = re.findall(r"((?:^\|.*\|\n)+)", section, flags=re.M)
    assert len(tables) == 2
    recorded = [json.loads((root / f"benchmarks/results/race/{name}.json").read_text())["rows"]
                for name in ("leaderboard", "leaderboard-tuned")]

    def resolve(by: dict, task: str, arm: str) -> dict:
        """The row of ``arm`` on ``task``: its own label, or the label that adds only its
        tuned learning rates (``orthograd:lr=1e-3`` for `orthograd` in the tuned table)."""
        if (task, arm) in by:
            return by[(task, arm)]
        found = [r for (t, label), r in by.items() if t == task and label.startswith(arm + ":")
                 and {kv.split("=")[0] for kv in label[len(arm) + 1:].split(",")} <= {"lr", "muon_lr"}]
        assert len(found) == 1, (task, arm)
        return found[0]

    def close(shown: str, value: float) -> bool:
        decimals = len(shown.split(".")[1]) if "." in shown else 0
        return abs(float(shown.replace(",", "")) - value) <= 0.5 * 10 ** -decimals + 1e-9

    checked = 0
    for table, rows in zip(tables, recorded):
        lines = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()]
        tasks = [c.replace("\\", "") for c in lines[0][1:]]
        by = {(r["task"], r["arm"]): r for r in rows}
        for cells in lines[2:]:
            arms = re.findall(r"`([^`]+)`", cells[0])
            for task, cell in zip(tasks, cells[1:]):
                task = {"MNIST": "mnist"}.get(task, task.replace("−", "-"))
                found = [resolve(by, task, a) for a in arms]
                pairs = re.findall(r"([\d.]+)× / ([\d.]+)×", cell)
                if pairs:
                    assert len(pairs) == len(found), (task, cells[0])
                    for (st, se), row in zip(pairs, found):
                        assert close(st, row["speedup_steps"]), (task, row["arm"], st)
                        assert close(se, row["speedup_seconds"]), (task, row["arm"], se)
                        checked += 1
                elif "grok" not in cell:  # the baseline: steps ± sd, seconds
                    mean, sd, secs = re.findall(r"\d[\d,]*(?:\.\d+)?", cell)[:3]
                    stat = next(iter(found[0]["steps_to"].values()))
                    seconds = next(iter(found[0]["seconds_to"].values()))
                    assert close(mean, stat["mean"]) and close(sd, stat["std"]), (task, cell)
                    assert close(secs, seconds["mean"]), (task, cell)
                    checked += 1
                else:
                    m = re.search(r"(\d) of 3 seeds grokked", cell)
                    assert "did not grok" in cell or m, (task, cell)
                    for row in found:
                        assert row["grokked"] == (int(m.group(1)) if m else 0), (task, row["arm"])
                        checked += 1
    assert checked >= 70
