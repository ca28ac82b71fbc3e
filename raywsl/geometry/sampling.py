"""What ingest stores per shape: SDF query points with their signed distances, and a surface cloud.

Meshes arrive normalised into the unit sphere (the caller does that). Query points are a mix of
three components, stored in this order:

1. near-surface, fine:   area-weighted surface samples + isotropic Gaussian noise, std sigma_fine
2. near-surface, coarse: the same with std sigma_coarse
3. uniform in the bounding cube [-1, 1]^3

Near-surface points are not clipped to the cube: the coarse ones may stick out of it slightly.

Defaults and where they come from:
- `DEFAULT_NEAR_SIGMAS = (sqrt(0.0005), sqrt(0.005)) ~= (0.0224, 0.0707)`: DeepSDF's reference
  preprocessing (facebookresearch/DeepSDF, src/PreprocessMesh.cpp: `variance = 0.005`,
  `second_variance = variance / 10`, noise `N(0, sqrt(variance))` per axis, meshes in the unit
  sphere). HyperDiffusion (siren/dataio.py) adds noise of std 0.01 to surface samples of shapes
  scaled into [-0.5, 0.5]^3, i.e. ~0.02 at our scale: the fine scale. (mesh-to-sdf's
  `sample_sdf_near_surface` uses stds of 0.0025 and 0.00025, 30-90x thinner; we follow DeepSDF.)
- `DEFAULT_MIX = (0.25, 0.25, 0.5)`: half near-surface, half uniform in the cube, as in the
  small-data study we reproduce (papers/002: 200,000 points per shape, 50 % near-surface, 50 %
  uniform in the unit cube) and in HyperDiffusion (equal numbers of near-surface and uniform
  points); the near half is split evenly between the two scales, as DeepSDF does. DeepSDF itself
  uses only 6 % uniform points (47 / 47 / 6), which constrains a per-shape MLP's far field weakly.

Everything is deterministic given the `numpy.random.Generator` passed in (no global RNG).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass

import numpy as np
import trimesh

from raywsl import contract as C
from raywsl.config import DEFAULT_MIX, DEFAULT_NEAR_SIGMAS, IngestConfig
from raywsl.data.meshes import MeshError, load_mesh, normalise
from raywsl.geometry.sdf import signed_distance

DEFAULT_BACKEND = "igl"


def shape_rng(seed: int, shape_id: str) -> np.random.Generator:
    """The generator of one shape's samples: depends on the seed and the shape alone, so results do
    not depend on scheduling, sharding or which other shapes are in the set."""
    digest = hashlib.sha256(shape_id.encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


@dataclass
class ShapeSamples:
    points: np.ndarray  # (M, 3) float32 query points, components in the order of the module doc
    sdf: np.ndarray  # (M,) float32 signed distance at `points`, negative inside
    surface: np.ndarray  # (S, 3) float32 points on the surface
    normals: np.ndarray  # (S, 3) float32 unit face normals at `surface`


class _SurfaceSampler:
    """Area-weighted sampling of one mesh's surface. The per-face tables are built once per shape
    and shared by the near-surface query points and the surface cloud."""

    def __init__(self, mesh: trimesh.Trimesh):
        tri = np.asarray(mesh.triangles, dtype=np.float64)
        if len(tri) == 0:
            raise ValueError("cannot sample the surface of a mesh without faces")
        cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        area2 = np.linalg.norm(cross, axis=1)  # twice the face areas
        total = area2.sum()
        if not (np.isfinite(total) and total > 0):
            raise ValueError(f"cannot sample the surface of a mesh with total area {total / 2}")
        self.tri = tri
        # The table rng.choice(len(tri), p=area2 / total) builds on every call, built once: the same
        # faces from the same random numbers. A zero-area face adds nothing to it, so it is never picked.
        self.cdf = np.cumsum(area2 / total)
        self.cdf /= self.cdf[-1]
        with np.errstate(divide="ignore", invalid="ignore"):  # zero-area faces: never picked
            self.normals = cross / area2[:, None]

    def __call__(self, n: int, rng: np.random.Generator,
                 with_normals: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        face = self.cdf.searchsorted(rng.random(n), side="right")
        u, v = rng.random((2, n))
        flip = u + v > 1  # fold the unit square onto the triangle: uniform barycentric coordinates
        u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
        tri = self.tri[face]  # one gather of the picked triangles
        a = tri[:, 0]
        points = a + u[:, None] * (tri[:, 1] - a) + v[:, None] * (tri[:, 2] - a)
        return points.astype(np.float32), self.normals[face].astype(np.float32) if with_normals else None


def sample_surface(mesh: trimesh.Trimesh, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`n` points uniformly distributed over the surface area, with the unit normal of the face
    each lies on: ((n, 3) float32, (n, 3) float32)."""
    return _SurfaceSampler(mesh)(n, rng)


def split_counts(n: int, fractions: tuple[float, ...]) -> list[int]:
    """Non-negative counts proportional to `fractions` that add up to exactly `n`, each within one
    of its exact share (rounded cumulative boundaries)."""
    cumulative = np.cumsum(fractions, dtype=np.float64)
    bounds = np.rint(cumulative / cumulative[-1] * n).astype(int)
    bounds[-1] = n
    return np.diff(bounds, prepend=0).tolist()


def _check_mix(near_sigmas: tuple[float, float], mix: tuple[float, float, float]) -> None:
    if len(near_sigmas) != 2 or not all(math.isfinite(s) and s > 0 for s in near_sigmas):
        raise ValueError(f"near_sigmas must be two positive noise scales (fine, coarse), got {near_sigmas}")
    if len(mix) != 3 or not all(math.isfinite(f) and f >= 0 for f in mix):
        raise ValueError(f"mix must be three non-negative fractions (near_fine, near_coarse, uniform), "
                         f"got {mix}")
    if abs(sum(mix) - 1.0) > 1e-6:
        raise ValueError(f"mix fractions (near_fine, near_coarse, uniform) must sum to 1, got {mix} "
                         f"(sum {sum(mix)})")


def sample_query_points(mesh: trimesh.Trimesh, n: int, rng: np.random.Generator,
                        near_sigmas: tuple[float, float] = DEFAULT_NEAR_SIGMAS,
                        mix: tuple[float, float, float] = DEFAULT_MIX) -> np.ndarray:
    """(n, 3) float32 query points: fine near-surface, coarse near-surface, uniform in [-1, 1]^3,
    in that order, with counts `split_counts(n, mix)`."""
    _check_mix(near_sigmas, mix)
    if n < 0:
        raise ValueError(f"number of query points must be >= 0, got {n}")
    return _query_points(_SurfaceSampler(mesh), n, rng, near_sigmas, mix)


def _query_points(surface: _SurfaceSampler, n: int, rng: np.random.Generator,
                  near_sigmas: tuple[float, float], mix: tuple[float, float, float]) -> np.ndarray:
    n_fine, n_coarse, n_uniform = split_counts(n, mix)
    near, _ = surface(n_fine + n_coarse, rng, with_normals=False)
    sigma = np.repeat(np.asarray(near_sigmas), [n_fine, n_coarse])[:, None]
    near = near + sigma * rng.standard_normal((n_fine + n_coarse, 3))
    uniform = rng.uniform(-1.0, 1.0, (n_uniform, 3))
    return np.concatenate([near, uniform]).astype(np.float32)


def sample_shape(mesh: trimesh.Trimesh, *, points: int, surface_points: int, rng: np.random.Generator,
                 near_sigmas: tuple[float, float] = DEFAULT_NEAR_SIGMAS,
                 mix: tuple[float, float, float] = DEFAULT_MIX,
                 backend: str = DEFAULT_BACKEND) -> ShapeSamples:
    """Query points with their signed distances, and a surface cloud with normals, for one shape."""
    if points < 1 or surface_points < 1:
        raise ValueError(f"points and surface_points must be >= 1, got {points} and {surface_points}")
    _check_mix(near_sigmas, mix)
    surface = _SurfaceSampler(mesh)
    query = _query_points(surface, points, rng, near_sigmas, mix)
    # Distances of the float32 points as stored, so every stored (point, sdf) pair is exact.
    sdf = signed_distance(mesh, query.astype(np.float64), backend)
    cloud, normals = surface(surface_points, rng)
    return ShapeSamples(query, sdf.astype(np.float32), cloud, normals)


def sample_mesh(shape_id: str, uri: str, ic: IngestConfig, seed: int) -> tuple[dict[str, np.ndarray] | None, str]:
    """Load, normalise and sample one mesh with ingest's settings: ({array name: values}, "") or
    (None, the reason it failed). What ingest stores per row, and what fit.samples=stream feeds."""
    if os.environ.get("RAYWSL_CRASH_SHAPE") == shape_id:  # fault injection for the crash test
        os._exit(139)
    try:
        mesh, center, scale = normalise(load_mesh(uri, ic.max_faces, max_bytes=ic.max_bytes), ic.margin)
    except MeshError as e:
        return None, str(e)
    try:
        s = sample_shape(mesh, points=ic.points, surface_points=ic.surface_points,
                         near_sigmas=tuple(ic.near_sigmas), mix=tuple(ic.mix), backend=ic.backend,
                         rng=shape_rng(seed, shape_id))
        if not (np.isfinite(s.sdf).all() and np.isfinite(s.points).all()):
            raise ValueError("non-finite signed distances")
    except Exception as e:  # one shape's failure must not take the shard down
        return None, f"{uri}: SDF sampling failed ({type(e).__name__}: {e})"
    return {C.POINTS: s.points, C.SDF: s.sdf, C.SURFACE: s.surface, C.NORMALS: s.normals,
            C.CENTER: center, C.SCALE: scale}, ""
