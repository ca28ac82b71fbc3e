"""Signed distance backends and per-shape sampling, checked against exact references on real meshes:
analytic SDFs, a brute-force point-triangle distance written here, and libigl's exact (slow)
generalised winding number."""

from __future__ import annotations

import igl
import numpy as np
import pytest
import trimesh

from raywsl.geometry.sampling import (DEFAULT_MIX, DEFAULT_NEAR_SIGMAS, ShapeSamples, sample_query_points,
                                    sample_shape, sample_surface, split_counts)
from raywsl.geometry.sdf import SDF_BACKENDS, _is_closed, _morton_order, _winding_clusters, signed_distance

# --- exact references ------------------------------------------------------------------------------


def _point_segment(p, a, b):
    ab = b - a
    t = np.clip(np.einsum("...k,...k", p - a, ab) / np.maximum(np.einsum("...k,...k", ab, ab), 1e-300), 0, 1)
    return np.linalg.norm(p - (a + t[..., None] * ab), axis=-1)


def brute_force_distance(points: np.ndarray, mesh: trimesh.Trimesh, chunk: int = 64) -> np.ndarray:
    """Exact unsigned distance to every triangle, minimised: the plane distance where the projection
    falls inside the triangle, else the nearest of its three edges."""
    tri = np.asarray(mesh.triangles, np.float64)[None]  # (1, F, 3, 3)
    a, b, c = tri[..., 0, :], tri[..., 1, :], tri[..., 2, :]
    n = np.cross(b - a, c - a)
    n = n / np.linalg.norm(n, axis=-1, keepdims=True)
    out = []
    for start in range(0, len(points), chunk):
        p = np.asarray(points[start:start + chunk], np.float64)[:, None]  # (m, 1, 3)
        height = np.einsum("mfk,mfk->mf", p - a, np.broadcast_to(n, (len(p), *n.shape[1:])))
        proj = p - height[..., None] * n
        inside = np.ones(height.shape, bool)
        for u, v in ((a, b), (b, c), (c, a)):  # the projection is left of every directed edge
            inside &= np.einsum("mfk,mfk->mf", np.cross(v - u, proj - u), np.broadcast_to(n, proj.shape)) >= 0
        edges = np.minimum.reduce([_point_segment(p, u, v) for u, v in ((a, b), (b, c), (c, a))])
        out.append(np.where(inside, np.minimum(np.abs(height), edges), edges).min(axis=1))
    return np.concatenate(out)


def box_sdf(p, half):
    q = np.abs(p) - half
    return np.linalg.norm(np.maximum(q, 0), axis=1) + np.minimum(q.max(axis=1), 0)


def torus_sdf(p, major, minor):
    ring = np.linalg.norm(p[:, :2], axis=1) - major  # trimesh's torus lies around the z axis
    return np.hypot(ring, p[:, 2]) - minor


def _query_points(mesh, n, rng, sigma=0.05):
    """Uniform points in the cube plus points scattered around the surface."""
    near = mesh.sample(n // 2, seed=int(rng.integers(1 << 31))) + rng.normal(0, sigma, (n // 2, 3))
    return np.concatenate([rng.uniform(-1.2, 1.2, (n - n // 2, 3)), near])


def cut_sphere() -> trimesh.Trimesh:
    """An icosphere with its top cap removed: open, with one boundary loop."""
    sphere = trimesh.creation.icosphere(subdivisions=4)
    keep = sphere.triangles_center[:, 2] < 0.6
    return trimesh.Trimesh(sphere.vertices, sphere.faces[keep], process=False)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# --- igl backend -------------------------------------------------------------------------------------


def test_brute_force_reference_is_exact_on_a_box(rng):
    p = rng.uniform(-1.5, 1.5, (500, 3))
    box = trimesh.creation.box(extents=(1.2, 0.8, 1.6))
    ref = np.abs(box_sdf(p, np.array([0.6, 0.4, 0.8])))
    np.testing.assert_allclose(brute_force_distance(p, box), ref, rtol=0, atol=1e-12)


def test_igl_is_exact_on_a_box(rng):
    half = np.array([0.6, 0.4, 0.8])
    box = trimesh.creation.box(extents=2 * half)
    p = np.concatenate([rng.uniform(-1, 1, (20_000, 3)), _query_points(box, 20_000, rng, sigma=0.01)])
    ref = box_sdf(p, half)
    sdf = signed_distance(box, p)
    assert sdf.dtype == np.float64 and sdf.shape == (len(p),)
    assert np.abs(sdf - ref).max() < 1e-12
    assert np.array_equal(sdf < 0, ref < 0)


@pytest.mark.parametrize("name", ["sphere", "torus"])
def test_igl_magnitude_matches_brute_force(name, rng):
    mesh = (trimesh.creation.icosphere(subdivisions=5) if name == "sphere"
            else trimesh.creation.torus(0.6, 0.25, major_sections=96, minor_sections=48))
    p = _query_points(mesh, 600, rng)
    ref = brute_force_distance(p, mesh)
    np.testing.assert_allclose(np.abs(signed_distance(mesh, p)), ref, rtol=0, atol=1e-9)


def test_igl_sign_matches_analytic_sphere_and_torus(rng):
    sphere = trimesh.creation.icosphere(subdivisions=5)
    torus = trimesh.creation.torus(0.6, 0.25, major_sections=96, minor_sections=48)
    cases = ((sphere, lambda p: np.linalg.norm(p, axis=1) - 1), (torus, lambda p: torus_sdf(p, 0.6, 0.25)))
    for mesh, analytic in cases:
        # The mesh deviates from the analytic surface by at most the tessellation error `band`;
        # outside that band the sign is fixed by the analytic shape.
        band = 1.5 * np.abs(analytic(mesh.sample(100_000, seed=0))).max()
        p = _query_points(mesh, 100_000, rng, sigma=0.02)
        ref = analytic(p)
        sdf = signed_distance(mesh, p)
        far = np.abs(ref) > band
        assert far.mean() > 0.9
        assert np.array_equal(sdf[far] < 0, ref[far] < 0)
        assert np.abs(sdf - ref).max() < band  # and the magnitude is within the tessellation error


def _assert_sign_is_winding_number(mesh, p):
    """Inside iff the exact generalised winding number exceeds 1/2, at every point."""
    w = igl.winding_number(np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces, np.int64), p)
    sdf = signed_distance(mesh, p)
    assert np.array_equal(sdf < 0, w > 0.5), f"{np.sum((sdf < 0) != (w > 0.5))} sign disagreements"
    return sdf, w


def test_open_mesh_sign_is_winding_number_and_magnitude_exact(rng):
    mesh = cut_sphere()
    assert not mesh.is_watertight
    hole = np.array([0, 0, 0.8]) + rng.normal(0, 0.15, (1000, 3))  # around the open boundary
    p = np.concatenate([_query_points(mesh, 6000, rng), hole])
    sdf, w = _assert_sign_is_winding_number(mesh, p)
    # Fractional winding numbers near the hole: a (1 - 2w)-scaled magnitude would be wrong there.
    assert ((w > 0.1) & (w < 0.9)).sum() > 100
    sub = rng.choice(len(p), 800, replace=False)
    np.testing.assert_allclose(np.abs(sdf[sub]), brute_force_distance(p[sub], mesh), rtol=0, atol=1e-9)


@pytest.mark.parametrize("case", ["overlapping", "inverted", "hollow", "open_sheet"])
def test_sign_is_winding_number_on_hard_closed_and_open_meshes(case, rng):
    a = trimesh.creation.icosphere(subdivisions=3, radius=0.6)
    b = a.copy()
    b.apply_translation([0.4, 0.1, 0.0])
    if case == "overlapping":  # closed but self-intersecting: w = 2 where the two spheres overlap
        mesh = trimesh.util.concatenate([a, b])
    elif case == "inverted":  # inward-facing: w = -1 inside, so every point is outside
        mesh = trimesh.Trimesh(a.vertices, a.faces[:, ::-1], process=False)
    elif case == "hollow":  # a shell: the cavity (w = 0) is outside
        inner = trimesh.creation.icosphere(subdivisions=3, radius=0.3)
        inner = trimesh.Trimesh(inner.vertices, inner.faces[:, ::-1], process=False)
        mesh = trimesh.util.concatenate([a, inner])
    else:  # half of one sphere: an open bowl
        mesh = trimesh.Trimesh(a.vertices, a.faces[a.triangles_center[:, 2] < 0], process=False)
    # Closed meshes take the clustered path (one winding number per cluster), open ones do not.
    assert _is_closed(np.asarray(mesh.faces), len(mesh.vertices)) == (case != "open_sheet")
    p = _query_points(mesh, 8000, rng, sigma=0.03)
    sdf, w = _assert_sign_is_winding_number(mesh, p)
    if case == "overlapping":
        assert (w > 1.5).any()
    if case == "inverted":
        assert (sdf > 0).all()


def test_signed_distance_validates_input():
    sphere = trimesh.creation.icosphere(subdivisions=1)
    with pytest.raises(ValueError, match="unknown SDF backend 'nope'.*igl.*mesh_to_sdf"):
        signed_distance(sphere, np.zeros((2, 3)), backend="nope")
    with pytest.raises(ValueError, match="empty mesh"):
        signed_distance(trimesh.Trimesh(), np.zeros((2, 3)))
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="not finite"):
            signed_distance(sphere, np.array([[0.0, 0.0, 0.0], [bad, 0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"shape \(M, 3\)"):
        signed_distance(sphere, np.zeros((4, 2)))
    assert signed_distance(sphere, np.zeros((0, 3))).shape == (0,)


# --- mesh_to_sdf reference backend ------------------------------------------------------------------


def test_mesh_to_sdf_backend_runs_headless_in_mesh_units(rng):
    # Radius 2: mesh-to-sdf must not rescale to the unit sphere. A small surface cloud keeps it cheap
    # (the registered default, 10 M samples as in mesh-to-sdf itself, takes ~20 s per mesh).
    mesh = trimesh.creation.icosphere(subdivisions=4, radius=2.0)
    p = rng.uniform(-2.5, 2.5, (400, 3))
    ref = np.linalg.norm(p, axis=1) - 2
    v, f = np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces, np.int64)
    sdf = SDF_BACKENDS["mesh_to_sdf"](v, f, p, surface_samples=200_000)
    assert sdf.dtype == np.float64 and sdf.shape == (len(p),)
    assert np.abs(sdf - ref).max() < 0.05
    far = np.abs(ref) > 0.05
    assert np.mean((sdf[far] < 0) == (ref[far] < 0)) > 0.98


# --- sampling --------------------------------------------------------------------------------------


def test_split_counts_add_up_exactly():
    for n in [0, 1, 2, 3, 7, 10, 99, 1001, 200_000]:
        for mix in [DEFAULT_MIX, (1 / 3, 1 / 3, 1 / 3), (0.47, 0.47, 0.06), (0.0, 0.0, 1.0), (0.1, 0.0, 0.9)]:
            counts = split_counts(n, mix)
            assert sum(counts) == n and all(c >= 0 for c in counts)
            assert all(abs(c - f * n) < 1 for c, f in zip(counts, mix))


def test_sample_shape_counts_dtypes_and_determinism():
    sphere = trimesh.creation.icosphere(subdivisions=4)
    kw = dict(points=1001, surface_points=257, near_sigmas=(0.01, 0.05), mix=(0.3, 0.3, 0.4), backend="igl")
    s = sample_shape(sphere, rng=np.random.default_rng(7), **kw)
    assert isinstance(s, ShapeSamples)
    assert s.points.shape == (1001, 3) and s.sdf.shape == (1001,)
    assert s.surface.shape == (257, 3) and s.normals.shape == (257, 3)
    assert all(x.dtype == np.float32 for x in (s.points, s.sdf, s.surface, s.normals))
    again = sample_shape(sphere, rng=np.random.default_rng(7), **kw)
    for name in ("points", "sdf", "surface", "normals"):
        assert np.array_equal(getattr(s, name), getattr(again, name)), name
    other = sample_shape(sphere, rng=np.random.default_rng(8), **kw)
    assert not np.array_equal(s.points, other.points)
    # The stored SDF is that of the stored float32 points.
    stored = signed_distance(sphere, s.points.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(s.sdf, stored)


def test_query_mix_is_respected(rng):
    sphere = trimesh.creation.icosphere(subdivisions=5)
    n, sigmas, mix = 20_000, (0.01, 0.05), (0.2, 0.3, 0.5)
    p = sample_query_points(sphere, n, rng, near_sigmas=sigmas, mix=mix).astype(np.float64)
    assert p.shape == (n, 3)
    n_fine, n_coarse, n_uniform = split_counts(n, mix)
    r = np.linalg.norm(p, axis=1) - 1  # ~ signed distance to the sphere
    fine, coarse, uniform = np.split(r, [n_fine, n_fine + n_coarse])
    # Near points: the offset along the normal is ~N(0, sigma) on a sphere this smooth.
    assert abs(fine.std() / sigmas[0] - 1) < 0.1 and np.abs(fine).max() < 6 * sigmas[0]
    assert abs(coarse.std() / sigmas[1] - 1) < 0.1 and np.abs(coarse).max() < 6 * sigmas[1]
    u = p[n_fine + n_coarse:]
    assert len(u) == n_uniform and np.abs(u).max() <= 1
    assert abs(np.mean(np.linalg.norm(u, axis=1) < 1) - np.pi / 6) < 0.02  # ball volume / cube volume


def test_surface_samples_are_area_weighted_on_surface_with_outward_normals(rng):
    sphere = trimesh.creation.icosphere(subdivisions=4)
    pts, normals = sample_surface(sphere, 5000, rng)
    assert pts.dtype == normals.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1, atol=1e-6)
    assert (np.einsum("ij,ij->i", normals, pts) > 0.99).all()  # outward on the unit sphere
    assert np.abs(signed_distance(sphere, pts.astype(np.float64))).max() < 1e-6
    # Two triangles of areas 1 and 3 (and a degenerate one that must never be picked).
    tris = trimesh.Trimesh([[0, 0, 0], [2, 0, 0], [0, 1, 0], [5, 0, 0], [8, 0, 0], [5, 2, 0], [9, 9, 9]],
                           [[0, 1, 2], [3, 4, 5], [6, 6, 6]], process=False)
    pts, _ = sample_surface(tris, 40_000, rng)
    assert abs(np.mean(pts[:, 0] >= 5) - 0.75) < 0.01
    assert not (pts == 9).all(axis=1).any()


def test_sampling_validates_input():
    sphere = trimesh.creation.icosphere(subdivisions=2)
    rng = np.random.default_rng(0)
    for mix in [(0.5, 0.5, 0.5), (0.5, 0.5), (1.2, -0.2, 0.0)]:
        with pytest.raises(ValueError, match="mix"):
            sample_query_points(sphere, 10, rng, mix=mix)
    for sigmas in [(0.0, 0.1), (0.01,), (0.01, float("nan"))]:
        with pytest.raises(ValueError, match="near_sigmas"):
            sample_query_points(sphere, 10, rng, near_sigmas=sigmas)
    with pytest.raises(ValueError, match="points"):
        sample_shape(sphere, points=0, surface_points=10, rng=rng)
    with pytest.raises(ValueError, match="without faces"):
        sample_surface(trimesh.Trimesh(), 10, rng)
    with pytest.raises(ValueError, match="empty mesh|without faces"):
        sample_shape(trimesh.Trimesh(), points=10, surface_points=10, rng=rng)
    with pytest.raises(ValueError, match="unknown SDF backend"):
        sample_shape(sphere, points=10, surface_points=10, rng=rng, backend="scan")


def test_defaults_follow_deepsdf_and_sum_to_one():
    np.testing.assert_allclose(np.square(DEFAULT_NEAR_SIGMAS), (0.0005, 0.005))
    assert sum(DEFAULT_MIX) == 1 and DEFAULT_MIX[2] == 0.5


# --- the clustered sign of closed meshes ------------------------------------------------------------


def test_winding_clusters_join_points_whose_empty_balls_overlap():
    # 0 and 1: neither ball holds the other point, but the balls overlap (1.5 < 1.0 + 1.2): one
    # cluster. 1 and 2: 2.2 apart with radii 1.2 + 0.9 = 2.1: separate.
    p = np.array([[0.0, 0.0, 0.0], [1.5, 0.0, 0.0], [3.7, 0.0, 0.0]])
    label, representative = _winding_clusters(p, np.array([1.0, 1.2, 0.9]))
    assert label[0] == label[1] != label[2]
    assert representative[label[0]] == 1 and representative[label[2]] == 2  # the farthest from the surface


def test_winding_clusters_never_cross_the_surface_and_save_most_evaluations(rng):
    mesh = trimesh.creation.icosphere(subdivisions=3)  # 1,280 faces
    v, f = np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces, np.int64)
    p = sample_query_points(mesh, 20_000, rng).astype(np.float64)
    p = p[_morton_order(p)]  # as the backend orders them
    tree = igl.AABB()
    tree.init(v, f)
    dist = np.sqrt(tree.squared_distance(v, f, p)[0])
    label, representative = _winding_clusters(p, dist)
    inside = igl.winding_number(v, f, p) > 0.5
    n_clusters = len(representative)
    per_cluster = np.bincount(label, weights=inside, minlength=n_clusters) / np.bincount(label)
    assert np.isin(per_cluster, [0.0, 1.0]).all()  # every cluster wholly inside or wholly outside
    assert (dist[representative[label]] >= dist).all()  # and represented by its farthest point
    # 23-24 % of the points here; joining only points inside each other's ball (|p - q| < the
    # larger radius, not the sum) left 34 %.
    assert n_clusters < 0.28 * len(p), n_clusters
