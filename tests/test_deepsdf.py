"""The DeepSDF baseline: the decoder against its definition, and deepsdf_latent fields (latent
optimisation against the frozen decoder) on an auto-decoder trained in-process."""

import numpy as np
import pytest
import torch

from raywsl.base.autodecoder import AutoDecoder, AutoDecoderSettings
from raywsl.models.deepsdf import DeepSDFDecoder
from raywsl.config import FitConfig
from raywsl.models.encoding import positional_encoding
from raywsl.fit.engine import BatchedFitter, ShapeData
from raywsl.models.losses import LOSSES
from raywsl.models.fields import FieldError, make_field
from raywsl.contract import SHAPE_IDS

RADII = [0.3, 0.45, 0.6, 0.75]


def test_the_shapenet_preset_is_the_studys_decoder():
    net = DeepSDFDecoder.from_preset("shapenet")
    widths = [layer.out_features for layer in net.layers]
    assert len(net.layers) == 8 and widths == [512] * 8
    assert net.layers[0].in_features == 64 + 39 and net.layers[4].in_features == 512 + 103  # re-injected
    assert 1.9e6 < sum(p.numel() for p in net.parameters()) < 2.0e6  # "~1.95 M parameters"


def test_decoder_equals_the_direct_formula():
    torch.manual_seed(0)
    net = DeepSDFDecoder(latent=4, bands=1, width=16, layers=3, inject=2)
    x, z = torch.rand(2, 5, 3) * 2 - 1, torch.randn(2, 4)
    for k in range(2):
        inp = torch.cat([z[k].expand(5, -1), positional_encoding(x[k], 1)], 1)  # [z, PE(p)]
        h = torch.relu(inp @ net.layers[0].weight.T + net.layers[0].bias)
        h = torch.relu(h @ net.layers[1].weight.T + net.layers[1].bias)
        h = torch.relu(torch.cat([h, inp], 1) @ net.layers[2].weight.T + net.layers[2].bias)  # re-injection
        torch.testing.assert_close(net.decode(x, z)[k], (h @ net.output.weight.T + net.output.bias)[:, 0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny DeepSDF auto-decoder trained on four spheres (a real train-base checkpoint folder)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)  # 3/4 of the points near the surface, as ingest samples (and DeepSDF)
    radii = np.array(RADII)[:, None, None]
    d = rng.normal(size=(4, 2048, 3))
    d /= np.linalg.norm(d, axis=2, keepdims=True)
    points = (d * (radii + rng.normal(0, 0.05, (4, 2048, 1)))).astype(np.float32)
    points[:, 1536:] = rng.uniform(-1, 1, (4, 512, 3))
    sdf = (np.linalg.norm(points, axis=2) - radii[..., 0]).astype(np.float32)
    net = DeepSDFDecoder.from_preset("tiny")
    trainer = AutoDecoder(net, lambda net, x, z: net.decode(x, z), 4, net.config["latent"],
                          AutoDecoderSettings(steps=600, lr=3e-3, latent_lr=1e-2, loss="clamped_l1",
                                              stages=[[1.0, 4, 1024]]))
    for batch in trainer.batches(points, sdf):
        trainer.step(*batch)
    folder = tmp_path_factory.mktemp("deepsdf") / "deepsdf_final"
    trainer.save(str(folder))
    (folder / SHAPE_IDS).write_text('["s0", "s1", "s2", "s3"]')
    return str(folder), points, sdf, trainer.latents.detach()


def _loss(field, rows, points, sdf):
    with torch.no_grad():
        pred = field.forward(field.layout.unflatten(rows), torch.from_numpy(points))
    return LOSSES["clamped_l1"](pred, torch.from_numpy(sdf), 0.1).mean(1)


def test_latent_field_knows_the_trained_latents_and_decodes_them(trained):
    folder, points, sdf, latents = trained
    field = make_field("deepsdf_latent", "default", base=folder)
    assert field.layout.size == 8 and field.layout.names == ["latent"]
    rows = torch.randn(3, 8)
    assert torch.equal(field.layout.flatten(field.layout.unflatten(rows)), rows)  # the layout round trip
    assert torch.equal(field.trained_row("s2"), latents[2]) and field.trained_row("unknown") is None
    assert "decoder.output.weight" in field.frozen()
    own = _loss(field, latents, points, sdf)
    swapped = _loss(field, latents.roll(1, 0), points, sdf)
    assert (own < 0.5 * swapped).all(), (own, swapped)  # each latent decodes its own sphere
    with pytest.raises(FieldError, match="no weight matrix"):
        make_field("deepsdf_latent", "default", base=folder, asym=True)
    with pytest.raises(FieldError, match="holds a deepsdf base"):
        make_field("mlora", "default", base=folder)


def test_latent_fitting_of_a_training_shape_recovers_its_trained_quality(trained):
    """DeepSDF inference: a latent optimised from N(0, 0.01^2) against the frozen decoder
    reconstructs a training shape as well as the latent learned with the decoder."""
    folder, points, sdf, latents = trained
    field = make_field("deepsdf_latent", "default", base=folder)
    starts = field.init_rows(4, torch.Generator().manual_seed(1))
    fitter = BatchedFitter(field, FitConfig(steps=300, lr=1e-2, loss="clamped_l1", points_per_step=1024,
                                            batch_size=4, schedule="cosine"))
    results = sorted(fitter.fit([ShapeData(k, f"s{k}", points[k], sdf[k], starts[k]) for k in range(4)]),
                     key=lambda r: r.key)
    fitted = torch.from_numpy(np.stack([r.row for r in results]))
    before, after, reference = (_loss(field, rows, points, sdf) for rows in (starts, fitted, latents))
    assert (after < 0.5 * before).all(), (before, after)
    assert (after < 1.1 * reference + 1e-3).all(), (after, reference)
    # and the optimised latents land near the trained ones (not on another sphere's)
    nearest = torch.cdist(fitted, latents).argmin(1)
    assert nearest.tolist() == [0, 1, 2, 3]
