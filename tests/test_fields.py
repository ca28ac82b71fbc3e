"""Field types: exact row layouts, batched forwards that match plain torch modules, presets."""

import math

import pytest
import torch

from raywsl.models.fields import FIELDS, FieldError, make_field, positional_encoding
from raywsl.store.layout import Layout, LayoutError

# Fields on a trained base (lora, mlora) are tested in test_lora.py.
ALL = [(t, p) for t, cls in sorted(FIELDS.items()) if not cls.base_model
       for p in sorted(cls.PRESETS)]


@pytest.mark.parametrize("type_name,preset", ALL)
def test_layout_round_trip_is_exact(type_name, preset):
    field = make_field(type_name, preset)
    rows = torch.randn(3, field.layout.size)
    params = field.layout.unflatten(rows)
    assert list(params) == field.layout.names
    assert all(params[n].shape == (3, *s) for n, s in field.layout.entries)
    assert torch.equal(field.layout.flatten(params), rows)
    assert Layout.from_json(field.layout.to_json()) == field.layout
    # unflatten gives views: a gradient through the parameters lands in the row
    rows.requires_grad_(True)
    field.forward(field.layout.unflatten(rows), torch.rand(3, 5, 3)).sum().backward()
    assert rows.grad is not None and rows.grad.abs().sum() > 0


def test_parameter_counts_of_the_papers_presets():
    assert make_field("mlp", "decoder54k").layout.size == 54_785  # the small-data study's decoder
    assert make_field("mlp", "hyperdiffusion").layout.size == 36_737  # HyperDiffusion's MLP
    # the LoRA paper's Table 1, ShapeNet: MLP 30,196, MLP-Asym 27,226 (= 30,196 - 3 hidden x 99 rows x 10)
    assert make_field("fourier", "shapenet").layout.size == 30_196
    assert make_field("fourier", "shapenet", asym=True).layout.size == 27_226
    # the masks of a warm-started decoder: 3 hidden layers x 128 rows x ceil(sqrt(128)) = 12
    assert make_field("mlp", "decoder54k", asym=True).layout.size == 54_785 - 3 * 128 * 12


def test_mlp_forward_equals_a_plain_module_loaded_from_the_row():
    field = make_field("mlp", "decoder54k")
    rows = field.init_rows(2, torch.Generator().manual_seed(0))
    x = torch.rand(2, 100, 3) * 2 - 1
    out = field.forward(field.layout.unflatten(rows), x)
    dims = [39, 128, 128, 128, 128, 1]
    for b in range(2):
        layers = []
        for i, (d_in, d_out) in enumerate(zip(dims, dims[1:])):
            layers += [torch.nn.Linear(d_in, d_out), torch.nn.ReLU()]
        net = torch.nn.Sequential(*layers[:-1])
        state = {f"{2 * i}.{kind}": v[b] for name, v in field.layout.unflatten(rows).items()
                 for i, kind in [(int(name[1:name.index(".")]), name.split(".")[1])]}
        net.load_state_dict(state)
        torch.testing.assert_close(out[b], net(positional_encoding(x[b], 6)).squeeze(-1), rtol=1e-5, atol=1e-6)


def test_fourier_forward_is_sin_then_relu_layers():
    field = make_field("fourier", "tiny")  # one hidden layer
    rows = field.init_rows(1, torch.Generator().manual_seed(1))
    p = field.layout.unflatten(rows)
    x = torch.rand(1, 7, 3)
    h = torch.sin(field.omega * (x[0] @ p["l0.weight"][0].T + p["l0.bias"][0]))
    h = torch.relu(h @ p["l1.weight"][0].T + p["l1.bias"][0])
    expected = (h @ p["l2.weight"][0].T + p["l2.bias"][0]).squeeze(-1)
    torch.testing.assert_close(field.forward(p, x)[0], expected)


def test_init_is_seeded_and_follows_linear_default():
    field = make_field("mlp", "tiny")
    a = field.init_rows(4, torch.Generator().manual_seed(7))
    assert torch.equal(a, field.init_rows(4, torch.Generator().manual_seed(7)))
    assert not torch.equal(a[0], a[1])
    w = field.layout.unflatten(a)["l1.weight"]  # fan-in 32: U(-1/sqrt(32), 1/sqrt(32))
    assert w.abs().max() <= 1 / math.sqrt(32) and w.abs().max() > 0.9 / math.sqrt(32)


def test_positional_encoding_bands():
    x = torch.tensor([[0.5, -0.25, 1.0]])
    pe = positional_encoding(x, 2)
    assert pe.shape == (1, 15)
    torch.testing.assert_close(pe[0, :3], x[0])
    torch.testing.assert_close(pe[0, 3:9], torch.sin(torch.stack([x[0], 2 * x[0]], -1).flatten()))


def test_unknown_types_presets_and_bad_rows_are_clear_errors():
    with pytest.raises(FieldError, match="unknown field type 'siren'"):
        make_field("siren", "tiny")
    with pytest.raises(FieldError, match="unknown preset 'huge' of field type 'mlp'"):
        make_field("mlp", "huge")
    field = make_field("mlp", "tiny")
    with pytest.raises(LayoutError, match=f"has {field.layout.size} values, got 10"):
        field.layout.unflatten(torch.zeros(2, 10))
    with pytest.raises(LayoutError, match="missing"):
        field.layout.flatten({})


# ------------------------------------------------------------------------------------ asymmetric masks

@pytest.mark.parametrize("type_name,preset", ALL)
def test_asym_layout_holds_trainable_entries_only_and_round_trips(type_name, preset):
    plain, field = make_field(type_name, preset), make_field(type_name, preset, asym=True, kappa=2.0)
    frozen = sum(m.fixed.numel() for m in field.masks.values())
    assert field.layout.size == plain.layout.size - frozen > 0
    weights = [name for name, shape in plain.layout.entries if name.endswith(".weight")]
    assert sorted(field.masks) == sorted(weights[1:-1])  # the hidden layers: not the input, not the output
    for name, shape in plain.layout.entries:
        if name in field.masks:
            d_out, d_in = shape
            assert field.masks[name].fixed.shape == (d_out, min(math.ceil(math.sqrt(d_out)), d_in - 1))
            assert dict(field.layout.entries)[f"{name}_free"] == (d_out, d_in - field.masks[name].fixed.shape[1])
        else:
            assert dict(field.layout.entries)[name] == shape  # unmasked entries stay whole
    rows = torch.randn(2, field.layout.size)
    assert torch.equal(field.layout.flatten(field.layout.unflatten(rows)), rows)
    full = field.full(field.layout.unflatten(rows))
    for name, mask in field.masks.items():  # frozen entries at their positions, the row everywhere else
        assert torch.equal(full[name].gather(2, mask.fixed.expand(2, -1, -1)), mask.values.expand(2, -1, -1))
        assert torch.equal(full[name].gather(2, mask.free.expand(2, -1, -1)),
                           field.layout.unflatten(rows)[f"{name}_free"])
    x = torch.rand(2, 9, 3)
    torch.testing.assert_close(field.forward(field.layout.unflatten(rows), x), plain.forward(full, x))


def test_asym_masks_are_seeded_and_scaled_by_kappa():
    a = make_field("mlp", "decoder54k", asym=True, kappa=4.0, mask_seed=3)
    b = make_field("mlp", "decoder54k", asym=True, kappa=4.0, mask_seed=3)
    c = make_field("mlp", "decoder54k", asym=True, kappa=4.0, mask_seed=4)
    assert a.frozen_fingerprint() == b.frozen_fingerprint() != c.frozen_fingerprint()
    assert torch.equal(a.masks["l1.weight"].fixed, b.masks["l1.weight"].fixed)
    # 128 rows x 12 frozen entries: std sqrt(kappa) x that of U(-1/sqrt(128), 1/sqrt(128))
    values = a.masks["l1.weight"].values
    assert values.std().item() == pytest.approx(math.sqrt(4.0 / (3 * 128)), rel=0.1)
    assert a.frozen_fingerprint() != make_field("mlp", "decoder54k").frozen_fingerprint()


def test_fitting_never_moves_frozen_entries():
    import numpy as np

    from raywsl.config import FitConfig
    from raywsl.fit.engine import BatchedFitter, ShapeData

    field = make_field("mlp", "tiny", asym=True, kappa=2.0)
    rng = np.random.default_rng(0)
    points = rng.uniform(-1, 1, (2048, 3)).astype(np.float32)
    shape = ShapeData(0, "s", points, (np.linalg.norm(points, axis=1) - 0.5).astype(np.float32),
                      field.init_rows(1, torch.Generator().manual_seed(0))[0])
    (result,) = BatchedFitter(field, FitConfig(steps=100, batch_size=1, points_per_step=512, check_every=25),
                              "cpu").fit([shape])
    assert result.ok and result.curve[-1] < 0.5 * result.curve[0]
    full = field.full(field.layout.unflatten(torch.from_numpy(result.row)[None]))
    for name, mask in field.masks.items():
        assert torch.equal(full[name][0].gather(1, mask.fixed), mask.values)
