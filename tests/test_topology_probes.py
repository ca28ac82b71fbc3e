"""The topology probes' pieces that need no run folder: the study's point clouds and paths, the
transition figures of a path's counts, the PCA subspace's sampling, intervals, CSV cells. The probes on
a fitted store are in tests/test_probe.py (its fitted fixture)."""

import math

import numpy as np
import pytest

from raywsl.probes.common import csv_text, interval
from raywsl.probes.phase import PhaseSettings, ProbeError, fibonacci_sphere, noisy_sphere, slerp, transition
from raywsl.probes.subspace import Subspace, SubspaceSettings


def test_fibonacci_sphere_is_even_and_on_the_sphere():
    a = fibonacci_sphere(1000, 0.6)
    assert a.shape == (1000, 3) and np.allclose(np.linalg.norm(a, axis=1), 0.6, atol=1e-6)
    assert np.allclose(a.mean(0), 0, atol=2e-3)  # balanced
    d = np.linalg.norm(a[:, None] - a[None], axis=2) + np.eye(1000) * 9
    nearest = d.min(1)
    # even: every point's nearest neighbour at about the same distance (a random draw spreads 0.1x-2x)
    assert nearest.max() / nearest.min() < 1.6


def test_noisy_sphere_stays_on_the_sphere_and_is_uneven():
    a = fibonacci_sphere(1000, 0.6)
    b = noisy_sphere(a, 0.3, np.random.default_rng(0))
    assert np.allclose(np.linalg.norm(b, axis=1), 0.6, atol=1e-5)
    spread = lambda c: np.sort(np.linalg.norm(c[:, None] - c[None], axis=2), axis=1)[:, 1]  # noqa: E731
    assert spread(b).std() > 3 * spread(a).std()


def test_slerp_keeps_the_radius_and_ends_at_both_clouds():
    rng = np.random.default_rng(1)
    a = fibonacci_sphere(200, 0.6)
    b = noisy_sphere(a, 0.5, rng)
    b[0] = a[0]  # one point that does not move: the linear fallback
    assert np.allclose(slerp(a, b, 0.0), a, atol=1e-6) and np.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    mid = slerp(a, b, 0.5)
    assert np.allclose(np.linalg.norm(mid, axis=1), 0.6, atol=1e-5) and np.allclose(mid[0], a[0])
    # halfway along the great circle: equal angles to both ends
    cos = lambda u, v: (u * v).sum(1) / 0.36  # noqa: E731
    assert np.allclose(cos(mid, a), cos(mid, b), atol=1e-5)


def test_transition_figures_of_a_path():
    alphas = np.linspace(0, 1, 11)
    clean = transition(alphas, [1, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3])
    assert clean == {"start": 1, "end": 3, "max": 3, "changes": 1, "alpha_star": 0.4, "width": pytest.approx(0.1)}
    stairs = transition(alphas, [1, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3])
    assert (stairs["alpha_star"], stairs["width"], stairs["changes"]) == (pytest.approx(0.3), pytest.approx(0.3), 2)
    flicker = transition(alphas, [1, 1, 2, 1, 2, 1, 1, 1, 1, 1, 1])  # comes back: end = start
    assert (flicker["alpha_star"], flicker["width"], flicker["end"]) == (pytest.approx(0.2), pytest.approx(0.4), 1)
    flat = transition(alphas, [1] * 11)
    assert math.isnan(flat["alpha_star"]) and math.isnan(flat["width"]) and flat["changes"] == 0


def test_subspace_samples_lie_in_the_top_directions_with_the_set_s_spread():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6)) * [5, 3, 1, 0.5, 0.1, 0.05] + 7
    pca = Subspace.of(x)
    assert np.allclose(pca.directions @ pca.directions.T, np.eye(6), atol=1e-10)
    assert np.allclose(pca.std, (x - x.mean(0)).std(0, ddof=1)[np.argsort(-x.std(0))], rtol=0.3)
    s = pca.sample(2, 2.0, 20000, np.random.default_rng(1))
    coords = (s - pca.mean) @ pca.directions.T
    assert np.allclose(coords[:, 2:], 0, atol=1e-9)  # nothing outside the top 2
    assert np.allclose(coords[:, :2].std(0), 2.0 * pca.std[:2], rtol=0.03)  # radius x the set's std
    path = pca.path(x[0], x[1], 6, 5)  # all directions: the path runs exactly from x0 to x1
    assert np.allclose(path[0], x[0]) and np.allclose(path[-1], x[1]) and np.allclose(path[2], (x[0] + x[1]) / 2)


def test_interval_and_csv_cells():
    assert interval([0.4, 0.5, 0.6]) == pytest.approx({"mean": 0.5, "lo": 0.5 - 0.2484, "hi": 0.5 + 0.2484, "n": 3},
                                                      abs=1e-4)
    assert interval([0.3, math.nan]) == {"mean": 0.3, "lo": 0.3, "hi": 0.3, "n": 1}
    assert interval([math.nan])["n"] == 0 and math.isnan(interval([])["mean"])
    assert csv_text([{"a": 1, "b": math.nan}, {"a": None, "c": 0.123456789}]) == "a,b,c\n1,,\n,,0.123457\n"


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ProbeError, match="--space weights needs --from and --to"):
        PhaseSettings(space="weights").check()
    with pytest.raises(ProbeError, match="--from and --to go together"):
        PhaseSettings(start="blob").check()
    with pytest.raises(ProbeError, match="--encoders 2: at least 1, and more only with --space cloud"):
        PhaseSettings(space="weights", start="a", end="b", encoders=2).check()
    with pytest.raises(ProbeError, match="--radius in"):
        PhaseSettings(radius=0.0).check()
    with pytest.raises(ProbeError, match="--space 'latent'"):
        SubspaceSettings(space="latent").check()
    with pytest.raises(ProbeError, match="--radii"):
        SubspaceSettings(radii=(0.0,)).check()
