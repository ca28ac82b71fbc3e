"""The modulated base field: modulation and demodulation against the direct formula."""

import pytest
import torch

from raywsl.base.modulated import DEMOD_EPS, ModulatedField, modulated_linear


def test_modulated_linear_equals_the_direct_formula():
    gen = torch.Generator().manual_seed(0)
    b, m, c_in, c_out = 2, 5, 6, 4
    h, w = torch.randn(b, m, c_in, generator=gen), torch.randn(c_out, c_in, generator=gen)
    s, bias = torch.randn(b, c_in, generator=gen), torch.randn(c_out, generator=gen)
    expected = torch.empty(b, m, c_out)
    for k in range(b):
        for o in range(c_out):
            mod = [w[o, i] * s[k, i] for i in range(c_in)]  # W'_oi = W_oi s_i
            norm = torch.sqrt(sum(v * v for v in mod) + DEMOD_EPS)  # per output channel
            expected[k, :, o] = sum(h[k, :, i] * mod[i] / norm for i in range(c_in)) + bias[o]
    torch.testing.assert_close(modulated_linear(h, w, s, bias), expected)
    # per-shape weights (B, out, in) give the same as the shared ones repeated
    torch.testing.assert_close(modulated_linear(h, w.expand(b, -1, -1), s, bias), expected)


def test_demodulation_makes_the_output_blind_to_the_style_scale_and_the_weight_row_scale():
    gen = torch.Generator().manual_seed(1)
    h, w, s = torch.randn(1, 7, 5, generator=gen), torch.randn(3, 5, generator=gen), torch.rand(1, 5, generator=gen) + 0.5
    bias = torch.zeros(3)
    y = modulated_linear(h, w, s, bias)
    torch.testing.assert_close(modulated_linear(h, w, 10 * s, bias), y)
    torch.testing.assert_close(modulated_linear(h, w * torch.tensor([[2.0], [0.5], [7.0]]), s, bias), y)
    # every output channel's effective weight has unit norm
    eff = torch.stack([modulated_linear(torch.eye(5)[None], w, s, bias)[0, i] for i in range(5)], 1)
    torch.testing.assert_close(eff.norm(dim=1), torch.ones(3), atol=1e-6, rtol=0)


@pytest.mark.parametrize("preset", sorted(ModulatedField.PRESETS))
def test_base_field_shapes_and_styles(preset):
    field = ModulatedField.from_preset(preset)
    cfg = ModulatedField.PRESETS[preset]
    z = torch.randn(3, cfg["latent"])
    styles = field.styles(z)
    assert list(styles) == [f"block{j}.fc{k}" for j in range(cfg["blocks"]) for k in range(2)]
    assert all(s.shape == (3, cfg["channels"]) for s in styles.values())
    assert field(torch.rand(3, 11, 3), styles).shape == (3, 11)
    # passing the base weights explicitly (as LoRA does, per shape) changes nothing
    weights = {n: w.expand(3, -1, -1) for n, w in field.base_weights().items()}
    x = torch.rand(3, 11, 3)
    torch.testing.assert_close(field(x, styles, weights), field(x, styles))
