"""Field types: exact row layouts, batched forwards that match plain torch modules, presets."""

import math

import pytest
import torch

from raywsl.fit.fields import FIELDS, FieldError, Layout, make_field, positional_encoding

ALL = [(t, p) for t, cls in sorted(FIELDS.items()) for p in sorted(cls.PRESETS)]


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
    assert make_field("fourier", "shapenet").layout.size == 3 * 99 + 99 + 99 * 99 + 99 + 99 + 1


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


def test_fourier_forward_is_sin_then_two_linear_layers():
    field = make_field("fourier", "tiny")
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
    with pytest.raises(FieldError, match=f"has {field.layout.size} values, got 10"):
        field.layout.unflatten(torch.zeros(2, 10))
    with pytest.raises(FieldError, match="missing"):
        field.layout.flatten({})
