"""The batched fitter: equal to fitting alone, continuous batching, divergence, schedules, losses."""

import math

import numpy as np
import pytest
import torch

from raywsl.config import FitConfig
from raywsl.fit import engine
from raywsl.fit.engine import BatchedFitter, ShapeData
from raywsl.models.fields import MLPField, make_field
from raywsl.fit.reference import fit_one

FIELD = make_field("mlp", "tiny")
INIT = FIELD.init_rows(1, torch.Generator().manual_seed(0))[0]


def sphere(key: int, radius: float, n: int = 4096, nan: bool = False) -> ShapeData:
    rng = np.random.default_rng(key)
    points = rng.uniform(-1, 1, (n, 3)).astype(np.float32)
    sdf = (np.linalg.norm(points, axis=1) - radius).astype(np.float32)
    if nan:
        sdf[::7] = np.nan
    return ShapeData(key, f"sphere-{key}", points, sdf, INIT)


def settings(**kw) -> FitConfig:
    base = dict(steps=100, batch_size=4, points_per_step=512, check_every=25)
    return FitConfig(**{**base, **kw})


def run(shapes, cfg, field=FIELD):
    return {r.key: r for r in BatchedFitter(field, cfg, "cpu").fit(shapes)}


def test_batched_equals_fitting_alone():
    shapes = [sphere(i, 0.3 + 0.1 * i) for i in range(5)]
    cfg = settings(steps=20, check_every=10)
    batched = run(shapes, cfg)
    alone = {s.key: run([s], settings(steps=20, check_every=10, batch_size=1))[s.key] for s in shapes}
    reference = {s.key: fit_one(FIELD, s, cfg) for s in shapes}
    for s in shapes:
        # Equal up to float32 rounding (batched matmuls sum in another order), which Adam's
        # normalised steps carry to ~1 % of one step (lr 1e-2) after 20 steps.
        np.testing.assert_allclose(batched[s.key].row, alone[s.key].row, rtol=0, atol=1e-4)
        # the plain nn.Parameter + torch.optim.Adam loop: same Adam, schedule and point windows
        np.testing.assert_allclose(batched[s.key].row, reference[s.key].row, rtol=0, atol=1e-4)
        assert batched[s.key].loss == pytest.approx(reference[s.key].loss, rel=1e-4)
        assert batched[s.key].steps == 20


def test_fitting_converges_to_a_small_loss():
    (result,) = run([sphere(0, 0.5)], settings(steps=300, points_per_step=1024)).values()
    initial = np.abs(FIELD.bind(INIT[None])(torch.from_numpy(sphere(0, 0.5).points)[None]).detach().numpy()
                     - sphere(0, 0.5).sdf).mean()
    assert result.ok and result.loss < 0.03 < initial
    assert len(result.curve) == 300 // 25 and result.curve[-1] < result.curve[0]


def test_continuous_batching_refills_slots_of_finished_shapes(monkeypatch):
    """One hard shape runs to the step limit while easy ones stop at the target loss: finished
    shapes hand their slot to the next one, so the whole run takes about as many steps as the
    hard shape alone, not the sum."""
    steps_taken = []
    original = BatchedFitter._step
    monkeypatch.setattr(BatchedFitter, "_step", lambda self: (steps_taken.append(1), original(self))[1])
    hard = sphere(0, 0.4)
    hard.sdf = np.random.default_rng(0).uniform(-0.5, 0.5, hard.sdf.shape).astype(np.float32)  # noise: L1 >= ~0.25
    easy = [sphere(i, 0.5) for i in range(1, 7)]
    cfg = settings(batch_size=2, steps=400, lr=1e-2, target_loss=0.05, points_per_step=512)
    results = list(BatchedFitter(FIELD, cfg, "cpu").fit([hard, *easy]))
    by_key = {r.key: r for r in results}
    assert results[-1].key == 0 and by_key[0].steps == 400  # the hard shape finishes last, at the limit
    assert all(by_key[i].steps < 400 and by_key[i].loss <= 0.05 for i in range(1, 7))
    # The six easy shapes went through the second slot one after another while the hard one ran:
    # 400 steps in all, where static batches of two would take 400 + 3 x (easy shape's steps).
    assert sum(by_key[i].steps for i in range(2, 7)) < 400
    assert len(steps_taken) == 400


class FragileMLP(MLPField):
    """Divergence injection: the output turns NaN once any weight leaves [-3, 3] (a high learning
    rate gets there in a few steps, a low one never does)."""

    def forward(self, params, x):
        out = super().forward(params, x)
        blown = torch.stack([p.flatten(1).abs().amax(1) for p in params.values()], 1).amax(1) > 3
        return torch.where(blown.unsqueeze(1), torch.full_like(out, math.nan), out)


def test_divergence_restarts_at_a_lower_lr_then_fails_and_leaves_others_untouched():
    fragile = FragileMLP(**MLPField.PRESETS["tiny"])
    good, bad = sphere(1, 0.4), sphere(2, 0.5, nan=True)
    cfg = settings(lr=1.0, lr_end=1e-3, lr_backoff=0.01, max_restarts=2)
    results = run([good, bad], cfg, fragile)
    # lr 1 blows the weights up; the restart at lr 0.01 fits
    assert results[1].ok and results[1].restarts == 1 and results[1].loss < 0.1
    # NaN targets never give a finite loss: restarted twice, then failed with the reason
    assert not results[2].ok and results[2].restarts == 2 and results[2].row is None
    assert "diverged" in results[2].reason and "non-finite" in results[2].reason
    alone = run([good], cfg, fragile)[1]
    np.testing.assert_allclose(results[1].row, alone.row, rtol=0, atol=1e-4)


class SilentNaNMLP(MLPField):
    """Weights that turn NaN while the loss stays finite, for shapes whose points reach beyond |x| = 2
    (the marker): their output bias is never read (a constant stands in), and an unselected
    torch.where branch sqrt(b - b) gives it the gradient 0 x inf = NaN (the where-gradient trap).
    A fitter that judged the loss alone would report such a shape ok, with a NaN row."""

    def forward(self, params, x):
        marked = (x.abs().flatten(1).amax(1) > 2).unsqueeze(1)  # (B, 1)
        bias = params["l2.bias"]  # (B, 1)
        trap = torch.sqrt(bias - bias + (~marked).to(bias.dtype))  # sqrt(0) where marked: infinite slope
        always = torch.ones_like(marked)
        out = super().forward({**params, "l2.bias": torch.where(marked, torch.zeros_like(bias), bias)}, x)
        return out + torch.where(always, torch.zeros_like(trap), trap)  # adds 0; its gradient carries the NaN


def test_a_shape_with_finite_loss_but_non_finite_weights_fails_and_the_batch_goes_on():
    silent = SilentNaNMLP(**MLPField.PRESETS["tiny"])
    poisoned = sphere(3, 0.5)
    poisoned.points = poisoned.points * 3  # the marker: points out to |x| = 3
    poisoned.sdf = np.linalg.norm(poisoned.points, axis=1).astype(np.float32) - 1.5
    good = [sphere(1, 0.4), sphere(2, 0.5)]
    cfg = settings(max_restarts=1)
    results = run([good[0], poisoned, good[1]], cfg, silent)
    bad = results[3]
    assert not bad.ok and bad.row is None and bad.restarts == 1
    assert bad.reason.startswith("diverged: non-finite weights at step 25"), bad.reason
    assert math.isfinite(bad.loss)  # the loss alone never said so
    for shape in good:  # the shapes sharing its batch fit to the end, finite, as they fit alone
        result = results[shape.key]
        assert result.ok and result.steps == 100 and np.isfinite(result.row).all() and result.loss < 0.1
        np.testing.assert_allclose(result.row, run([shape], cfg, silent)[shape.key].row, rtol=0, atol=1e-4)


def test_a_result_with_a_non_finite_row_is_never_ok():
    row = np.ones(FIELD.layout.size, np.float32)
    assert engine.FitResult(0, "a", row.copy(), 0.1, 100).ok
    row[5] = np.inf
    result = engine.FitResult(0, "a", row, 0.1, 100)
    assert not result.ok and result.row is None and result.reason == "diverged: non-finite weights at step 100"


def test_plateau_stops_a_shape_early():
    flat = sphere(0, 0.4)
    flat.sdf[:] = 0.25  # a constant is learnt at once; the loss then stops improving
    (result,) = run([flat], settings(steps=2000, patience=100, lr=1e-3, schedule="constant")).values()
    assert result.ok and result.steps < 2000


@pytest.mark.parametrize("schedule", ["exp", "cosine", "constant"])
def test_schedules_start_at_lr_and_end_at_lr_end(schedule):
    u = torch.tensor([1e-9, 0.5, 1.0])
    f = engine.SCHEDULES[schedule](u, 1e-3)
    assert f[0] == pytest.approx(1.0, rel=1e-6)
    assert f[2] == pytest.approx(1.0 if schedule == "constant" else 1e-3, rel=1e-5)
    assert f[1] == pytest.approx({"exp": math.sqrt(1e-3), "cosine": (1 + 1e-3) / 2, "constant": 1.0}[schedule])


@pytest.mark.parametrize("loss", ["l1", "clamped_l1", "mse", "bce"])
def test_every_loss_fits_a_sphere(loss):
    shape = sphere(0, 0.5)
    (result,) = run([shape], settings(steps=150, loss=loss)).values()
    assert result.ok and result.curve[-1] < 0.75 * result.curve[0]
    if loss == "bce":  # occupancy: the logits' sign must match inside / outside on most points
        logits = FIELD.bind(torch.from_numpy(result.row)[None])(torch.from_numpy(shape.points)[None])[0]
        assert ((logits.detach().numpy() > 0) == (shape.sdf < 0)).mean() > 0.9


def test_shapes_with_other_sample_counts_are_refused():
    with pytest.raises(ValueError, match="sphere-1: 100 SDF samples"):
        run([sphere(0, 0.4), sphere(1, 0.4, n=100)], settings())


def test_compiled_step_equals_eager_through_refills_and_shrinking():
    """fit.compile: the whole step is one torch.compile graph; it must fit what eager fits, also
    when slots are refilled and the batch shrinks at the tail (a new batch size)."""
    shapes = [sphere(i, 0.3 + 0.05 * i) for i in range(7)]
    eager = run(shapes, settings(batch_size=4, steps=60, check_every=20))
    compiled = run(shapes, settings(batch_size=4, steps=60, check_every=20, compile=True))
    for key, result in eager.items():
        np.testing.assert_allclose(compiled[key].row, result.row, rtol=0, atol=1e-6)
        assert compiled[key].steps == result.steps == 60


def test_a_fitted_torus_reconstructs_with_small_chamfer():
    """Fit the `small` MLP to a torus' exact SDF, extract its mesh, compare with the true surface."""
    from raywsl.geometry.distances import chamfer
    from raywsl.geometry.extract import extract_mesh
    from raywsl.geometry.topology import topology

    rng = np.random.default_rng(0)
    big, small = 0.55, 0.2

    def torus_sdf(p):
        q = np.stack([np.linalg.norm(p[:, :2], axis=1) - big, p[:, 2]], 1)
        return np.linalg.norm(q, axis=1) - small

    near = rng.uniform(-1, 1, (60000, 3))
    near = near[np.abs(torus_sdf(near)) < 0.1][:15000]
    points = np.concatenate([rng.uniform(-1, 1, (15000, 3)), near + rng.normal(0, 0.01, near.shape)])
    field = make_field("mlp", "small")
    shape = ShapeData(0, "torus", points.astype(np.float32), torus_sdf(points).astype(np.float32),
                      field.init_rows(1, torch.Generator().manual_seed(0))[0])
    (result,) = run([shape], settings(steps=600, points_per_step=2048, check_every=50), field).values()
    with torch.no_grad():
        ex = extract_mesh(lambda p: field.bind(torch.from_numpy(result.row)[None])(p[None])[0], 64, device="cpu")
    assert ex.mesh is not None
    theta, phi = rng.uniform(0, 2 * np.pi, (2, 4096))
    truth = np.stack([(big + small * np.cos(phi)) * np.cos(theta), (big + small * np.cos(phi)) * np.sin(theta),
                      small * np.sin(phi)], 1)
    assert chamfer(ex.mesh.sample(4096), truth) < 2e-3
    assert topology(ex.mesh)["genus"] == 1
