"""Tokenizers (rows <-> tokens) and the per-parameter Standardizer: exact split / merge on every layout a
tokenizer accepts, token counts, shapes, no mixing of rows, trainability, clear errors. No Ray."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raywsl.store.standardize import Standardizer
from raywsl.models.tokenizers import (TOKENIZERS, TokenizerError, make_tokenizer, rank_heads,
                                         sinusoidal)
from raywsl.models.fields import make_field
from raywsl.store.layout import Layout


def lora_layout(ranks, widths) -> Layout:
    """A LoRA layout: layers block{j}.fc{k}, per rank pair a_i (d_in), b_i (d_out)."""
    entries = []
    for n, (r, (d_in, d_out)) in enumerate(zip(ranks, widths)):
        layer = f"block{n // 2}.fc{n % 2}"
        for i in range(r):
            entries += [(f"{layer}.a{i}", (d_in,)), (f"{layer}.b{i}", (d_out,))]
    return Layout(tuple(entries))


LAYOUTS = {
    "mlp_small": lambda: make_field("mlp", "small").layout,
    "mlp_decoder54k": lambda: make_field("mlp", "decoder54k").layout,
    "mlp_small_asym": lambda: make_field("mlp", "small", asym=True).layout,
    "fourier_tiny": lambda: make_field("fourier", "tiny").layout,
    "lora_r3": lambda: lora_layout([3] * 4, [(16, 16)] * 4),
    "lora_mixed": lambda: lora_layout([2, 4, 1, 3], [(8, 12), (12, 12), (12, 6), (6, 10)]),
    "latent64": lambda: Layout((("latent", (64,)),)),
}
ACCEPTS = {
    "layer": list(LAYOUTS),
    "chunk": list(LAYOUTS),
    "lora_hier": ["lora_r3", "lora_mixed"],
    "latent": ["latent64"],
}
CASES = [(t, lay) for t, lays in ACCEPTS.items() for lay in lays]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add overhead (and stall badly on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rows_of(layout: Layout, n: int = 3, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, layout.size, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_registry_complete():
    assert set(TOKENIZERS) == set(ACCEPTS)


@pytest.mark.parametrize("name,layout_key", CASES)
def test_split_merge_exact(name, layout_key):
    layout = LAYOUTS[layout_key]()
    tok = make_tokenizer(name, layout, 32)
    for rows in (rows_of(layout), rows_of(layout, 1, seed=1, dtype=torch.float64)):
        pieces = tok.split(rows)
        assert torch.equal(tok.merge(pieces), rows)
    if isinstance(pieces, torch.Tensor):
        assert pieces.shape[:2] == (1, tok.n_tokens)


def test_layer_token_counts():
    # mlp small, chunk 512: l0 64*27+64 = 1792 -> 4 (512, 512, 512, 256); l1, l2 64*64+64 = 4160 -> 9 each;
    # l3 65 -> 1
    small = make_field("mlp", "small").layout
    tok = make_tokenizer("layer", small, 64, chunk_size=512)
    assert tok.n_tokens == 4 + 9 + 9 + 1 and tok.width == 512
    assert tok.lengths[:4] == [512, 512, 512, 256] and tok.lengths[-1] == 65
    # default chunk_size = dim: 1792/64 = 28, 4160/64 -> 65 each, 65 -> 2
    assert make_tokenizer("layer", small, 64).n_tokens == 28 + 65 + 65 + 2
    # decoder54k (39 -> 128x4 -> 1), chunk 512: 5120 -> 10, 3 x 16512 -> 33 each, 129 -> 1
    big = make_field("mlp", "decoder54k").layout
    assert big.size == 54785
    assert make_tokenizer("layer", big, 64, chunk_size=512).n_tokens == 10 + 3 * 33 + 1
    # a layer's tokens hold exactly its values, weight then bias: the first token of l3 in mlp small
    rows = rows_of(small)
    pieces = tok.split(rows)
    l3 = small.unflatten(rows)
    expect = torch.cat([l3["l3.weight"].reshape(3, -1), l3["l3.bias"]], dim=1)
    assert torch.equal(pieces[:, -1, :65], expect) and not pieces[:, -1, 65:].any()
    # asym layout: the free weights and the bias of a layer form its tokens
    asym = make_field("mlp", "small", asym=True).layout
    t = make_tokenizer("layer", asym, 64, chunk_size=10**6)
    assert t.n_tokens == 4 and sum(t.lengths) == asym.size


def test_other_token_counts():
    small = make_field("mlp", "small").layout
    assert make_tokenizer("chunk", small, 64, chunk_size=512).n_tokens == math.ceil(10177 / 512)
    assert make_tokenizer("chunk", small, 256).n_tokens == math.ceil(10177 / 256)
    assert make_tokenizer("latent", LAYOUTS["latent64"](), 64).n_tokens == 4
    assert make_tokenizer("latent", Layout((("latent", (32,)),)), 64, token_size=8).n_tokens == 4
    mixed = make_tokenizer("lora_hier", LAYOUTS["lora_mixed"](), 64)
    assert mixed.n_tokens == 4 and mixed.ranks == [2, 4, 1, 3]
    pieces = mixed.split(rows_of(LAYOUTS["lora_mixed"]()))
    assert [tuple(p.shape) for p in pieces] == [(3, 2, 20), (3, 4, 24), (3, 1, 18), (3, 3, 16)]
    # the rank-20 LoRA on the small base: 4 layers of 64 -> 64, 20 pairs each
    assert make_tokenizer("lora_hier", lora_layout([20] * 4, [(64, 64)] * 4), 64).n_tokens == 4


def test_lora_pieces_are_the_pairs():
    layout = LAYOUTS["lora_mixed"]()
    rows = rows_of(layout)
    params = layout.unflatten(rows)
    pieces = make_tokenizer("lora_hier", layout, 32).split(rows)
    assert torch.equal(pieces[1][:, 2], torch.cat([params["block0.fc1.a2"], params["block0.fc1.b2"]], dim=1))
    assert torch.equal(pieces[3][:, 0], torch.cat([params["block1.fc1.a0"], params["block1.fc1.b0"]], dim=1))
    # the pairs in another entry order (all a, then all b) give the same pieces
    shuffled = Layout(tuple(sorted(layout.entries, key=lambda e: (e[0].rsplit(".", 1)[0], e[0][-2] != "a"))))
    assert shuffled.entries != layout.entries
    rows2 = shuffled.flatten(params)
    tok2 = make_tokenizer("lora_hier", shuffled, 32)
    assert all(torch.equal(a, b) for a, b in zip(tok2.split(rows2), pieces))
    assert torch.equal(tok2.merge(tok2.split(rows2)), rows2)


def test_rank_heads():
    assert rank_heads(64, 4) == 4 and rank_heads(64, 3) == 2 and rank_heads(64, 20) == 16
    assert rank_heads(2880, 20) == 20 and rank_heads(64, 1) == 1
    assert sinusoidal(5, 7).shape == (5, 7)


@pytest.mark.parametrize("name,layout_key", [("layer", "mlp_small"), ("layer", "lora_mixed"), ("chunk", "fourier_tiny"),
                                             ("lora_hier", "lora_mixed"), ("latent", "latent64")])
def test_encode_decode_shapes_and_no_mixing(name, layout_key):
    torch.manual_seed(0)
    layout = LAYOUTS[layout_key]()
    tok = make_tokenizer(name, layout, 32)
    rows = rows_of(layout, 4)
    tokens = tok.encode(rows)
    assert tokens.shape == (4, tok.n_tokens, 32)
    out = tok.decode(tokens)
    assert out.shape == rows.shape and torch.isfinite(out).all()
    # perturb row 0: row 1's tokens and outputs do not change, row 0's do
    moved = rows.clone()
    moved[0] += 1.0
    tokens2 = tok.encode(moved)
    assert torch.equal(tokens2[1:], tokens[1:]) and not torch.equal(tokens2[0], tokens[0])
    dec_in = tokens.clone()
    dec_in[0] += 1.0
    out2 = tok.decode(dec_in)
    assert torch.equal(out2[1:], out[1:]) and not torch.equal(out2[0], out[0])
    # a batch of one, and float64 (module and input)
    assert tok.encode(rows[:1]).shape == (1, tok.n_tokens, 32)
    tok64 = tok.double()
    assert tok64.decode(tok64.encode(rows.double())).dtype == torch.float64


@pytest.mark.parametrize("name,layout_key,dim,steps", [("layer", "mlp_small", 64, 60), ("chunk", "fourier_tiny", 32, 60),
                                                       ("lora_hier", "lora_mixed", 128, 100),
                                                       ("latent", "latent64", 32, 60)])
def test_gradients_and_training(name, layout_key, dim, steps):
    torch.manual_seed(0)
    layout = LAYOUTS[layout_key]()
    tok = make_tokenizer(name, layout, dim)
    rows = rows_of(layout, 16)
    loss = torch.nn.functional.mse_loss(tok.decode(tok.encode(rows)), rows)
    loss.backward()
    for pname, p in tok.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
    opt = torch.optim.Adam(tok.parameters(), lr=3e-3)
    first = loss.item()
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(tok.decode(tok.encode(rows)), rows)
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first, (first, loss.item())  # an identity autoencoding of 16 random rows


def test_errors():
    small = make_field("mlp", "small").layout
    assert issubclass(TokenizerError, ValueError)
    with pytest.raises(ValueError, match=r"LoRA layout.*l0\.weight") as e:
        make_tokenizer("lora_hier", small, 64)
    assert "layer or chunk" in str(e.value)
    with pytest.raises(ValueError, match="one 1-D entry"):
        make_tokenizer("latent", small, 64)
    with pytest.raises(ValueError, match="one 1-D entry"):
        make_tokenizer("latent", Layout((("latent", (64,)), ("other", (4,)))), 64)
    with pytest.raises(ValueError, match=r"unknown tokenizer 'nope'.*chunk.*latent.*layer.*lora_hier"):
        make_tokenizer("nope", small, 64)
    with pytest.raises(ValueError, match=r"unknown option.*token_size.*chunk_size"):
        make_tokenizer("layer", small, 64, token_size=8)
    with pytest.raises(ValueError, match="unknown option"):
        make_tokenizer("lora_hier", LAYOUTS["lora_r3"](), 64, chunk_size=32)
    with pytest.raises(ValueError, match="positive integer"):
        make_tokenizer("chunk", small, 64, chunk_size=-3)
    with pytest.raises(ValueError, match="pairs"):
        make_tokenizer("lora_hier", Layout((("l.a0", (4,)), ("l.b1", (4,)))), 64)
    # 0 / None: the default
    assert make_tokenizer("chunk", small, 64, chunk_size=0).chunk_size == 64
    assert make_tokenizer("lora_hier", LAYOUTS["lora_r3"](), 64, chunk_size=0).n_tokens == 4
    tok = make_tokenizer("chunk", small, 64)
    with pytest.raises(ValueError, match="rows must be"):
        tok.encode(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="tokens must be"):
        tok.decode(torch.zeros(2, 3, 64))


def test_standardizer_streamed_equals_whole(tmp_path):
    g = torch.Generator().manual_seed(0)
    # large offset, small spread: naive float32 sums of squares would lose it
    rows = (1000.0 + torch.randn(1000, 50, generator=g) * torch.logspace(-3, 1, 50)).float()
    rows[:, 7] = 0.25  # constant column
    whole = Standardizer.fit(rows)
    blocks = [rows[i:j].numpy() for i, j in [(0, 1), (1, 300), (300, 300), (300, 777), (777, 1000)]]
    streamed = Standardizer.fit(iter(blocks))
    ref = rows.double()
    assert torch.allclose(whole.mean.double(), ref.mean(0), rtol=1e-6)
    assert torch.allclose(streamed.mean, whole.mean, rtol=1e-6, atol=0)
    keep = torch.arange(50) != 7
    assert torch.allclose(streamed.std[keep], whole.std[keep], rtol=1e-6, atol=0)
    assert torch.allclose(whole.std[keep].double(), ref.std(0, unbiased=False)[keep], rtol=1e-5)
    # zero std: floored, finite both ways, the constant comes back
    assert whole.std[7] > 0 and streamed.std[7] > 0
    z = streamed.forward(rows)
    assert torch.isfinite(z).all() and not z[:, 7].any()
    assert torch.allclose(streamed.inverse(z), rows, rtol=1e-6)
    assert torch.allclose(z[:, keep].std(0, unbiased=False), torch.ones(49), atol=1e-3)
    # round trip of the state through torch.save / load(weights_only=True)
    torch.save({"standardizer": streamed.state()}, tmp_path / "s.pt")
    back = Standardizer.from_state(torch.load(tmp_path / "s.pt", weights_only=True)["standardizer"])
    assert torch.equal(back.mean, streamed.mean) and torch.equal(back.std, streamed.std)
    # as train.py sends it: lists of floats
    lists = Standardizer.from_state({k: torch.tensor(v.tolist()) for k, v in streamed.state().items()})
    assert torch.equal(lists.std, streamed.std)
    # dtype follows the rows
    assert streamed.forward(rows.double()).dtype == torch.float64


def test_standardizer_misc():
    ident = Standardizer.identity(5)
    x = torch.randn(3, 5)
    assert torch.equal(ident.forward(x), x) and torch.equal(ident.inverse(x), x)
    one = Standardizer.fit(np.ones((1, 4), np.float32))  # a single row: every std is the floor
    assert torch.isfinite(one.forward(torch.ones(2, 4))).all()
    with pytest.raises(ValueError, match="no rows"):
        Standardizer.fit([])
    with pytest.raises(ValueError, match="NaN"):
        Standardizer.fit(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="block 1"):
        Standardizer.fit([np.zeros((2, 3)), np.zeros((2, 4))])
    with pytest.raises(ValueError, match="4 parameters"):
        Standardizer.identity(4).forward(torch.zeros(2, 3))
