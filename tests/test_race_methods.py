"""grokopt/race/methods.py and specs.py: the one method registry, shared by the race,
``grokopt bench`` and docs/race.md's method table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from grokopt.bench import bench
from grokopt.race import METHODS, parse_run_spec
from grokopt.race.methods import BASELINE, penalty_route
from grokopt.tasks import DecoderTransformer, EmbeddingMLP, OmnigrokMLP

DOC = Path(__file__).resolve().parents[1] / "docs" / "race.md"


def _doc_table_methods() -> list[str]:
    text = DOC.read_text()
    section = text.split("## Methods", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([a-z0-9_-]+)` \|", section, flags=re.M)


def test_the_docs_method_table_lists_exactly_the_registry() -> None:
    listed = _doc_table_methods()
    assert len(listed) == len(set(listed)), "a method is listed twice"
    assert sorted(listed) == sorted(METHODS)


def test_the_docs_table_shows_each_methods_defaults() -> None:
    section = DOC.read_text().split("## Methods", 1)[1].split("\n## ", 1)[0]
    rows = {m: line for line in section.splitlines()
            for m in re.findall(r"^\| `([a-z0-9_-]+)` \|", line)}
    for name, method in METHODS.items():
        for key, value in method.defaults.items():
            assert f"`{key}={value!r}`" in rows[name], (name, key)


def test_the_bare_arm_is_baseline_and_stands_alone() -> None:
    assert BASELINE == "baseline" and BASELINE in METHODS
    with pytest.raises(ValueError, match="^methods: 'baseline' .* cannot be combined"):
        parse_run_spec("baseline+grokfast")
    assert parse_run_spec("baseline:wd=0").components == ("baseline",)


@pytest.mark.parametrize("text", ["grokfast+grokfast-ma", "grokfast-ma+grokfast",
                                  "grokfast+grokfast-ma:grokfast.lamb=1"])
def test_two_filters_of_one_gradient_are_refused_both_ways(text: str) -> None:
    with pytest.raises(ValueError, match="exclude each other"):
        parse_run_spec(text)


@pytest.mark.parametrize("name", ["bogus", "plain"])
def test_an_unknown_method_names_every_allowed_one(name: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_run_spec(name)
    message = str(info.value)
    assert message.startswith(f"methods: unknown method {name!r}")
    assert message.endswith("allowed: " + ", ".join(sorted(METHODS)))


def test_one_penalty_route_for_every_reference_model() -> None:
    x_tokens = torch.randint(0, 7, (3, 4))
    for model in (EmbeddingMLP(vocab_size=7, seq_len=4, num_classes=7),
                  DecoderTransformer(vocab_size=7, num_classes=7, dim=16, heads=2, layers=1)):
        route = penalty_route(model)
        assert route.name == "embeddings"
        torch.testing.assert_close(route.logits(route.prepare(x_tokens)), model(x_tokens))
    mlp = OmnigrokMLP(12, (8,), 3)
    x = torch.randn(5, 3, 4)  # an image-shaped batch: the route flattens it as forward does
    route = penalty_route(mlp)
    assert route.name == "input" and route.logits is mlp.net
    torch.testing.assert_close(route.logits(route.prepare(x)), mlp(x))
    plain = torch.nn.Linear(4, 2)
    route = penalty_route(plain)
    assert route.name == "input" and route.logits is plain


def test_bench_measures_every_registered_method() -> None:
    # Every method of the registry runs in `grokopt bench`, none of them is a special case.
    # An embedding model: Muon has hidden matrices, GrokAlign differentiates w.r.t. the
    # embeddings, the integer targets let StableMax replace cross-entropy.
    def tokens(batch_size: int, gen: torch.Generator):
        return (torch.randint(0, 7, (batch_size, 3), generator=gen),
                torch.randint(0, 7, (batch_size,), generator=gen))

    names = [n for n, m in METHODS.items() if not m.unavailable()]  # Muon: torch >= 2.9
    res = bench(lambda: EmbeddingMLP(vocab_size=7, seq_len=3, num_classes=7, dim=4, hidden=8),
                make_batch=tokens, methods=tuple(names), repeats=1, steps=4, warmup=0,
                memory=False, batch_size=8, outer_batch_size=4)
    assert [m.method for m in res.methods] == names
    for m in res.methods:
        assert m.not_applicable is None, (m.method, m.not_applicable)
        assert len(m.seconds_per_step) == 1 and m.seconds_per_step[0] > 0
