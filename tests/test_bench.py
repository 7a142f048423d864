"""grokopt.bench: structure of the results, ratios from the recorded times, JSON, bad arguments.

No timing assertions: the numbers themselves are the benchmark's business, not a test's.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch import nn

from grokopt.bench import BUILTIN_MODELS, BenchResult, bench
from grokopt.cli import add_bench_arguments, run_bench as run_from_args

TINY = dict(model="grokopt.tasks.models:OmnigrokMLP",
            model_kwargs=dict(in_dim=6, hidden=(8,), num_classes=3), input_shape=(6,),
            batch_size=8, outer_batch_size=4, repeats=2, warmup=1)


def tiny_batch(batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch_size, 6, generator=gen), torch.randn(batch_size, 3, generator=gen)


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> tuple[BenchResult, dict]:
    out = tmp_path_factory.mktemp("bench") / "sub" / "b.json"
    res = bench(**TINY, methods=("grokfast", "neuralgrok", "grokalign", "grokfast+grokalign"),
                steps=4, memory=True, out=out)
    return res, json.loads(out.read_text())


def test_baseline_is_added_first_and_every_method_is_measured(result):
    res, _ = result
    assert [m.method for m in res.methods] == [
        "baseline", "grokfast", "neuralgrok", "grokalign", "grokfast+grokalign"]
    for m in res.methods:
        assert len(m.seconds_per_step) == 2 and all(t > 0 for t in m.seconds_per_step)
        assert m.q1_s <= m.median_s <= m.q3_s and m.iqr_s == pytest.approx(m.q3_s - m.q1_s)
        assert m.peak_bytes is not None and m.peak_bytes >= m.retained_bytes > 0


def test_ratios_are_computed_from_the_recorded_times(result):
    _, data = result
    rows = {m["method"]: m for m in data["methods"]}

    def median(xs):
        xs = sorted(xs)
        return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2

    plain = rows["baseline"]
    for m in rows.values():
        assert m["median_s"] == pytest.approx(median(m["seconds_per_step"]))
        assert m["time_ratio"] == pytest.approx(m["median_s"] / plain["median_s"])
        assert m["memory_ratio"] == pytest.approx(m["peak_bytes"] / plain["peak_bytes"])
    assert plain["time_ratio"] == 1.0


def test_memory_counts_the_method_state(result):
    res, _ = result
    # One EMA tensor per parameter, and on CPU the steady step's output scratch (kept
    # between steps, see Grokfast's restore_grad): twice the parameters' bytes, retained.
    n_params = res.config["parameters"]
    extra = res["grokfast"].retained_bytes - res["baseline"].retained_bytes
    assert extra == 2 * 4 * n_params


def test_json_holds_config_and_environment(result):
    res, data = result
    assert data["format_version"] == 1 and data["device"] == "cpu"
    env = data["environment"]
    for key in ("torch", "python", "cpu", "cpu_count", "torch_threads", "platform"):
        assert env[key] not in (None, "")
    assert data["config"]["parameters"] == 6 * 8 + 8 * 3
    assert "profiler" in data["memory_method"]
    assert res.path is not None and res.path.endswith("b.json")
    text = res.format_table()
    assert "grokfast+grokalign" in text and "x" in text


def test_rich_table_when_rich_is_there(result):
    pytest.importorskip("rich")
    table = result[0].rich_table()
    assert table.row_count == 5


def test_make_batch_callable_with_float_targets_trains_with_mse():
    res = bench(lambda: nn.Linear(6, 3), make_batch=tiny_batch, batch_size=4, repeats=1,
                steps=1, warmup=0, memory=False, methods=("grokfast",))
    assert [m.method for m in res.methods] == ["baseline", "grokfast"]


def test_threads_are_restored():
    before = torch.get_num_threads()
    bench(**{**TINY, "repeats": 1}, steps=1, methods=("baseline",), memory=False, threads=1)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("kwargs, arg", [
    (dict(device="tpu"), "device"),
    (dict(methods=("grokfast", "adam")), "methods"),
    (dict(methods=("grokfast+grokfast-ma",)), "methods"),
    (dict(methods=("baseline+grokfast",)), "methods"),
    (dict(methods=("grokfast", "grokfast")), "methods"),
    (dict(methods="grokfast"), "methods"),
    (dict(repeats=0), "repeats"),
    (dict(steps=0), "steps"),
    (dict(steps=6, methods=("neuralgrok",)), "steps"),
    (dict(warmup=-1), "warmup"),
    (dict(threads=0), "threads"),
    (dict(batch_size=0), "batch_size"),
    (dict(model="no_such_model"), "model"),
    (dict(model="no_such_module_xyz:make"), "model"),
    (dict(model="grokopt.tasks.models:Nope"), "model"),
    (dict(input_shape=None), "input_shape"),
    (dict(input_shape=(0,)), "input_shape"),
])
def test_bad_arguments_name_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=rf"^{arg}"):
        bench(**{**TINY, **kwargs})


def test_builtin_models_reject_shapes_and_kwargs():
    with pytest.raises(ValueError, match="^model_kwargs"):
        bench("decoder", model_kwargs={"dim": 8})
    with pytest.raises(ValueError, match="^input_shape"):
        bench("decoder", input_shape=(4,))


def test_cuda_without_cuda_is_rejected():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="^device"):
        bench(**TINY, device="cuda")


def _tokens(batch_size, gen):
    return (torch.randint(0, 5, (batch_size, 3), generator=gen),
            torch.randint(0, 5, (batch_size,), generator=gen))


def _token_model():
    return nn.Sequential(nn.Embedding(5, 4), nn.Flatten(), nn.Linear(12, 5))


def _batchnorm_model():
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("factory,kw,why", [
    (_token_model, dict(make_batch=_tokens), "takes integer inputs"),
    (_batchnorm_model, dict(input_shape=(6,)), "BatchNorm1d"),
])
@pytest.mark.parametrize("memory", [False, True])
def test_a_method_that_cannot_apply_is_a_row_with_its_reason(factory, kw, why, memory, tmp_path):
    out = tmp_path / "b.json"
    res = bench(factory, **kw, methods=("grokalign", "grokfast", "grokfast+grokalign"),
                repeats=2, steps=4, warmup=1, memory=memory, out=out)
    assert [m.method for m in res.methods] == ["baseline", "grokalign", "grokfast",
                                               "grokfast+grokalign"]
    for label in ("grokalign", "grokfast+grokalign"):
        row = res[label]
        assert why in row.not_applicable and row.seconds_per_step == []
        assert row.peak_bytes is None and row.memory_ratio is None
    # The rest is measured as if the inapplicable method had not been asked for.
    for label in ("baseline", "grokfast"):
        row = res[label]
        assert row.not_applicable is None and len(row.seconds_per_step) == 2
        assert row.time_ratio == pytest.approx(row.median_s / res["baseline"].median_s)
        assert (row.peak_bytes is not None) == memory
    data = json.loads(out.read_text())  # strict JSON: no NaN for the missing numbers
    rows = {m["method"]: m for m in data["methods"]}
    assert rows["grokalign"]["median_s"] is None and rows["grokalign"]["time_ratio"] is None
    assert why in rows["grokalign"]["not_applicable"]
    json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    text = res.format_table()
    [row_line] = [line for line in text.splitlines() if line.startswith("grokalign ")]
    assert "not applicable" in row_line and "grokalign: not applicable: " in text


def test_a_model_whose_baseline_step_fails_is_refused_naming_the_model():
    def broken():
        return nn.Linear(5, 3)  # input_shape says 6 features

    with pytest.raises(ValueError, match=r"^model: the baseline training step of .* failed"):
        bench(broken, make_batch=tiny_batch, repeats=1, steps=1, memory=False,
              methods=("grokfast",))


def test_command_line_imports_a_model_from_the_current_folder(tmp_path, monkeypatch, capsys):
    # What the `grokopt` console script sees: its own folder first on sys.path, not the
    # caller's. The model's module sits in the folder the command is run from.
    import sys

    from grokopt.cli import main

    (tmp_path / "grokopt_test_cwd_model.py").write_text(
        "from torch import nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "grokopt_test_cwd_model", raising=False)
    try:
        rc = main(["bench", "--model", "grokopt_test_cwd_model:make", "--input-shape", "6",
                   "--methods", "grokfast", "--repeats", "1", "--steps", "1", "--warmup", "0",
                   "--no-memory", "--out", "b.json"])
    finally:
        sys.modules.pop("grokopt_test_cwd_model", None)
    assert rc == 0
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["config"]["parameters"] == 6 * 8 + 8 + 8 * 3 + 3
    assert [m["method"] for m in data["methods"]] == ["baseline", "grokfast"]


def test_builtin_models_build():
    assert set(BUILTIN_MODELS) >= {"decoder", "omnigrok-mlp", "embedding-mlp"}
    assert sum(p.numel() for p in BUILTIN_MODELS["decoder"].factory().parameters()) == 422_784


def test_command_line_round_trip(tmp_path, capsys):
    parser = add_bench_arguments(argparse.ArgumentParser())
    out = tmp_path / "cli.json"
    args = parser.parse_args([
        "--model", TINY["model"], "--model-kw", "in_dim=6", "--model-kw", "hidden=(8,)",
        "--model-kw", "num_classes=3", "--input-shape", "6", "--batch-size", "8",
        "--methods", "grokfast", "--repeats", "1", "--steps", "1", "--warmup", "0",
        "--no-memory", "--out", str(out)])
    assert run_from_args(args) == 0
    assert json.loads(out.read_text())["config"]["methods"] == ["baseline", "grokfast"]
    assert "wrote" in capsys.readouterr().out


def test_command_line_error_names_the_argument(capsys):
    parser = add_bench_arguments(argparse.ArgumentParser())
    assert run_from_args(parser.parse_args(["--methods", "bogus", "--no-memory"])) == 2
    # The one registry's names, every one of them (the race's and bench's are the same).
    from grokopt.race import METHODS

    assert capsys.readouterr().err.startswith(
        "error: argument --methods: unknown method 'bogus' in 'bogus'; allowed: "
        + ", ".join(sorted(METHODS)) + "\n")
    assert {"orthograd", "stablemax", "egd", "muon"} <= set(METHODS)


@pytest.mark.parametrize("argv,flag", [
    (["--methods", "bogus"], "--methods"),
    (["--repeats", "0"], "--repeats"),
    (["--model", "no_such_module_xyz:make"], "--model"),
    (["--model", "grokopt.tasks.models:OmnigrokMLP"], "--input-shape/--make-batch"),
    (["--device", "tpu"], "--device"),
])
def test_grokopt_bench_bad_argument_is_one_error_line(argv, flag, capsys):
    from grokopt.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--no-memory", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [x for x in err.splitlines() if "error:" in x]
    assert line.startswith(f"grokopt bench: error: argument {flag}: ")


def test_list_models(capsys):
    parser = add_bench_arguments(argparse.ArgumentParser())
    assert run_from_args(parser.parse_args(["--list-models"])) == 0
    assert "decoder" in capsys.readouterr().out
