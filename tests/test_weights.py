"""Weight-space diagnostics against brute-force definitions and constructed cases."""

from __future__ import annotations

import numpy as np
import pytest

from raywsl.eval import weights


def brute_cosines(W):
    X = W / np.linalg.norm(W, axis=1, keepdims=True)
    S = X @ X.T
    return S[np.triu_indices(len(W), k=1)]


def test_cosine_stats_match_brute_force_and_blocking():
    rng = np.random.default_rng(0)
    # A thin shell like warm-started weights: a shared mean plus small per-row variation.
    W = rng.normal(size=64) + 0.3 * rng.normal(size=(301, 64))
    ref = brute_cosines(W)
    for block in (2048, 37):  # one block, and many blocks with a ragged last one
        s = weights.cosine_stats(W, block=block)
        assert s["pairs"] == len(ref) and not s["pairs_subsampled"]
        for name, value in [("mean", ref.mean()), ("std", ref.std()), ("min", ref.min()), ("max", ref.max())]:
            assert s[name] == pytest.approx(value, abs=1e-12), name
        assert s["median"] == pytest.approx(np.median(ref), abs=1e-5)  # histogram median, bins of 2e-6
    mean = W.mean(axis=0)
    cos_to_mean = W @ mean / (np.linalg.norm(W, axis=1) * np.linalg.norm(mean))
    np.testing.assert_allclose(s["cos_to_mean"], cos_to_mean)
    assert s["most_central"][0] == np.argmax(cos_to_mean)
    assert s["norm_mean"] == pytest.approx(np.linalg.norm(W, axis=1).mean())


def test_cosine_stats_float32_and_subsampling():
    rng = np.random.default_rng(1)
    W = (1.0 + 0.1 * rng.normal(size=(500, 32))).astype(np.float32)
    full = weights.cosine_stats(W)
    assert full["mean"] == pytest.approx(brute_cosines(W.astype(np.float64)).mean(), abs=1e-6)
    sub = weights.cosine_stats(W, max_rows=200, seed=3)
    assert sub["pairs_subsampled"] and sub["pairs"] == 200 * 199 // 2
    assert sub["mean"] == pytest.approx(full["mean"], abs=2e-3)
    again = weights.cosine_stats(W, max_rows=200, seed=3)  # deterministic given seed
    assert [sub[k] for k in ("mean", "std", "median")] == [again[k] for k in ("mean", "std", "median")]


def test_pca_spectrum_recovers_known_variances():
    rng = np.random.default_rng(0)
    n, p = 4000, 60
    stds = np.array([5.0, 3.0, 1.0] + [0.1] * (p - 3))
    basis, _ = np.linalg.qr(rng.normal(size=(p, p)))  # hide the structure in a random rotation
    W = 7.0 + (rng.normal(size=(n, p)) * stds) @ basis.T
    expected = stds**2 / (stds**2).sum()
    exact = weights.pca_spectrum(W, k=5)
    randomised = weights.pca_spectrum(W, k=5, exact_max=10)
    assert exact["exact"] and not randomised["exact"]
    for s in (exact, randomised):
        np.testing.assert_allclose(s["explained_ratio"][:3], expected[:3], rtol=0.05)
        np.testing.assert_allclose(s["cumulative"], np.cumsum(s["explained_ratio"]))
    np.testing.assert_allclose(randomised["explained_ratio"][:3], exact["explained_ratio"][:3], rtol=1e-3)
    assert len(weights.pca_spectrum(W[:3], k=10)["explained_ratio"]) == 3


def test_top_dims_variance():
    W = np.random.default_rng(0).normal(size=(2000, 4)) * np.array([1.0, 2.0, 0.0, 1.0])
    s = weights.top_dims_variance(W, ks=(1, 2, 10))
    assert s["share"][1] == pytest.approx(4 / 6, abs=0.02)
    assert s["share"][2] == pytest.approx(5 / 6, abs=0.02)
    assert s["share"][10] == pytest.approx(1.0)


def test_nearest_training_detects_attractors():
    rng = np.random.default_rng(0)
    training = rng.normal(size=(20, 50))
    sources = rng.choice([3, 11], size=40)
    generated = training[sources] + 0.01 * rng.normal(size=(40, 50))
    r = weights.nearest_training(generated, training, top_k=3, attractor_k=2)
    assert r["attractor_share"] == 1.0 and r["distinct_nearest"] == 2
    assert set(r["attractors"].tolist()) == {3, 11}
    np.testing.assert_array_equal(r["cos_index"][:, 0], sources)
    np.testing.assert_array_equal(r["l2_index"][:, 0], sources)
    assert r["cos_l2_agreement"] == 1.0 and (r["cos_margin"] > 0.5).all()
    assert weights.nearest_training(generated, training, attractor_k=1)["attractor_share"] == pytest.approx(
        np.bincount(sources).max() / 40)


def test_nearest_training_matches_brute_force_in_chunks(monkeypatch):
    rng = np.random.default_rng(2)
    generated, training = rng.normal(size=(33, 16)), rng.normal(size=(50, 16))
    monkeypatch.setattr(weights, "CHUNK_ELEMENTS", 100)  # forces chunks of 2 generated rows
    r = weights.nearest_training(generated, training, top_k=4)
    cos = (generated / np.linalg.norm(generated, axis=1, keepdims=True)) @ (
        training / np.linalg.norm(training, axis=1, keepdims=True)).T
    dist = np.linalg.norm(generated[:, None] - training[None], axis=2)
    np.testing.assert_array_equal(r["cos_index"], np.argsort(-cos, axis=1)[:, :4])
    np.testing.assert_allclose(r["cos_sim"], -np.sort(-cos, axis=1)[:, :4])
    np.testing.assert_array_equal(r["l2_index"], np.argsort(dist, axis=1)[:, :4])
    np.testing.assert_allclose(r["l2_dist"], np.sort(dist, axis=1)[:, :4])
    np.testing.assert_allclose(r["cos_margin"], r["cos_sim"][:, 0] - r["cos_sim"][:, 1])


def test_nearest_training_l2_is_exact_for_near_copies():
    rng = np.random.default_rng(3)
    training = (100.0 + rng.normal(size=(5, 2000))).astype(np.float32)  # large norms, tiny differences
    generated = training[[1]] + np.float32(1e-3)
    r = weights.nearest_training(generated, training, top_k=2)
    assert r["l2_index"][0, 0] == 1
    assert r["l2_dist"][0, 0] == pytest.approx(1e-3 * np.sqrt(2000), rel=1e-3)


def clusters(rng, n_per_class=30, k=4, dim=40):
    centres = 10.0 * rng.normal(size=(k, dim))
    labels = np.repeat(np.arange(k), n_per_class)
    return centres[labels] + rng.normal(size=(len(labels), dim)), labels


def test_probes_separate_clusters_and_not_noise():
    rng = np.random.default_rng(0)
    W, labels = clusters(rng)
    names = np.array(["chair", "table", "lamp", "mug"])[labels]  # labels may be strings
    p = weights.probes(W, names)
    assert p["classes"] == 4 and p["logistic_folds"] == 5 and p["chance"] == 0.25
    assert p["nn_accuracy"] == 1.0 and p["logistic_accuracy"] > 0.95 and p["kmeans_ari"] > 0.95
    assert p == weights.probes(W, names)  # deterministic

    shuffled = weights.probes(W, rng.permutation(labels))
    assert shuffled["nn_accuracy"] < 0.45 and shuffled["logistic_accuracy"] < 0.45
    assert abs(shuffled["kmeans_ari"]) < 0.1


def test_probes_adapt_folds_to_the_smallest_class():
    rng = np.random.default_rng(1)
    W, labels = clusters(rng, n_per_class=3, k=3)
    assert weights.probes(W, labels)["logistic_folds"] == 3
    labels[0] = 7  # a class of one: no stratified split possible
    assert np.isnan(weights.probes(W, labels)["logistic_accuracy"])


