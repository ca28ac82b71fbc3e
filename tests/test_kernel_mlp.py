"""The fused fitting kernel (raywsl/kernels/mlp.py) against the torch path: gradients, losses, a whole
fit through the engine, and the refusals. Without a GPU these run in Triton's interpreter (conftest)
at tiny sizes; with one, compiled."""

import numpy as np
import pytest
import torch

from raywsl import kernels
from raywsl.config import ConfigError, FitConfig, load_config
from raywsl.fit.engine import BatchedFitter, ShapeData
from raywsl.kernels.mlp import MLPSpec, Tuning, loss_and_grad
from raywsl.models.fields import make_field
from raywsl.models.losses import LOSSES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def spec_of(field, loss="l1", half=False) -> MLPSpec:
    c = field.config
    return MLPSpec(c["bands"], c["hidden"], c["layers"], loss, 0.1, half)


def batch(field, b: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows = field.init_rows(b, g)
    x = torch.rand(b, k, 3, generator=g) * 2 - 1
    y = x.norm(dim=2) - torch.rand(b, 1, generator=g) * 0.3 - 0.3  # spheres of radius 0.3-0.6
    return rows.to(DEVICE), x.to(DEVICE), y.to(DEVICE)


def torch_loss_and_grad(field, loss, rows, x, y):
    def total(r):
        per = LOSSES[loss](field.forward(field.layout.unflatten(r), x), y, 0.1).mean(1)
        return per.sum(), per.detach()
    return torch.func.grad(total, has_aux=True)(rows)


@pytest.mark.parametrize("preset,loss,layers", [("tiny", "l1", 2), ("tiny", "clamped_l1", 2), ("small", "mse", 3),
                                                ("tiny", "bce", 2), ("decoder54k", "l1", 4), ("tiny", "l1", 1)])
def test_gradient_and_losses_equal_autograd(preset, loss, layers):
    # 70 points: a partial last block of BM = 64. decoder54k: 39 encoded inputs padded to 64, H = 128.
    field = make_field("mlp", preset, layers=layers)
    rows, x, y = batch(field, 3, 70)
    grad, per_shape = torch_loss_and_grad(field, loss, rows, x, y)
    fused_grad, fused_per_shape = loss_and_grad(rows, x, y, spec_of(field, loss))
    assert fused_grad.shape == grad.shape == (3, field.layout.size)
    torch.testing.assert_close(fused_per_shape, per_shape, rtol=1e-5, atol=1e-7)
    scale = grad.abs().amax(1, keepdim=True)
    assert ((fused_grad - grad).abs() / scale).max() < 1e-5  # every entry, the output layer's included
    assert (grad != 0).any(1).all()


def test_block_size_changes_nothing_but_rounding():
    field = make_field("mlp", "tiny")
    rows, x, y = batch(field, 2, 100, seed=1)
    a, la = loss_and_grad(rows, x, y, spec_of(field), Tuning(block_points=32, block_k=16))
    b, lb = loss_and_grad(rows, x, y, spec_of(field), Tuning(block_points=128, block_k=64))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(la, lb)


def test_bf16_path_stays_close_to_fp32():
    # bf16 matmul inputs with fp32 accumulation: each product carries ~2^-9 relative rounding.
    field = make_field("mlp", "small")
    rows, x, y = batch(field, 2, 200, seed=2)
    grad, per_shape = torch_loss_and_grad(field, "mse", rows, x, y)
    half_grad, half_per_shape = loss_and_grad(rows, x, y, spec_of(field, "mse", half=True))
    assert ((half_per_shape - per_shape).abs() / per_shape).max() < 1e-2
    assert (half_grad - grad).norm() / grad.norm() < 3e-2
    assert torch.nn.functional.cosine_similarity(half_grad, grad).min() > 0.999


def sphere(key: int, radius: float, init: torch.Tensor, n: int = 256) -> ShapeData:
    rng = np.random.default_rng(key)
    points = rng.uniform(-1, 1, (n, 3)).astype(np.float32)
    return ShapeData(key, f"sphere-{key}", points, (np.linalg.norm(points, axis=1) - radius).astype(np.float32), init)


def test_a_fit_with_the_fused_kernel_follows_the_torch_fit():
    # Three shapes in two slots (a refill), 30 Adam steps: the same rows up to float rounding carried by Adam.
    field = make_field("mlp", "tiny")
    init = field.init_rows(1, torch.Generator().manual_seed(0))[0]
    shapes = [sphere(i, 0.3 + 0.1 * i, init) for i in range(3)]
    cfg = dict(steps=30, batch_size=2, points_per_step=64, check_every=10)
    fits = {kernel: {r.key: r for r in BatchedFitter(field, FitConfig(kernel=kernel, **cfg), DEVICE).fit(shapes)}
            for kernel in ("torch", "triton")}
    for key in range(3):
        torch_fit, fused_fit = fits["torch"][key], fits["triton"][key]
        assert fused_fit.ok and fused_fit.steps == torch_fit.steps == 30
        np.testing.assert_allclose(fused_fit.row, torch_fit.row, rtol=0, atol=1e-4)
        np.testing.assert_allclose(fused_fit.curve, torch_fit.curve, rtol=1e-4)
        assert fused_fit.curve[-1] < fused_fit.curve[0]


def test_mismatched_inputs_are_refused_with_their_shapes():
    field = make_field("mlp", "tiny")
    rows, x, y = batch(field, 2, 16)
    with pytest.raises(ValueError, match="rows have 1600 parameters; .* has 1601"):
        loss_and_grad(rows[:, :-1], x, y, spec_of(field))
    with pytest.raises(ValueError, match=r"points \(2, 16, 3\) and targets \(2, 15\)"):
        loss_and_grad(rows, x, y[:, :-1], spec_of(field))
    with pytest.raises(ValueError, match="hidden width 48 must be a power of two"):
        MLPSpec(2, 48, 2).validate()


def test_the_kernel_is_refused_where_it_cannot_run(monkeypatch):
    monkeypatch.setenv(kernels.INTERPRET, "0")
    with pytest.raises(kernels.KernelUnavailable, match="run on a CUDA device, not on cpu"):
        kernels.check("cpu", "fit.kernel=triton")
    with pytest.raises(kernels.KernelUnavailable, match="fit.kernel=triton"):
        BatchedFitter(make_field("mlp", "tiny"), FitConfig(kernel="triton"), "cpu")
    # The config refuses it without a GPU, and for the field types it does not compute.
    with pytest.raises(ConfigError, match="scaling.use_gpu=true for the fused kernel"):
        load_config(overrides=["fit.kernel=triton"])
    monkeypatch.setenv(kernels.INTERPRET, "1")
    with pytest.raises(ConfigError, match="fit.kernel.*torch for field.type lora"):
        load_config(overrides=["fit.kernel=triton", "field.type=lora"])
    with pytest.raises(ConfigError, match="with field.asym"):
        load_config(overrides=["fit.kernel=triton", "field.asym=true"])
    assert load_config(overrides=["fit.kernel=triton", "scaling.use_gpu=true"]).fit.kernel == "triton"
