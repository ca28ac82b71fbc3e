"""LoRA / multiplicative-LoRA fields on a trained base: layouts, the start, masks, fitting."""

import numpy as np
import pytest
import torch

from raywsl.config import FitConfig
from raywsl.fit.engine import BatchedFitter, ShapeData
from raywsl.models.fields import FieldError, make_field


@pytest.mark.parametrize("kind", ["lora", "mlora"])
def test_the_start_is_the_base_field_at_the_mean_latent(tiny_base, kind):
    field = make_field(kind, "default", base=tiny_base, rank=3)
    rows = field.init_rows(2, torch.Generator().manual_seed(0))
    x = torch.rand(2, 50, 3) * 2 - 1
    with torch.no_grad():
        styles = field.net.styles(field.mean_latent.expand(2, -1))
        torch.testing.assert_close(field.forward(field.layout.unflatten(rows), x), field.net(x, styles))
    # ... because B A = 0 (lora) or B A = 1 (mlora) in every layer
    for w in field.effective_weights(field.layout.unflatten(rows)).values():
        assert w.shape[0] == 2
    params = field.layout.unflatten(rows)
    for n, w in field.net.base_weights().items():
        torch.testing.assert_close(field.effective_weights(params)[n][0], w)


def test_layout_exposes_the_rank_pairs_and_round_trips(tiny_base):
    field = make_field("mlora", "default", base=tiny_base, rank=2)
    c = field.net.config["channels"]
    names = field.layout.names
    assert names[:4] == ["block0.fc0.a0", "block0.fc0.b0", "block0.fc0.a1", "block0.fc0.b1"]
    assert field.layout.size == len(field.net.layer_names) * 2 * 2 * c
    rows = torch.randn(3, field.layout.size)
    assert torch.equal(field.layout.flatten(field.layout.unflatten(rows)), rows)
    with pytest.raises(FieldError, match="one per synthesis layer"):
        make_field("lora", "default", base=tiny_base, rank=[1, 2, 3])


@pytest.mark.parametrize("kind", ["lora", "mlora"])
def test_masked_entries_of_the_effective_weights_never_change(tiny_base, kind):
    field = make_field(kind, "default", base=tiny_base, rank=2, asym=True, kappa=2.0)
    weights = field.effective_weights(field.layout.unflatten(torch.randn(2, field.layout.size)))
    for n, m in field.masks_w.items():
        fixed = weights[n].gather(2, m.fixed.expand(2, -1, -1))
        torch.testing.assert_close(fixed, m.values.expand(2, -1, -1))
        if kind == "mlora":
            assert (m.values == 0).all()  # the paper's scheme: multiplicative masks zero entries
    assert field.frozen_fingerprint() != make_field(kind, "default", base=tiny_base, rank=2).frozen_fingerprint()


def test_missing_base_is_a_clear_error(tmp_path):
    with pytest.raises(FieldError, match="run `raywsl train-base`"):
        make_field("mlora", "default", base=str(tmp_path / "nothing"))


@pytest.mark.parametrize("kind", ["lora", "mlora"])
def test_fitting_adapters_to_a_new_shape_reduces_the_loss(tiny_base, kind):
    field = make_field(kind, "default", base=tiny_base, rank=2)
    rng = np.random.default_rng(1)
    points = rng.uniform(-1, 1, (4096, 3)).astype(np.float32)
    box = (np.abs(points) - 0.35).max(axis=1).astype(np.float32)  # a cube: not one of the base's spheres
    shape = ShapeData(0, "cube", points, box, field.init_rows(1, torch.Generator().manual_seed(0))[0])
    (result,) = BatchedFitter(field, FitConfig(steps=300, batch_size=1, points_per_step=1024, check_every=25,
                                               lr=1e-2), "cpu").fit([shape])
    assert result.ok and result.curve[-1] < 0.8 * result.curve[0]  # 0.68-0.71 measured (a 16-channel base)
    # the frozen base is untouched
    assert not any(p.requires_grad for p in field.net.parameters())
