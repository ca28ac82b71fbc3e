"""Tokenizers: a weight row (B, P) <-> tokens (B, T, dim) for the DiT, driven by the store's layout.

    tok = make_tokenizer("layer", layout, dim=256)      # or chunk / lora_hier / latent, **options
    tokens = tok.encode(rows)                           # (B, P) -> (B, tok.n_tokens, dim), learned
    rows = tok.decode(tokens)                           # (B, T, dim) -> (B, P), the learned mirror
    pieces = tok.split(rows) ; rows = tok.merge(pieces) # the exact structure, no learned parts

Registered types (TOKENIZERS):
    layer      HyperDiffusion's: one token per layer (entries sharing the name prefix before the last
               '.', concatenated in layout order: weight then bias), a layer longer than chunk_size cut
               into several tokens, the last zero-padded; a Linear per token position in and out. Any
               layout (mlp, mlp asym, fourier, lora / mlora, latents).
    chunk      the whole row cut into equal chunks of chunk_size (last zero-padded); one shared Linear in
               and out. Any layout.
    lora_hier  the LoRA paper's hierarchical layer encoder (Sec. 3.5): per layer, the r rank pairs
               (a_i, b_i) are r tokens (Linear + sinusoidal rank encoding), go through a transformer
               block (attention among them), are mean-pooled to one layer token (+ learned layer
               encoding): T = number of layers. LoRA layouts only (`<layer>.a<i>` / `<layer>.b<i>`).
    latent     DeepSDF latents: a single 1-D entry cut into tokens of token_size (default 16: a 64-d
               latent is 4 tokens); shared Linear in and out.

chunk_size (layer, chunk) defaults to dim: each token's Linear is then square, so the tokenizer is no
bottleneck (a token of more than dim values passes through dim numbers, and a denoiser predicting the
noise, which is full rank, could not reproduce it). HyperDiffusion's own tokens (16,512 values into 2,880)
are lossy this way; ask for that with chunk_size. lora_hier can be lossless only when dim >= r (d_in + d_out).

Rows are standardised per parameter (store/standardize.py, fitted streaming over the store) before tokenizing.
Nothing mixes rows: token b depends on row b only (Linear, LayerNorm and attention act within a row).
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from raywsl.store.layout import Layout

log = logging.getLogger(__name__)


class TokenizerError(ValueError):
    """An unknown tokenizer or option, a layout a tokenizer cannot read, or rows / tokens of the wrong shape."""


def layer_of(name: str) -> str:
    """The layer an entry belongs to: its name up to the last '.' (l0.weight -> l0; latent -> latent)."""
    return name.rsplit(".", 1)[0]


def layer_positions(layout: Layout) -> dict[str, Tensor]:
    """{layer: (n,) int64 positions in the row of its values}, layers in order of first appearance,
    each layer's entries in layout order (entries of a layer need not be adjacent)."""
    groups: dict[str, list[Tensor]] = {}
    start = 0
    for (name, _), size in zip(layout.entries, layout.sizes):
        groups.setdefault(layer_of(name), []).append(torch.arange(start, start + size))
        start += size
    return {layer: torch.cat(parts) for layer, parts in groups.items()}


def sinusoidal(n: int, dim: int) -> Tensor:
    """(n, dim) fixed sin / cos encodings of positions 0..n-1 (Transformer's)."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    freqs = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    pe = torch.zeros(n, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * freqs)
    pe[:, 1::2] = torch.cos(pos * freqs)[:, : dim // 2]
    return pe.float()


class Tokenizer(nn.Module):
    """Base: rows (B, P) of `layout` <-> tokens (B, n_tokens, dim). A subclass sets `name` (by
    @register), OPTIONS ({option: meaning}) and n_tokens, and implements split / merge (exact, no
    parameters) and encode / decode (learned). Parameters follow the module's device and dtype (.to)."""

    name: ClassVar[str] = ""
    OPTIONS: ClassVar[dict[str, str]] = {}
    n_tokens: int

    def __init__(self, layout: Layout, dim: int):
        super().__init__()
        if not isinstance(layout, Layout) or not layout.entries:
            raise TokenizerError(f"tokenizer {self.name!r}: needs a non-empty Layout, got {layout!r}")
        if not isinstance(dim, int) or dim < 1:
            raise TokenizerError(f"tokenizer {self.name!r}: dim must be a positive integer, got {dim!r}")
        self.layout, self.dim, self.n_params = layout, dim, layout.size

    def _rows(self, rows: Tensor) -> Tensor:
        if rows.dim() != 2 or rows.shape[1] != self.n_params:
            raise TokenizerError(f"tokenizer {self.name!r}: rows must be (B, {self.n_params}), got {tuple(rows.shape)}")
        return rows

    def _tokens(self, tokens: Tensor) -> Tensor:
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != (self.n_tokens, self.dim):
            raise TokenizerError(f"tokenizer {self.name!r}: tokens must be (B, {self.n_tokens}, {self.dim}), "
                                 f"got {tuple(tokens.shape)}")
        return tokens

    def split(self, rows: Tensor) -> Tensor | list[Tensor]:
        raise NotImplementedError

    def merge(self, pieces: Any) -> Tensor:
        raise NotImplementedError

    def encode(self, rows: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, tokens: Tensor) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.name}: P={self.n_params}, T={self.n_tokens}, dim={self.dim}"


TOKENIZERS: dict[str, type[Tokenizer]] = {}


def register(name: str):
    def add(cls: type[Tokenizer]) -> type[Tokenizer]:
        cls.name = name
        TOKENIZERS[name] = cls
        return cls
    return add


def make_tokenizer(name: str, layout: Layout, dim: int, **options: Any) -> Tokenizer:
    """The tokenizer `name` over rows of `layout`, tokens of width dim. A 0 / None option means its default."""
    if name not in TOKENIZERS:
        raise TokenizerError(f"unknown tokenizer {name!r}; known: {sorted(TOKENIZERS)}")
    cls = TOKENIZERS[name]
    options = {k: v for k, v in options.items() if v is not None and not (isinstance(v, int) and v == 0)}
    unknown = sorted(set(options) - set(cls.OPTIONS))
    if unknown:
        known = ", ".join(f"{k} ({v})" for k, v in cls.OPTIONS.items()) or "none"
        raise TokenizerError(f"tokenizer {name!r}: unknown option(s) {unknown}; its options: {known}")
    return cls(layout, dim, **options)


def _size_option(tokenizer: str, option: str, value: Any, default: int) -> int:
    if value is None or value == 0:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise TokenizerError(f"tokenizer {tokenizer!r}: {option} must be a positive integer, got {value!r}")
    return int(value)


class _Padded(Tokenizer):
    """Tokens that are slices of the row: token t holds the row values at given positions, zero-padded
    to the widest token W. split / merge are pure indexing, so merge(split(r)) == r bit for bit."""

    def _set_tokens(self, groups: Sequence[Tensor], size: int) -> None:
        """Cut each group of row positions into tokens of at most `size` values."""
        width = min(size, max(len(g) for g in groups))
        pad = self.n_params  # index of the zero appended to a row in split
        blocks, lengths = [], []
        for g in groups:
            n = -(-len(g) // width)
            lengths += [min(width, len(g) - i * width) for i in range(n)]
            blocks.append(torch.cat([g, torch.full((n * width - len(g),), pad)]).view(n, width))
        index = torch.cat(blocks)  # (T, W)
        where = torch.empty(self.n_params, dtype=torch.long)  # where each row value lies in the flat tokens
        valid = index.reshape(-1) < pad
        where[index.reshape(-1)[valid]] = torch.arange(index.numel())[valid]
        self.n_tokens, self.width = len(index), width
        self.lengths = lengths
        self.register_buffer("index", index.reshape(-1), persistent=False)
        self.register_buffer("where", where, persistent=False)
        if width > self.dim:
            log.warning("tokenizer %s: tokens of %d values into dim %d compress the row (lossy)", self.name,
                        width, self.dim)

    def split(self, rows: Tensor) -> Tensor:
        """(B, P) -> (B, T, W) values per token, zero-padded."""
        rows = self._rows(rows)
        padded = torch.cat([rows, rows.new_zeros(len(rows), 1)], dim=1)
        return padded[:, self.index.to(rows.device)].view(len(rows), self.n_tokens, self.width)

    def merge(self, pieces: Tensor) -> Tensor:
        """(B, T, W) -> (B, P), padding dropped."""
        if pieces.dim() != 3 or tuple(pieces.shape[1:]) != (self.n_tokens, self.width):
            raise TokenizerError(f"tokenizer {self.name!r}: pieces must be (B, {self.n_tokens}, {self.width}), "
                                 f"got {tuple(pieces.shape)}")
        return pieces.reshape(len(pieces), -1)[:, self.where.to(pieces.device)]


@register("layer")
class LayerTokenizer(_Padded):
    """HyperDiffusion's tokens: one per layer, long layers cut into chunk_size pieces.

    Each token position has its own Linear(length -> dim) in and Linear(dim -> length) out, as
    HyperDiffusion projects each layer with its own Linear: a token is a fixed slice of the weights
    (first-layer weights, a bias, ...) with its own meaning and scale, which one shared projection
    would have to untangle from a position code. The T Linears are held as one (T, W, dim) tensor
    (one batched matmul); the rows of a shorter token beyond its length are zero and see zero input
    (encode) or feed dropped outputs (decode), so they never train: each token's Linear is its true size."""

    OPTIONS = {"chunk_size": "values per token at most; default dim"}

    def __init__(self, layout: Layout, dim: int, chunk_size: int | None = None):
        super().__init__(layout, dim)
        self.chunk_size = _size_option(self.name, "chunk_size", chunk_size, dim)
        self._set_tokens(list(layer_positions(layout).values()), self.chunk_size)
        t, w = self.n_tokens, self.width
        length = torch.tensor(self.lengths, dtype=torch.float32)
        live = (torch.arange(w)[None] < length[:, None]).float()  # (T, W)
        bound_in = 1 / length.sqrt()  # nn.Linear's init U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = length
        self.w_in = nn.Parameter((torch.rand(t, w, dim) * 2 - 1) * bound_in[:, None, None] * live[:, :, None])
        self.b_in = nn.Parameter((torch.rand(t, dim) * 2 - 1) * bound_in[:, None])
        bound_out = 1 / math.sqrt(dim)
        self.w_out = nn.Parameter((torch.rand(t, dim, w) * 2 - 1) * bound_out * live[:, None, :])
        self.b_out = nn.Parameter((torch.rand(t, w) * 2 - 1) * bound_out * live)

    def encode(self, rows: Tensor) -> Tensor:
        return torch.einsum("btw,twd->btd", self.split(rows), self.w_in) + self.b_in

    def decode(self, tokens: Tensor) -> Tensor:
        return self.merge(torch.einsum("btd,tdw->btw", self._tokens(tokens), self.w_out) + self.b_out)


@register("chunk")
class ChunkTokenizer(_Padded):
    """The row cut into equal chunks (the last zero-padded), one shared Linear in and out; the DiT's
    positional embedding tells the chunks apart."""

    OPTIONS = {"chunk_size": "values per token; default dim"}

    def __init__(self, layout: Layout, dim: int, chunk_size: int | None = None):
        super().__init__(layout, dim)
        self.chunk_size = _size_option(self.name, "chunk_size", chunk_size, dim)
        self._set_tokens([torch.arange(self.n_params)], self.chunk_size)
        self.inp = nn.Linear(self.width, dim)
        self.out = nn.Linear(dim, self.width)

    def encode(self, rows: Tensor) -> Tensor:
        return self.inp(self.split(rows))

    def decode(self, tokens: Tensor) -> Tensor:
        return self.merge(self.out(self._tokens(tokens)))


@register("latent")
class LatentTokenizer(ChunkTokenizer):
    """A DeepSDF latent (one 1-D entry) in tokens of token_size values. Default 16: a 64-d latent is 4
    tokens, a 32-d one 2 -- a few tokens, so attention has something to relate, each well under any
    DiT width (no bottleneck)."""

    OPTIONS = {"token_size": "values per token; default 16"}
    DEFAULT_TOKEN_SIZE = 16

    def __init__(self, layout: Layout, dim: int, token_size: int | None = None):
        if not isinstance(layout, Layout) or len(layout.entries) != 1 or len(layout.entries[0][1]) != 1:
            entries = layout.to_json() if isinstance(layout, Layout) else layout
            shown = entries if len(entries) <= 4 else [*entries[:4], f"... {len(entries)} entries"]
            raise TokenizerError(f"tokenizer 'latent' needs a layout of one 1-D entry (a DeepSDF latent, e.g. "
                                 f"[['latent', [64]]]), got {shown}; use layer or chunk for weights")
        self.token_size = _size_option("latent", "token_size", token_size, self.DEFAULT_TOKEN_SIZE)
        super().__init__(layout, dim, chunk_size=self.token_size)


_LORA_ENTRY = re.compile(r"^(?P<layer>.+)\.(?P<which>[ab])(?P<i>\d+)(_free)?$")  # _free: masked (asym)


def lora_layers(layout: Layout) -> dict[str, tuple[int, int, int, Tensor]]:
    """{layer: (rank r, d_in, d_out, (r, d_in + d_out) int64 row positions of [a_i, b_i])} of a LoRA
    layout, layers in order of first appearance. TokenizerError naming what does not fit."""
    starts = np.cumsum([0, *layout.sizes])
    found: dict[str, dict[str, dict[int, tuple[int, int]]]] = {}
    bad = []
    for k, (name, shape) in enumerate(layout.entries):
        m = _LORA_ENTRY.match(name)
        if not m or len(shape) != 1:
            bad.append(f"{name} {list(shape)}")
            continue
        found.setdefault(m["layer"], {"a": {}, "b": {}})[m["which"]][int(m["i"])] = (int(starts[k]), shape[0])
    if bad:
        shown = bad[:4] + ([f"... {len(bad)} in all"] if len(bad) > 4 else [])
        raise TokenizerError(f"tokenizer 'lora_hier' needs a LoRA layout (1-D entries <layer>.a<i> / <layer>.b<i>: "
                             f"the lora / mlora field types); these entries are not: {shown}. "
                             f"Use layer or chunk for this layout")
    out = {}
    for layer, ab in found.items():
        r = len(ab["a"])
        if set(ab["a"]) != set(range(r)) or set(ab["b"]) != set(range(r)):
            raise TokenizerError(f"tokenizer 'lora_hier': layer {layer} needs pairs a0..a{{r-1}}, b0..b{{r-1}}; "
                                 f"has a {sorted(ab['a'])}, b {sorted(ab['b'])}")
        d_in, d_out = {d for _, d in ab["a"].values()}, {d for _, d in ab["b"].values()}
        if len(d_in) != 1 or len(d_out) != 1:
            raise TokenizerError(f"tokenizer 'lora_hier': layer {layer} has a_i of sizes {sorted(d_in)} and b_i of "
                                 f"sizes {sorted(d_out)}; each must have one size")
        (d_in,), (d_out,) = d_in, d_out
        pos = [torch.cat([torch.arange(ab["a"][i][0], ab["a"][i][0] + d_in),
                          torch.arange(ab["b"][i][0], ab["b"][i][0] + d_out)]) for i in range(r)]
        out[layer] = (r, d_in, d_out, torch.stack(pos))
    return out


def rank_heads(dim: int, r: int) -> int:
    """Attention heads over a layer's r rank tokens: r, as the paper has it, or the largest divisor of
    dim below r when r does not divide dim (a head must have dim / heads channels)."""
    return max(h for h in range(1, min(r, dim) + 1) if dim % h == 0)


class _RankMixer(nn.Module):
    """A pre-norm transformer block (self-attention, then an MLP of width 2 dim) over one layer's rank
    tokens (B, r, dim). The MLP is needed: attention alone mixes near-linear values of the tokens, so
    after the mean (encode), or from one repeated token (decode), the r ranks collapse to almost one
    vector: on random rows (dim >= r (d_in + d_out)), an encode / decode autoencoder with attention-only
    mixers plateaued near half the variance, with the MLP it fell to ~0.2% in 1,500 Adam steps."""

    MLP_RATIO = 2

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, self.MLP_RATIO * dim), nn.GELU(), nn.Linear(self.MLP_RATIO * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


@register("lora_hier")
class LoRAHierTokenizer(Tokenizer):
    """The LoRA paper's hierarchical layer encoder: one token per LoRA layer (T = number of layers).

    encode, per layer l with rank r: the pairs [a_i, b_i] (r, d_in + d_out) -> Linear_l -> + rank
    encoding -> a transformer block over the r tokens (self-attention with r heads, MLP) -> mean ->
    + layer encoding. decode, the mirror: the layer token repeated r times -> + rank encoding -> a
    transformer block -> Linear_l -> [a_i, b_i].

    Rank encoding: fixed sinusoidal (no parameters, any r; with asymmetric masks the rank index is
    meaningful, without them the ranks are interchangeable and a learned code would have nothing to
    learn). Layer encoding: learned, one vector per layer (few layers, each its own semantic level).
    The blocks are shared by the layers with the same head count (one for the usual uniform rank): their
    cost grows as dim^2, independent of depth, and the per-layer Linears keep layers apart."""

    OPTIONS: ClassVar[dict[str, str]] = {}

    def __init__(self, layout: Layout, dim: int):
        super().__init__(layout, dim)
        layers = lora_layers(layout)
        self.layer_names = list(layers)
        self.ranks = [r for r, _, _, _ in layers.values()]
        self.widths = [d_in + d_out for _, d_in, d_out, _ in layers.values()]
        self.heads = [rank_heads(dim, r) for r in self.ranks]
        self.n_tokens = len(layers)
        perm = torch.cat([pos.reshape(-1) for *_, pos in layers.values()])
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(len(perm))
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("inverse", inverse, persistent=False)
        self.register_buffer("rank_pe", sinusoidal(max(self.ranks), dim), persistent=False)
        self.inp = nn.ModuleList(nn.Linear(w, dim) for w in self.widths)
        self.out = nn.ModuleList(nn.Linear(dim, w) for w in self.widths)
        self.mix_in = nn.ModuleDict({str(h): _RankMixer(dim, h) for h in sorted(set(self.heads))})
        self.mix_out = nn.ModuleDict({str(h): _RankMixer(dim, h) for h in sorted(set(self.heads))})
        self.layer_pe = nn.Parameter(torch.randn(self.n_tokens, dim) * 0.02)
        if max(r * w for r, w in zip(self.ranks, self.widths)) > dim:
            log.warning("tokenizer lora_hier: a layer of r (d_in + d_out) = %d values into dim %d compresses "
                        "the row (lossy)", max(r * w for r, w in zip(self.ranks, self.widths)), dim)

    def split(self, rows: Tensor) -> list[Tensor]:
        """(B, P) -> per layer (B, r, d_in + d_out): row i is [a_i, b_i]."""
        rows = self._rows(rows)
        flat = rows[:, self.perm.to(rows.device)]
        sizes = [r * w for r, w in zip(self.ranks, self.widths)]
        return [p.view(len(rows), r, w) for p, r, w in zip(flat.split(sizes, dim=1), self.ranks, self.widths)]

    def merge(self, pieces: Sequence[Tensor]) -> Tensor:
        shapes = [(r, w) for r, w in zip(self.ranks, self.widths)]
        if len(pieces) != len(shapes) or any(p.dim() != 3 or tuple(p.shape[1:]) != s for p, s in zip(pieces, shapes)):
            raise TokenizerError(f"tokenizer 'lora_hier': pieces must be per layer (B, r, d_in + d_out) {shapes}, "
                                 f"got {[tuple(p.shape) for p in pieces]}")
        flat = torch.cat([p.reshape(len(p), -1) for p in pieces], dim=1)
        return flat[:, self.inverse.to(flat.device)]

    def encode(self, rows: Tensor) -> Tensor:
        tokens = []
        for i, piece in enumerate(self.split(rows)):
            x = self.inp[i](piece) + self.rank_pe[: self.ranks[i]]
            tokens.append(self.mix_in[str(self.heads[i])](x).mean(dim=1))
        return torch.stack(tokens, dim=1) + self.layer_pe

    def decode(self, tokens: Tensor) -> Tensor:
        tokens = self._tokens(tokens)
        pieces = []
        for i, r in enumerate(self.ranks):
            x = tokens[:, i, None, :].expand(-1, r, -1) + self.rank_pe[:r]
            pieces.append(self.out[i](self.mix_out[str(self.heads[i])](x)))
        return self.merge(pieces)
