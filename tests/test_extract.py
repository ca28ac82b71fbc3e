"""Fields -> meshes and mesh topology, on analytic SDFs written as torch functions: geometry
against the analytic surface, topology of known shapes, coarse-to-fine against the dense grid,
batches against single fields, the original frame, and fields with no surface."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh
from scipy.spatial import cKDTree

from raywsl.geometry.extract import extract_mesh, extract_meshes
from raywsl.geometry.topology import topology

RES = 64  # cells per axis: h = 1/32 over [-1, 1]^3
SPHERE_R = 0.6
TORUS_R, TORUS_r = 0.5, 0.2

# --- analytic fields (exact SDFs, or unions of them by min: 1-Lipschitz) -----------------------


def sphere(p, center=(0.0, 0.0, 0.0), r=SPHERE_R):
    return (p - torch.tensor(center)).norm(dim=-1) - r


def torus(p, center=(0.0, 0.0, 0.0), R=TORUS_R, r=TORUS_r):
    q = p - torch.tensor(center)
    return torch.hypot(q[..., :2].norm(dim=-1) - R, q[..., 2]) - r


def box(p, center, half):
    q = (p - torch.tensor(center)).abs() - torch.tensor(half)
    return q.clamp(min=0).norm(dim=-1) + q.max(dim=-1).values.clamp(max=0)


def double_torus(p):
    """Two tori whose rings touch at the origin: their tubes fuse in one blob, genus 2."""
    return torch.minimum(torus(p, (-0.4, 0, 0), 0.4, 0.12), torus(p, (0.4, 0, 0), 0.4, 0.12))


def two_spheres(p):
    return torch.minimum(sphere(p, (-0.5, 0, 0), 0.3), sphere(p, (0.5, 0, 0), 0.3))


def thin(p):
    """A plate 0.015 thick and a ball of radius 0.04, both thinner than a cell of the coarse grid
    (h = 0.125 at 16) and missed by its points; the 64 grid has points inside both."""
    plate = box(p, (0.0, 0.0, 0.0625), (0.49, 0.49, 0.0075))
    return torch.minimum(plate, sphere(p, (0.31, -0.29, -0.52), 0.04))


def positive(p):
    return p.norm(dim=-1) + 0.1


def nan_field(p):
    return torch.full(p.shape[:-1], float("nan"))


def nan_near_surface(p):
    d = sphere(p)
    return torch.where(d.abs() < 0.02, float("nan"), d)


def batch_of(fields):
    return lambda p: torch.stack([f(p[b]) for b, f in enumerate(fields)])


def surface_samples(mesh, n=50_000):
    return np.asarray(mesh.sample(n, seed=0))


# --- geometry and topology ------------------------------------------------------------------------


def test_sphere_matches_analytic_surface():
    ex = extract_mesh(sphere, RES)
    assert ex.ok and ex.reason == "" and ex.seconds > 0 and ex.evaluated == (RES + 1) ** 3
    v = np.asarray(ex.mesh.vertices)
    assert np.abs(np.linalg.norm(v, axis=1) - SPHERE_R).max() < 2e-3  # vertices on the sphere
    # Chamfer: mesh -> sphere exactly, sphere -> mesh through dense mesh samples
    d = np.random.default_rng(0).normal(size=(20_000, 3))
    on_sphere = SPHERE_R * d / np.linalg.norm(d, axis=1, keepdims=True)
    to_mesh = cKDTree(surface_samples(ex.mesh)).query(on_sphere)[0]
    to_sphere = np.abs(np.linalg.norm(surface_samples(ex.mesh), axis=1) - SPHERE_R)
    assert 0.5 * (to_mesh.mean() + to_sphere.mean()) < 5e-3
    t = topology(ex.mesh)
    assert (t["components"], t["euler"], t["genus"], t["watertight"]) == (1, 2, 0, True)
    assert t["volume"] == pytest.approx(4 / 3 * math.pi * SPHERE_R**3, rel=0.01)  # > 0: faces point out


def test_torus_matches_analytic_surface():
    ex = extract_mesh(torus, RES)
    pts = surface_samples(ex.mesh)
    to_torus = np.abs(torus(torch.from_numpy(pts)).numpy())  # exact distance to the torus
    u, w = np.random.default_rng(0).uniform(0, 2 * np.pi, (2, 20_000))
    on_torus = np.column_stack([(TORUS_R + TORUS_r * np.cos(w)) * np.cos(u),
                                (TORUS_R + TORUS_r * np.cos(w)) * np.sin(u), TORUS_r * np.sin(w)])
    to_mesh = cKDTree(pts).query(on_torus)[0]
    assert to_torus.max() < 3e-3 and 0.5 * (to_mesh.mean() + to_torus.mean()) < 5e-3
    t = topology(ex.mesh)
    assert (t["components"], t["euler"], t["genus"], t["genera"], t["watertight"]) == (1, 0, 1, [1], True)
    assert t["volume"] == pytest.approx(2 * math.pi**2 * TORUS_R * TORUS_r**2, rel=0.02)


@pytest.mark.parametrize("field, components, genera", [(double_torus, 1, [2]), (two_spheres, 2, [0, 0])])
def test_topology_of_fused_tori_and_separate_spheres(field, components, genera):
    t = topology(extract_mesh(field, RES).mesh)
    assert (t["components"], t["genera"], t["genus"], t["watertight"]) == (components, genera, sum(genera), True)
    assert t["euler"] == 2 * components - 2 * sum(genera)


def test_topology_conventions_on_plain_meshes():
    sphere_mesh = trimesh.creation.icosphere(subdivisions=2)
    torus_mesh = trimesh.creation.torus(0.6, 0.2).apply_translation([3, 0, 0])
    both = topology(trimesh.util.concatenate([sphere_mesh, torus_mesh]))
    assert (both["components"], both["euler"], both["genus"], both["genera"]) == (2, 2, 1, [1, 0])
    # duplicated vertices (every face with its own three) are merged before counting
    corners = sphere_mesh.triangles.reshape(-1, 3)
    soup = trimesh.Trimesh(corners, np.arange(len(corners)).reshape(-1, 3), process=False)
    assert topology(soup) == topology(sphere_mesh)
    # open: no genus, no volume; inward faces: negative volume
    opened = topology(trimesh.Trimesh(sphere_mesh.vertices, sphere_mesh.faces[:-1]))
    assert (opened["watertight"], opened["genus"], opened["volume"], opened["euler"]) == (False, None, None, 1)
    assert topology(trimesh.Trimesh(sphere_mesh.vertices, sphere_mesh.faces[:, ::-1]))["volume"] < 0
    # a speck beside the sphere is a component, not a major one (under 1 % of the area)
    speck = trimesh.creation.icosphere(subdivisions=1, radius=0.05).apply_translation([3, 0, 0])
    specked = topology(trimesh.util.concatenate([sphere_mesh, speck]))
    assert (specked["components"], specked["major_components"], both["major_components"]) == (2, 1, 2)
    assert topology(None) == topology(trimesh.Trimesh()) == {
        "vertices": 0, "faces": 0, "components": 0, "major_components": 0, "euler": 0, "genus": None, "genera": None,
        "watertight": False, "volume": None}


# --- coarse-to-fine, batches, frames ---------------------------------------------------------------


def assert_same_mesh(a, b):
    assert a.faces.shape == b.faces.shape and (a.faces == b.faces).all()
    np.testing.assert_allclose(a.vertices, b.vertices, rtol=0, atol=1e-6)


@pytest.mark.parametrize("field, resolution, coarse", [(sphere, RES, 16), (torus, RES, 8), (thin, RES, 16),
                                                       (double_torus, RES, 16)])
def test_coarse_to_fine_equals_dense(field, resolution, coarse):
    dense = extract_mesh(field, resolution, chunk=50_000)  # chunks of uneven size: same result
    fine = extract_mesh(field, resolution, coarse=coarse, lipschitz=1.0)  # tight: these are true SDFs
    assert_same_mesh(dense.mesh, fine.mesh)
    assert fine.evaluated < dense.evaluated / 3
    if field is thin:  # both thin parts are found, though the coarse grid has no point inside them
        assert topology(fine.mesh)["components"] == 2


def test_coarse_must_divide_resolution_by_a_power_of_two():
    with pytest.raises(ValueError, match="power of 2"):
        extract_mesh(sphere, RES, coarse=24)


@pytest.mark.parametrize("coarse", [None, 16])
def test_batch_equals_single_fields(coarse):
    fields = [sphere, torus, two_spheres]
    batch = extract_meshes(batch_of(fields), len(fields), RES, coarse=coarse, chunk=100_000)
    for f, ex in zip(fields, batch):
        assert_same_mesh(ex.mesh, extract_mesh(f, RES, coarse=coarse).mesh)


def test_original_frame():
    center, scale = np.array([1.0, 2.0, 3.0]), 0.5  # normalised = (original - center) * scale
    normalised = extract_mesh(sphere, RES).mesh
    original = extract_mesh(sphere, RES, center=center, scale=scale).mesh
    np.testing.assert_allclose(original.vertices, normalised.vertices / scale + center)
    assert np.abs(np.linalg.norm(original.vertices - center, axis=1) - SPHERE_R / scale).max() < 4e-3
    # per-field frames in a batch
    centers, scales = np.array([[0.0, 0, 0], [5, 5, 5]]), np.array([1.0, 2.0])
    a, b = extract_meshes(batch_of([sphere, sphere]), 2, RES, center=centers, scale=scales)
    np.testing.assert_allclose(b.mesh.vertices, a.mesh.vertices / 2 + 5)


# --- fields with no surface -------------------------------------------------------------------------


@pytest.mark.parametrize("coarse", [None, 16])
@pytest.mark.parametrize("field, reason", [(positive, "above level"), (lambda p: -positive(p), "below level"),
                                           (nan_field, "NaN"), (nan_near_surface, "NaN")])
def test_no_surface_is_recorded(field, reason, coarse):
    ex = extract_mesh(field, RES, coarse=coarse)
    assert not ex.ok and ex.mesh is None and ex.reason.startswith("no surface") and reason in ex.reason
    assert topology(ex.mesh)["components"] == 0


@pytest.mark.parametrize("coarse", [None, 16])
def test_bad_fields_in_a_batch_leave_the_others_alone(coarse):
    fields = [sphere, nan_field, positive, torus, nan_near_surface]
    batch = extract_meshes(batch_of(fields), len(fields), RES, coarse=coarse)
    assert [ex.ok for ex in batch] == [True, False, False, True, False]
    assert_same_mesh(batch[3].mesh, extract_mesh(torus, RES, coarse=coarse).mesh)


def test_wrong_field_output_shape_is_an_error():
    with pytest.raises(ValueError, match="fields returned shape"):
        extract_meshes(lambda p: p, 1, 8)
