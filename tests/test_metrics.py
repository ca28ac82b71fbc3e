"""Distances between clouds, shape metrics and generation metrics, each against a brute-force loop
over its definition written here, and against known values."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from raywsl.eval import generation as gen
from raywsl.geometry.distances import (chamfer, chamfer_batch, chamfer_matrix, chamfer_matrix_kdtree, emd,
                                   emd_batch, emd_matrix)
from raywsl.eval.generation import (coverage, generation_metrics, memorisation_rate, mmd, nearest, novelty,
                                    one_nna, reference_key, set_metrics)
from raywsl.geometry.shape import fscore, iou_from_sdf, normal_consistency

F32 = dict(rtol=1e-5, atol=1e-6)  # float32 torch paths against float64 references

# --- brute-force definitions -----------------------------------------------------------------------


def bf_chamfer(x, y):
    sq = [[float(np.sum((a - b) ** 2)) for b in y] for a in x]
    return float(np.mean([min(r) for r in sq]) + np.mean([min(c) for c in zip(*sq)]))


def bf_emd(x, y):
    n = len(x)
    return min(np.mean([np.linalg.norm(x[i] - y[s[i]]) for i in range(n)]) for s in itertools.permutations(range(n)))


def bf_mmd(d_gr):
    return np.mean([min(d_gr[i][j] for i in range(len(d_gr))) for j in range(len(d_gr[0]))])


def bf_cov(d_gr):
    covered = set()
    for row in d_gr:
        covered |= {j for j, v in enumerate(row) if v == min(row)}
    return len(covered) / len(d_gr[0])


def bf_1nna(d_gg, d_rr, d_gr):
    ng, nr = len(d_gg), len(d_rr)
    labelled = [(True, i) for i in range(ng)] + [(False, j) for j in range(nr)]

    def dist(a, b):
        (ga, ia), (gb, ib) = a, b
        if ga and gb:
            return d_gg[ia][ib]
        if not ga and not gb:
            return d_rr[ia][ib]
        return d_gr[ia][ib] if ga else d_gr[ib][ia]

    correct = 0.0
    for k, a in enumerate(labelled):
        others = [(dist(a, b), b[0]) for m, b in enumerate(labelled) if m != k]
        best = min(d for d, _ in others)
        tied = [g for d, g in others if d == best]
        correct += sum(g == a[0] for g in tied) / len(tied)
    return correct / (ng + nr)


def sphere_points(n, radius, rng):
    u = rng.standard_normal((n, 3))
    return radius * u / np.linalg.norm(u, axis=1, keepdims=True)


def blobs(k, n, rng, shift=0.0):
    """k clouds of n points on random ellipsoids (one distribution of shapes)."""
    radii = rng.uniform(0.4, 1.0, (k, 1, 3))
    return (sphere_points(k * n, 1.0, rng).reshape(k, n, 3) * radii + shift).astype(np.float32)


@pytest.fixture(scope="module")
def shapes():
    """Clouds of real corpus shapes, as evaluation samples them (normalised, area-weighted)."""
    from raywsl.data.corpus import generate_shape
    from raywsl.data.meshes import normalise
    from raywsl.geometry.sampling import sample_surface

    meshes = [normalise(generate_shape(i, seed=0).mesh, 0.03)[0] for i in range(6)]
    return np.stack([sample_surface(m, 256, np.random.default_rng(i))[0] for i, m in enumerate(meshes)])


# --- Chamfer ---------------------------------------------------------------------------------------


def test_chamfer_matches_definition_for_every_path():
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(4, 9, 3)), rng.normal(size=(3, 5, 3))
    want = np.array([[bf_chamfer(a, b) for b in B] for a in A])
    assert np.allclose([[chamfer(a, b) for b in B] for a in A], want, rtol=1e-12)
    assert np.allclose(chamfer_matrix_kdtree(A, B), want, rtol=1e-12)
    assert np.allclose(chamfer_matrix(A, B, device="cpu"), want, **F32)
    x, y = (torch.as_tensor(c, dtype=torch.float32) for c in (A[:3], B))
    for rows in (1, 4, 9):  # row blocks that do and don't divide the 9 points
        assert np.allclose(chamfer_batch(x, y, rows).numpy(), np.diag(want[:3]), **F32)


def test_chamfer_of_identical_clouds_is_zero():
    x = np.random.default_rng(1).normal(size=(50, 3))
    assert chamfer(x, x) == 0.0
    assert chamfer(x, x[::-1]) == 0.0  # order does not matter
    A = np.stack([x, x + 1, x * 2])
    assert np.all(np.diag(chamfer_matrix(A)) == 0)
    assert np.all(np.abs(np.diag(chamfer_matrix(A, A))) < 1e-6)  # float32 expanded form: ~1e-8


def test_chamfer_of_concentric_spheres_approaches_analytic_value():
    # Nearest points are radial in the limit: CD -> (r1 - r2)^2 in each direction.
    rng = np.random.default_rng(2)
    exact = 2 * (1.0 - 0.8) ** 2
    errors = [abs(chamfer(sphere_points(n, 1.0, rng), sphere_points(n, 0.8, rng)) / exact - 1)
              for n in (300, 3000, 30000)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.01, errors


def test_tiled_matrix_equals_kdtree_baseline(shapes):
    A, B = shapes[:5], shapes[3:]
    full, sym = chamfer_matrix_kdtree(A, B), chamfer_matrix_kdtree(A)
    assert np.allclose(sym, sym.T) and np.all(np.diag(sym) == 0)
    for tile in (None, 1, 3, 4, 7, 100):  # 5 x 3 pairs, 10 symmetric ones: most tiles don't divide them
        assert np.allclose(chamfer_matrix(A, B, device="cpu", tile=tile), full, **F32)  # A[3:] = B[:2]
        got = chamfer_matrix(A, device="cpu", tile=tile)
        assert np.allclose(got, sym, **F32) and np.array_equal(got, got.T)
    # the symmetric case (each pair once) equals the full computation of A against itself
    both = chamfer_matrix(A, A, device="cpu")
    off = ~np.eye(len(A), dtype=bool)
    assert np.allclose(chamfer_matrix(A, device="cpu")[off], both[off], **F32)


def test_far_from_origin_and_float64_products(shapes, monkeypatch):
    # Pairs are centred before the expanded form, so a translation changes nothing (without it
    # |x|^2 ~ 1e4 would cost ~1e-3 absolute in float32).
    far = shapes[:4] + np.float32(100)
    assert np.allclose(chamfer_matrix(far, device="cpu"), chamfer_matrix_kdtree(shapes[:4]), rtol=1e-3, atol=1e-6)
    # The CUDA branch computes products in float64 (immune to TF32): run that dtype path on the CPU.
    import raywsl.geometry.distances as distances

    monkeypatch.setattr(distances, "_product_dtype", lambda device: torch.float64)
    assert np.allclose(chamfer_matrix(shapes[:4], shapes[2:], device="cpu"),
                       chamfer_matrix_kdtree(shapes[:4], shapes[2:]), rtol=1e-9, atol=1e-12)
    exact = emd_matrix(shapes[:3], exact=True)
    approx = emd_matrix(shapes[:3], device="cpu")
    assert np.all((approx >= exact - 1e-6) & (approx <= exact + 1e-3 + 1e-6))


def test_matrix_input_validation():
    with pytest.raises(ValueError, match="stack of point clouds"):
        chamfer_matrix(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="NaN"):
        chamfer_matrix(np.full((2, 4, 3), np.nan))
    with pytest.raises(ValueError, match="equal size"):
        emd_matrix(np.zeros((2, 4, 3)), np.zeros((2, 5, 3)))


# --- EMD -------------------------------------------------------------------------------------------


def test_exact_emd_matches_all_permutations():
    rng = np.random.default_rng(3)
    A, B = rng.normal(size=(3, 6, 3)), rng.normal(size=(2, 6, 3))
    want = np.array([[bf_emd(a, b) for b in B] for a in A])
    assert np.allclose([[emd(a, b, exact=True) for b in B] for a in A], want, rtol=1e-12)
    assert np.allclose(emd_matrix(A, B, exact=True), want, rtol=1e-12)
    sym = emd_matrix(A, exact=True)
    assert np.allclose(sym, [[bf_emd(a, b) for b in A] for a in A], rtol=1e-12)


@pytest.mark.parametrize("eps", [1e-4, 1e-3, 3e-2])
def test_auction_emd_is_within_eps_above_exact(shapes, eps):
    # The documented bound: exact <= approx <= exact + eps (float32: 1e-6 slack).
    exact = emd_matrix(shapes, exact=True)
    approx = emd_matrix(shapes, device="cpu", eps=eps, tile=4)  # 15 pairs in batches of 4
    off = ~np.eye(len(shapes), dtype=bool)
    assert np.all(approx[off] >= exact[off] - 1e-6)
    assert np.all(approx[off] <= exact[off] + eps + 1e-6)
    if eps == 1e-3:  # the default: relative error well under 1 % on real shapes (EMD 0.06-0.6)
        assert np.max(approx[off] / exact[off] - 1) < 0.005
    assert np.all(np.diag(approx) == 0)


def test_auction_emd_small_and_degenerate_cases():
    rng = np.random.default_rng(4)
    A = rng.normal(size=(5, 6, 3))
    pairs = list(itertools.combinations(range(5), 2))
    x = torch.as_tensor(np.stack([A[i] for i, _ in pairs]), dtype=torch.float32)
    y = torch.as_tensor(np.stack([A[j] for _, j in pairs]), dtype=torch.float32)
    got = emd_batch(x, y, eps=1e-4).numpy()
    want = np.array([bf_emd(A[i], A[j]) for i, j in pairs])
    assert np.all(got >= want - 1e-6) and np.all(got <= want + 1e-4 + 1e-6)
    # identical clouds with duplicate points (tied bids) match each point to a copy
    dup = np.repeat(rng.normal(size=(4, 3)), 3, axis=0)
    assert emd(dup, dup[::-1]) <= 1e-3 and emd(dup, dup, exact=True) == 0.0
    assert emd(A[0][:1], A[1][:1]) == pytest.approx(np.linalg.norm(A[0][0] - A[1][0]), rel=1e-6)
    with pytest.raises(ValueError, match="equal size"):
        emd(A[0], A[1][:5])


# --- generation metrics ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_set_metrics_match_brute_force_with_ties(seed):
    # Small integer distances: ties everywhere (within rows, between sets, at the minimum).
    rng = np.random.default_rng(seed)
    ng, nr = rng.integers(1, 6, size=2) + 1
    d_gr = rng.integers(0, 3, size=(ng, nr)).astype(float)
    d_gg = rng.integers(0, 3, size=(ng, ng)).astype(float)
    d_rr = rng.integers(0, 3, size=(nr, nr)).astype(float)
    d_gg, d_rr = np.triu(d_gg, 1) + np.triu(d_gg, 1).T, np.triu(d_rr, 1) + np.triu(d_rr, 1).T
    assert mmd(d_gr) == pytest.approx(bf_mmd(d_gr))
    assert coverage(d_gr) == pytest.approx(bf_cov(d_gr))
    assert one_nna(d_gg, d_rr, d_gr) == pytest.approx(bf_1nna(d_gg, d_rr, d_gr))
    assert set_metrics(d_gr, d_gg, d_rr) == pytest.approx(
        {"mmd": bf_mmd(d_gr), "cov": bf_cov(d_gr), "1nna": bf_1nna(d_gg, d_rr, d_gr)})
    # P = Q: the generated set is the reference set (d_gr = d_gg = d_rr, zero diagonal)
    assert set_metrics(d_rr, d_rr, d_rr) == pytest.approx(
        {"mmd": bf_mmd(d_rr), "cov": bf_cov(d_rr), "1nna": bf_1nna(d_rr, d_rr, d_rr)})
    assert mmd(d_rr) == 0.0 and coverage(d_rr) == 1.0


def test_set_metrics_on_real_valued_matrices_match_brute_force():
    rng = np.random.default_rng(7)
    g, r = rng.normal(size=(7, 2)), rng.normal(size=(5, 2))
    dist = lambda a, b: np.linalg.norm(a[:, None] - b[None], axis=2)  # noqa: E731
    d_gr, d_gg, d_rr = dist(g, r), dist(g, g), dist(r, r)
    assert mmd(d_gr) == pytest.approx(bf_mmd(d_gr))
    assert coverage(d_gr) == pytest.approx(bf_cov(d_gr))
    assert one_nna(d_gg, d_rr, d_gr) == pytest.approx(bf_1nna(d_gg, d_rr, d_gr))


def test_1nna_known_values():
    rng = np.random.default_rng(8)
    dist = lambda a, b: np.linalg.norm(a[:, None] - b[None], axis=2)  # noqa: E731
    p, q = rng.normal(size=(600, 2)), rng.normal(size=(600, 2))
    assert one_nna(dist(p, p), dist(q, q), dist(p, q)) == pytest.approx(0.5, abs=0.05)  # same distribution
    assert one_nna(dist(p, p), dist(p, p), dist(p, p)) == 0.0  # exact copy: the copy is the unique nearest
    far = q + 100
    assert one_nna(dist(p, p), dist(far, far), dist(p, far)) == 1.0  # separable sets
    # all shapes identical: every neighbour is tied, s / (s + o) = (n - 1) / (2n - 1)
    assert one_nna(np.zeros((3, 3)), np.zeros((3, 3)), np.zeros((3, 3))) == pytest.approx(2 / 5)


def test_coverage_counts_tied_references():
    # the generated shape is at distance 0 from two duplicate references: both are covered
    assert coverage(np.array([[0.0, 0.0, 1.0]])) == pytest.approx(2 / 3)
    assert coverage(np.array([[0.0, 1.0, 1.0], [0.0, 2.0, 3.0]])) == pytest.approx(1 / 3)


def test_generation_metrics_on_clouds():
    rng = np.random.default_rng(9)
    ref = blobs(12, 48, rng)
    same = generation_metrics(ref, ref, device="cpu")
    assert set(same) == {"mmd_cd", "cov_cd", "1nna_cd", "mmd_emd", "cov_emd", "1nna_emd"}
    assert same["mmd_cd"] == pytest.approx(0, abs=1e-6) and same["mmd_emd"] == pytest.approx(0, abs=1e-6)
    assert same["cov_cd"] == same["cov_emd"] == 1.0
    assert same["1nna_cd"] == same["1nna_emd"] == 0.0
    far = generation_metrics(blobs(12, 48, rng, shift=5.0), ref, distances=("cd",), device="cpu")
    assert far["1nna_cd"] == 1.0 and set(far) == {"mmd_cd", "cov_cd", "1nna_cd"}
    # two independent samples of one distribution of shapes: near 50 % (24 shapes: loose bounds)
    other = generation_metrics(blobs(24, 48, rng), blobs(24, 48, rng), distances=("cd",), device="cpu")
    assert 0.3 <= other["1nna_cd"] <= 0.7 and other["cov_cd"] > 0.3
    with pytest.raises(ValueError, match="distances"):
        generation_metrics(ref, ref, distances=("l2",))
    with pytest.raises(ValueError, match="d_rr must be a matrix of shape"):
        one_nna(np.zeros((2, 2)), np.zeros((3, 3)), np.zeros((2, 4)))


def test_reference_matrix_is_cached(tmp_path, monkeypatch):
    rng = np.random.default_rng(10)
    gen_a, gen_b, ref = blobs(4, 32, rng), blobs(4, 32, rng), blobs(5, 32, rng)
    calls = []
    real = gen.fastest_chamfer_matrix

    def counting(a, b=None, **kw):
        calls.append(b is None and len(a) == len(ref))  # True: the reference's own matrix
        return real(a, b, **kw)

    monkeypatch.setattr(gen, "fastest_chamfer_matrix", counting)
    for cache in ({}, tmp_path / "cache"):
        calls.clear()
        first = generation_metrics(gen_a, ref, distances=("cd",), device="cpu", cache=cache)
        again = generation_metrics(gen_a, ref, distances=("cd",), device="cpu", cache=cache)
        generation_metrics(gen_b, ref, distances=("cd",), device="cpu", cache=cache)
        assert first == again and sum(calls) == 1  # D_rr computed once for three evaluations
    assert (tmp_path / "cache" / f"{reference_key(ref, 'cd')}.npy").exists()
    matrices = {}  # the folder as an fsspec URL finds the same file; the matrices come back
    generation_metrics(gen_a, ref, distances=("cd",), device="cpu", cache=f"file://{tmp_path}/cache",
                       matrices=matrices)
    d_gr, d_gg, d_rr = matrices["cd"]
    assert d_gr.shape == (4, 5) and d_gg.shape == (4, 4) and d_rr.shape == (5, 5) and sum(calls) == 1
    assert reference_key(ref, "cd") != reference_key(ref[::-1], "cd") != reference_key(ref, "emd-eps0.001")


def test_novelty_and_memorisation():
    rng = np.random.default_rng(11)
    train = blobs(6, 40, rng)
    generated = np.concatenate([train[[4, 1]], blobs(3, 40, rng, shift=3.0)])
    result = novelty(generated, train, threshold=1e-4, device="cpu")
    assert list(result.nearest_index[:2]) == [4, 1]
    assert np.all(result.nearest_cd[:2] < 1e-6) and np.all(result.nearest_cd[2:] > 1)
    assert result.memorisation_rate == pytest.approx(2 / 5)
    want = chamfer_matrix_kdtree(generated, train)
    assert np.allclose(result.nearest_cd, want.min(axis=1), rtol=1e-5, atol=1e-6)
    assert memorisation_rate(np.array([0.0, 1e-3, 2e-3]), 1e-3) == pytest.approx(1 / 3)  # strictly below
    d, i = nearest(np.array([[3.0, 1.0, 1.0], [0.5, 2.0, 0.1]]))
    assert list(i) == [1, 2] and list(d) == [1.0, 0.1]  # ties: the lowest index


# --- shape metrics ---------------------------------------------------------------------------------


def test_fscore_known_cases():
    gt = np.stack([np.linspace(0, 1, 101), np.zeros(101), np.zeros(101)], axis=1)
    assert fscore(gt, gt) == (1.0, 1.0, 1.0)
    assert fscore(gt + [0, 0.005, 0], gt, tau=0.01).f == 1.0
    assert fscore(gt + [0, 0.02, 0], gt, tau=0.01) == (0.0, 0.0, 0.0)
    pred = np.array([[0, 0, 0.25], [5, 0, 0]])
    f = fscore(pred, np.array([[0.0, 0, 0], [1, 0, 0]]), tau=0.5)  # 0.25 < tau counts
    assert (f.precision, f.recall, f.f) == (0.5, 0.5, 0.5)
    assert fscore(np.array([[0, 0, 0.5]]), np.zeros((1, 3)), tau=0.5).f == 0.0  # at exactly tau: not within


def test_normal_consistency_known_cases():
    rng = np.random.default_rng(12)
    pts = rng.normal(size=(200, 3))
    up = np.tile([0.0, 0.0, 1.0], (200, 1))
    assert normal_consistency(pts, up, pts, -3 * up) == pytest.approx(1.0)  # flipped, not unit: |cos| = 1
    side = np.tile([1.0, 0.0, 0.0], (200, 1))
    assert normal_consistency(pts, up, pts, side) == pytest.approx(0.0)
    diag = np.tile([0.0, 1.0, 1.0], (200, 1))
    assert normal_consistency(pts, up, pts, diag) == pytest.approx(np.sqrt(0.5))
    # both directions averaged: 4 pred points all near gt point 0 (normal up), gt point 1 far (side)
    pred = np.zeros((4, 3)) + [0, 0, 0.01]
    gt = np.array([[0.0, 0, 0], [9, 0, 0]])
    got = normal_consistency(pred, np.tile([0.0, 0, 1], (4, 1)), gt, np.array([[0.0, 0, 1], [1, 0, 0]]))
    assert got == pytest.approx((1.0 + 0.5) / 2)


def test_iou_from_sdf_known_cases():
    g = np.linspace(-1, 1, 81)
    pts = np.stack(np.meshgrid(g, g, g, indexing="ij"), axis=-1).reshape(-1, 3)
    r = np.linalg.norm(pts, axis=1)
    big, small, shifted = r - 0.8, r - 0.4, np.linalg.norm(pts - [0.5, 0, 0], axis=1) - 0.4
    assert iou_from_sdf(big, big) == 1.0
    assert iou_from_sdf(small, big) == pytest.approx(0.5**3, rel=0.05)  # volume ratio of nested balls
    assert iou_from_sdf(small, big) == np.count_nonzero(small < 0) / np.count_nonzero(big < 0)
    assert iou_from_sdf(small, shifted) == pytest.approx(
        np.count_nonzero((small < 0) & (shifted < 0)) / np.count_nonzero((small < 0) | (shifted < 0)))
    assert iou_from_sdf(r - 0.1, r + 3) == 0.0  # the second is empty: nothing in common
    assert iou_from_sdf(np.ones(5), np.ones(5)) == 1.0  # both empty agree
    assert iou_from_sdf(np.array([0.0, -1.0]), np.array([-1.0, -1.0])) == 0.5  # sdf = 0 is outside


def test_fastest_chamfer_matrix_equals_the_tiled_torch_path():
    rng = np.random.default_rng(11)
    A, B = blobs(5, 64, rng), blobs(3, 64, rng)
    assert np.allclose(gen.fastest_chamfer_matrix(A, B, device="cpu"), chamfer_matrix(A, B, device="cpu"), **F32)
    assert np.allclose(gen.fastest_chamfer_matrix(A, device="cpu"), chamfer_matrix(A, device="cpu"), **F32)
