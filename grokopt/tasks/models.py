"""Reference models of the grokking papers, as plain ``nn.Module`` s users can import."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["DecoderTransformer", "OmnigrokMLP", "EmbeddingMLP"]


BLOCKS = ("reference", "pre-ln")


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int, kind: str) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )
        self.kind = kind

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        a = self.ln1(h)
        # "reference": the attention's residual adds to the normalised stream, as in both
        # papers' code; "pre-ln": to the stream itself, the usual pre-LayerNorm block.
        h = (a if self.kind == "reference" else h) + self.attn(
            a, a, a, attn_mask=mask, need_weights=False)[0]
        return h + self.mlp(self.ln2(h))


class DecoderTransformer(nn.Module):
    """The decoder-only transformer of the Grokfast and NeuralGrok modular-arithmetic runs.

    Token and learned position embeddings, ``layers`` blocks (causal multi-head attention,
    GELU MLP ``mlp_ratio`` x wide, a LayerNorm before each), a final LayerNorm and a
    bias-free output head; logits are read at the last position. With the defaults at
    ``vocab_size=99`` (p = 97) it has exactly 422,784 parameters.

    ``block="reference"`` (the default) is the block of both papers' code: the stream is
    replaced by its LayerNorm before the attention's residual is added,
    ``h = LN1(h); h = h + Attn(h); h = h + MLP(LN2(h))``. ``block="pre-ln"`` is the usual
    pre-LayerNorm block, ``h = h + Attn(LN1(h)); h = h + MLP(LN2(h))`` (the same
    parameters; grokopt 0.2's decoder, with which the NeuralGrok races recorded in 0.2 ran).

    :meth:`forward_embeddings` maps token embeddings to logits, so a Jacobian w.r.t. the
    embeddings (GrokAlign) can be taken.

    Example:
        >>> model = DecoderTransformer(vocab_size=99, num_classes=99)
        >>> sum(p.numel() for p in model.parameters())
        422784
        >>> model(torch.tensor([[3, 97, 5, 98]])).shape
        torch.Size([1, 99])
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int | None = None,
        *,
        dim: int = 128,
        heads: int = 4,
        layers: int = 2,
        max_len: int = 5,
        mlp_ratio: int = 4,
        block: str = "reference",
    ) -> None:
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"block: expected one of {', '.join(map(repr, BLOCKS))}, got {block!r}")
        for name, value in (("vocab_size", vocab_size), ("dim", dim), ("heads", heads),
                            ("layers", layers), ("max_len", max_len), ("mlp_ratio", mlp_ratio)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if dim % heads:
            raise ValueError(f"heads: must divide dim={dim}, got {heads}")
        self.num_classes = vocab_size if num_classes is None else int(num_classes)
        self.max_len = max_len
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp_ratio, block) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, self.num_classes, bias=False)

    def embed(self, tokens: Tensor) -> Tensor:
        """Token embeddings (B, T, dim) of int tokens (B, T), without position embeddings."""
        return self.tok(tokens)

    def forward_embeddings(self, emb: Tensor) -> Tensor:
        """Logits (B, num_classes) at the last position from token embeddings (B, T, dim)."""
        t = emb.shape[1]
        if t > self.max_len:
            raise ValueError(f"emb: sequence length {t} exceeds max_len={self.max_len}")
        h = emb + self.pos.weight[:t]
        # Boolean upper-triangular mask: True blocks attention to later positions.
        mask = torch.ones(t, t, dtype=torch.bool, device=emb.device).triu(1)
        for block in self.blocks:
            h = block(h, mask)
        return self.head(self.ln_f(h[:, -1]))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.forward_embeddings(self.embed(tokens))


class OmnigrokMLP(nn.Module):
    """Bias-free ReLU MLP with every weight scaled by ``init_scale`` after default init.

    A large init scale is the Omnigrok recipe that makes a network memorise first and
    generalise (grok) much later. The GrokAlign MNIST setup is
    ``OmnigrokMLP(784, (196, 196, 196), 10, init_scale=8.0)``.

    Example:
        >>> net = OmnigrokMLP(64, (196, 196, 196), 10, init_scale=8.0)
        >>> net(torch.zeros(2, 64)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int] = (196, 196, 196),
        num_classes: int = 10,
        *,
        init_scale: float = 8.0,
    ) -> None:
        super().__init__()
        if not init_scale > 0:
            raise ValueError(f"init_scale must be a positive float, got {init_scale!r}")
        widths = [int(in_dim), *map(int, hidden), int(num_classes)]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b, bias=False))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)
        self.num_classes = int(num_classes)
        with torch.no_grad():
            for p in self.parameters():
                p.mul_(init_scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))


class EmbeddingMLP(nn.Module):
    """Small MLP on concatenated token embeddings: a cheap model for modular arithmetic.

    :meth:`forward_embeddings` maps token embeddings (B, T, dim) to logits, like
    :class:`DecoderTransformer`.

    Example:
        >>> net = EmbeddingMLP(vocab_size=25, seq_len=4, num_classes=23)
        >>> net(torch.tensor([[1, 23, 2, 24]])).shape
        torch.Size([1, 23])
    """

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        num_classes: int,
        *,
        dim: int = 128,
        hidden: int = 256,
    ) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.tok = nn.Embedding(vocab_size, dim)
        self.mlp = nn.Sequential(
            nn.Linear(seq_len * dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def embed(self, tokens: Tensor) -> Tensor:
        return self.tok(tokens)

    def forward_embeddings(self, emb: Tensor) -> Tensor:
        return self.mlp(emb.flatten(1))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.forward_embeddings(self.embed(tokens))
