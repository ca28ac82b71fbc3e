"""The modulated base field: modulation and demodulation against the direct formula."""

import pytest
import torch

from raywsl.models.modulated import DEMOD_EPS, ModulatedField, modulated_linear


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


# ------------------------------------------------------------------------------------ auto-decoder training

def _spheres(n=6, m=4096):
    import numpy as np

    rng = np.random.default_rng(0)
    points = rng.uniform(-1, 1, (n, m, 3)).astype(np.float32)
    radii = np.linspace(0.25, 0.7, n, dtype=np.float32)[:, None]
    return points, (np.linalg.norm(points, axis=2) - radii).astype(np.float32)


def _trainer(steps):
    from raywsl.base.autodecoder import AutoDecoder, AutoDecoderSettings

    torch.manual_seed(0)
    net = ModulatedField.from_preset("tiny")
    settings = AutoDecoderSettings(steps=steps, lr=3e-3, latent_lr=3e-3, stages=[[0.5, 6, 256], [0.5, 3, 1024]])
    return AutoDecoder(net, lambda net, x, z: net(x, net.styles(z)), 6, 8, settings)


def test_auto_decoder_training_reduces_the_loss_and_separates_the_shapes():
    points, sdf = _spheres()
    trainer = _trainer(300)
    losses = [trainer.step(*batch) for batch in trainer.batches(points, sdf)]
    assert trainer.step_count == 300
    assert sum(losses[-20:]) / 20 < 0.3 * sum(losses[:20]) / 20
    # one network, six shapes: each latent decodes its own sphere better than its neighbour's
    with torch.no_grad():
        x = torch.from_numpy(points[:, :512])
        own = (trainer.net(x, trainer.net.styles(trainer.latents)) - torch.from_numpy(sdf[:, :512])).abs().mean()
        swapped = trainer.latents.roll(1, 0)
        other = (trainer.net(x, trainer.net.styles(swapped)) - torch.from_numpy(sdf[:, :512])).abs().mean()
    assert own < 0.6 * other


def test_auto_decoder_resumes_from_a_checkpoint_exactly(tmp_path):
    points, sdf = _spheres()
    straight = _trainer(40)
    for batch in straight.batches(points, sdf):
        straight.step(*batch)
    first = _trainer(40)
    for batch in first.batches(points, sdf):
        first.step(*batch)
        if first.step_count == 20:
            break
    first.save(str(tmp_path / "ckpt"))
    resumed = _trainer(40)  # a new process would build the same objects, then load
    resumed.load_state(str(tmp_path / "ckpt"))
    assert resumed.step_count == 20
    for batch in resumed.batches(points, sdf):
        resumed.step(*batch)
    assert torch.equal(resumed.latents, straight.latents)
    for a, b in zip(resumed.net.state_dict().values(), straight.net.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(resumed.ema.state_dict().values(), straight.ema.state_dict().values()):
        assert torch.equal(a, b)
