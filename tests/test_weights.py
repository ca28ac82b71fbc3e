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


def test_probe_table_separates_clusters_and_not_noise():
    rng = np.random.default_rng(0)
    W, labels = clusters(rng)
    names = np.array(["chair", "table", "lamp", "mug"])[labels]  # labels may be strings
    p = weights.probe_table(W, names, seeds=5, test_fraction=0.2)
    assert p["classes"] == 4 and p["class_names"] == ["chair", "lamp", "mug", "table"] and p["chance"] == 0.25
    assert (p["n"], p["n_train"], p["n_test"], p["seeds"]) == (120, 96, 24, [0, 1, 2, 3, 4])
    for m in weights.PROBES:  # separable: every repeat gets every test row right
        assert p[m] == 1.0 and p[f"{m}_std"] == 0.0 and len(p[f"{m}_values"]) == 5, m
    again = weights.probe_table(W, names, seeds=5, test_fraction=0.2)
    for m in weights.PROBES:  # deterministic given the seeds
        np.testing.assert_array_equal(again[f"{m}_values"], p[f"{m}_values"])

    shuffled = weights.probe_table(W, rng.permutation(labels), seeds=5)
    assert shuffled["nn_accuracy"] < 0.45 and shuffled["logistic_accuracy"] < 0.45  # chance 0.25
    assert abs(shuffled["kmeans_ari"]) < 0.1


def test_probe_table_mean_and_sample_std_over_seeds():
    rng = np.random.default_rng(0)
    centres = 0.5 * rng.normal(size=(4, 40))  # overlapping clusters: ~0.9 accuracy, varying per split
    labels = np.repeat(np.arange(4), 30)
    W = centres[labels] + rng.normal(size=(120, 40))
    p = weights.probe_table(W, labels, seeds=5)
    for m in weights.PROBES:
        v = p[f"{m}_values"]
        assert p[m] == pytest.approx(v.mean()) and p[f"{m}_std"] == pytest.approx(np.std(v, ddof=1)), m
        assert p[f"{m}_std"] > 0, m  # the splits (and k-means starts) differ per seed
    assert 0.7 < p["nn_accuracy"] < 1 and 0.7 < p["logistic_accuracy"] < 1 and 0.5 < p["kmeans_ari"] < 1
    # repeat r uses seed + r: seeds 2..4 of a run from 0 are the first three of a run from 2
    later = weights.probe_table(W, labels, seeds=3, seed=2)
    assert later["seeds"] == [2, 3, 4]
    np.testing.assert_array_equal(later["nn_accuracy_values"], p["nn_accuracy_values"][2:])
    single = weights.probe_table(W, labels, seeds=1)
    assert single["nn_accuracy"] == p["nn_accuracy_values"][0] and np.isnan(single["nn_accuracy_std"])


def test_stratified_split_is_stratified_and_deterministic():
    labels = np.array(["a"] * 10 + ["b"] * 5 + ["c"] * 2)
    train, test = weights.stratified_split(labels, test_fraction=0.2, seed=3)
    # per class round(0.2 n), at least 1 and at most n - 1: 2 of 10, 1 of 5, 1 of 2
    assert [int((labels[test] == c).sum()) for c in "abc"] == [2, 1, 1]
    assert [int((labels[train] == c).sum()) for c in "abc"] == [8, 4, 1]
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(17))
    assert (np.diff(train) > 0).all() and (np.diff(test) > 0).all()
    again = weights.stratified_split(labels, test_fraction=0.2, seed=3)
    np.testing.assert_array_equal(again[0], train)
    np.testing.assert_array_equal(again[1], test)
    splits = {tuple(weights.stratified_split(labels, 0.2, seed)[1]) for seed in range(10)}
    assert len(splits) > 5  # another seed, another split
    _, half = weights.stratified_split(labels, 0.5, 0)
    assert [int((labels[half] == c).sum()) for c in "abc"] == [5, 3, 1]  # round half up: 2.5 -> 3


def test_probe_table_refuses_what_cannot_be_split():
    W = np.random.default_rng(0).normal(size=(7, 5))
    with pytest.raises(ValueError, match=r"at least 2 rows per class .*too few in: lamp \(1\)"):
        weights.probe_table(W, ["mug"] * 3 + ["chair"] * 3 + ["lamp"])
    with pytest.raises(ValueError, match=r"at least two classes; the labels hold 1: \['mug'\]"):
        weights.probe_table(W, ["mug"] * 7)
    with pytest.raises(ValueError, match=r"7 weight vectors but 6 labels"):
        weights.probe_table(W, ["mug", "chair"] * 3)
    for fraction in (0.0, 1.0):
        with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\)"):
            weights.probe_table(W, ["mug", "chair"] * 3 + ["mug"], test_fraction=fraction)
    with pytest.raises(ValueError, match=r"seeds must be at least 1, got 0"):
        weights.probe_table(W, ["mug", "chair"] * 3 + ["mug"], seeds=0)


def test_weight_statistics_match_hand_computation():
    W = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 5.0], [3.0, 4.0, 5.0]])
    s = weights.weight_statistics(W, ks=(1, 2, 10))
    norms = np.array([5.0, 5.0, np.sqrt(50)])
    assert (s["n"], s["dims"], s["pairs"], s["pairs_subsampled"]) == (3, 3, 3, False)
    assert s["norm_mean"] == pytest.approx(norms.mean()) and s["norm_std"] == pytest.approx(norms.std())
    cosines = np.array([0.0, 25 / (5 * np.sqrt(50)), 25 / (5 * np.sqrt(50))])  # pairs (0,1), (0,2), (1,2)
    assert s["cos_mean"] == pytest.approx(cosines.mean()) and s["cos_std"] == pytest.approx(cosines.std())
    assert s["cos_min"] == pytest.approx(0.0, abs=1e-12) and s["cos_max"] == pytest.approx(np.sqrt(0.5))
    mean = W.mean(axis=0)
    to_mean = W @ mean / (norms * np.linalg.norm(mean))
    assert s["cos_to_mean"] == pytest.approx(to_mean.mean()) and s["most_central"][0] == np.argmax(to_mean)
    # population variances per coordinate: 2, 32/9, 50/9 of a total 100/9
    assert s["top1_dims_share"] == pytest.approx(0.5)
    assert s["top2_dims_share"] == pytest.approx(82 / 100)
    assert s["top10_dims_share"] == pytest.approx(1.0)
    assert s["coord_std_median"] == pytest.approx(np.sqrt(32 / 9))
    default = weights.weight_statistics(W)  # papers/002 Table 2's ks (and 100)
    assert {"top10_dims_share", "top100_dims_share", "top1000_dims_share", "top10000_dims_share"} <= set(default)


def test_seeded_subset():
    np.testing.assert_array_equal(weights.seeded_subset(7, max_rows=10), np.arange(7))  # small sets: every row
    a = weights.seeded_subset(1000, max_rows=50, seed=2)
    assert len(a) == 50 and (np.diff(a) > 0).all() and 0 <= a[0] and a[-1] < 1000
    np.testing.assert_array_equal(a, weights.seeded_subset(1000, max_rows=50, seed=2))  # the seed fixes the rows
    assert not np.array_equal(a, weights.seeded_subset(1000, max_rows=50, seed=3))
    with pytest.raises(ValueError, match="max_rows must be at least 2"):
        weights.seeded_subset(10, max_rows=1)


def test_scan_in_blocks_equals_the_whole_matrix():
    """A RowSource read 10 rows at a time gives the in-memory numbers: the exact statistics up to
    float64 rounding, the same subset rows, the same nearest training rows."""
    rng = np.random.default_rng(5)
    W = rng.normal(size=32) + 0.3 * rng.normal(size=(257, 32))
    G = W[[0, 100, 256, 100]] + 0.001 * rng.normal(size=(4, 32))
    whole = weights.scan_weights(W, max_rows=40, seed=2, generated=G)
    blocked = weights.scan_weights(weights.ArrayRows(W, block_rows=10), max_rows=40, seed=2, generated=G)
    assert whole.subsampled and blocked.statistics["sample_rows"] == 40 and blocked.statistics["pairs"] == 780
    np.testing.assert_array_equal(blocked.subset, weights.seeded_subset(257, 40, 2))
    np.testing.assert_array_equal(blocked.subset_weights, W[blocked.subset])
    for key, value in whole.statistics.items():
        np.testing.assert_allclose(blocked.statistics[key], value, rtol=1e-12, atol=1e-15, err_msg=key)
    np.testing.assert_allclose(blocked.cosine["cos_to_mean"], whole.cosine["cos_to_mean"], rtol=1e-12)
    stats = weights.weight_statistics(W, max_rows=40, seed=2)  # the matrix path is scan_weights' one block
    assert stats.keys() == whole.statistics.keys()
    for key, value in whole.statistics.items():
        np.testing.assert_array_equal(stats[key], value, err_msg=key)
    for key in ("cos_index", "l2_index", "nearest_counts", "attractors"):
        np.testing.assert_array_equal(blocked.nearest[key], whole.nearest[key], err_msg=key)
    np.testing.assert_array_equal(blocked.nearest["cos_index"][:, 0], [0, 100, 256, 100])
    np.testing.assert_allclose(blocked.nearest["l2_dist"], whole.nearest["l2_dist"], rtol=1e-12)
    share = weights.top_dims_variance(weights.ArrayRows(W, block_rows=10), ks=(1, 5))["share"]
    assert share == pytest.approx(weights.top_dims_variance(W, ks=(1, 5))["share"], rel=1e-12)


def test_nearest_training_over_blocks_smaller_than_top_k():
    rng = np.random.default_rng(6)
    generated, training = rng.normal(size=(9, 12)), rng.normal(size=(23, 12))
    r = weights.nearest_training(generated, weights.ArrayRows(training, block_rows=2), top_k=5)
    cos = (generated / np.linalg.norm(generated, axis=1, keepdims=True)) @ (
        training / np.linalg.norm(training, axis=1, keepdims=True)).T
    dist = np.linalg.norm(generated[:, None] - training[None], axis=2)
    np.testing.assert_array_equal(r["cos_index"], np.argsort(-cos, axis=1)[:, :5])
    np.testing.assert_array_equal(r["l2_index"], np.argsort(dist, axis=1)[:, :5])
    np.testing.assert_allclose(r["l2_dist"], np.sort(dist, axis=1)[:, :5])
    assert r["n_training"] == 23 and r["nearest_counts"].sum() == 9
    with pytest.raises(ValueError, match="generated vectors have 12 dims, training vectors 11"):
        weights.nearest_training(generated, weights.ArrayRows(training[:, :11]))
