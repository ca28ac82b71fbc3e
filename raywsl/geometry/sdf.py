"""Signed distance from a triangle mesh to query points: negative inside, positive outside.

Backends live in `SDF_BACKENDS`; each is `fn(vertices (V,3) float64, faces (F,3) int64,
points (M,3) float64) -> sdf (M,) float64`, and `signed_distance` dispatches to them by name.

- `igl` (default): exact and robust. The magnitude is the exact distance to the triangles (libigl
  AABB tree); the sign comes from libigl's generalised winding number w (inside iff w > 0.5), which
  stays meaningful on meshes with holes, open boundaries, overlapping parts or self-intersections.
  The magnitude is never taken from a winding-number-signed routine: libigl's `signed_distance`
  scales it by (1 - 2w), which is wrong wherever w is fractional (open meshes).
- `mesh_to_sdf`: the reference the field uses (mesh-to-sdf, surface_point_method='sample',
  sign_method='normal'): distance to the nearest of 10 M surface samples, sign by a vote of the
  normals of the 11 nearest samples. Approximate in magnitude, wrong in sign near open boundaries,
  and slow; kept to compare against. (Its default 'scan' method needs an OpenGL context.)

How `igl` is made fast, per core (numbers: benchmarks/RESULTS.md), without giving up exactness:
- Both trees (AABB for distance, Barnes-Hut BVH for the winding number) are built once per call:
  ~15 ms each for 20 k faces. Building is cheap; querying is what costs.
- Queries run in Morton (Z-curve) order, so consecutive points walk the same tree nodes: 25-40 %
  faster than random order, same results.
- Sign on closed meshes (every directed edge matched by its reverse; see `_is_closed`): w is then
  an integer that only changes across the surface, and each point's open ball of radius |sdf| is
  empty, so two points whose balls overlap share w. Morton neighbours are clustered that way and w
  is evaluated once per cluster: 10-20x fewer evaluations. Open meshes get w at every point.
- Fast winding numbers within WINDING_MARGIN of 1/2 (near the w = 1/2 sheet that spans the holes
  of open meshes) are recomputed exactly, so the sign is that of the exact winding number as long
  as the fast one errs by less than the margin (7x the largest error we measured).
Tried and dropped: per-point upper bounds (libigl's `signed_distance(upper_bound=...)` is no
faster even with the exact distance as the bound: far from a smooth surface the cost is the many
triangles almost as close as the nearest one, not a loose bound); reordering faces and vertices
(no effect); fcpw 1.2's BVH (float32 only; 1.5x faster than libigl overall, not worth a second
native dependency). That far-field cost dominates: on a 20 k-face sphere, uniform points inside it
take ~9 us each against ~1.5 us near the surface. libigl's threads follow `IGL_NUM_THREADS`
(default: all cores).
"""

from __future__ import annotations

import time
from typing import Callable

import igl
import numpy as np
import trimesh
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

SdfBackend = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

MESH_TO_SDF_SURFACE_SAMPLES = 10_000_000  # mesh-to-sdf's own default sample_point_count
WINDING_MARGIN = 0.02  # fast winding numbers this close to 1/2 are recomputed exactly
WINDING_LINKS = 4  # Morton-order neighbours tried when clustering points of equal winding number


# Morton code of a byte: its 8 bits spread 3 apart, so three coordinates interleave by shift-or.
_SPREAD_BITS = np.array([sum(((i >> b) & 1) << (3 * b) for b in range(8)) for i in range(256)], np.uint32)


def _morton_order(points: np.ndarray) -> np.ndarray:
    """Permutation that sorts points along a Z-order curve on a 256^3 grid over their bounding box."""
    # Per-column reductions: (n, 3).min(axis=0) is ~8x slower on a C-ordered array.
    lo = np.array([points[:, i].min() for i in range(3)])
    hi = np.array([points[:, i].max() for i in range(3)])
    cells = ((points - lo) * (255 / max(float((hi - lo).max()), 1e-300))).astype(np.uint8)
    spread = _SPREAD_BITS[cells]
    code = spread[:, 0] | (spread[:, 1] << 1) | (spread[:, 2] << 2)
    return np.argsort(code)  # not stable, but deterministic; the order within a cell does not matter


def _is_closed(faces: np.ndarray, n_vertices: int) -> bool:
    """True if every directed edge a->b is matched by an edge b->a: the faces then form a closed
    surface (a 2-cycle: holes, boundaries or flipped faces break it; overlaps, self-intersections
    and non-manifold edges do not), and its winding number is an integer that only changes where
    a path crosses the surface."""
    edges = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2).astype(np.int64)
    forward = edges[:, 0] * n_vertices + edges[:, 1]
    backward = edges[:, 1] * n_vertices + edges[:, 0]
    return np.array_equal(np.sort(forward), np.sort(backward))


def _winding_clusters(points: np.ndarray, dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group points (in Morton order) that provably share their winding number w.r.t. a closed
    surface: each point's open ball of radius `dist` (its exact distance to the surface) is empty,
    so two points whose balls overlap (|p - q| < dist_p + dist_q) are joined through the union of
    the two balls without crossing the surface. Only the next WINDING_LINKS points along the curve
    are tried: cheap, and most near neighbours are found that way. Returns each point's cluster
    label and, per cluster, its point farthest from the surface."""
    reach = (1 - 1e-6) * dist  # the factor absorbs rounding
    linked = []  # linked[k - 1][i]: point i is joined to point i + k
    for k in range(1, WINDING_LINKS + 1):
        step = points[k:] - points[:-k]
        r = reach[k:] + reach[:-k]
        linked.append(np.einsum("ij,ij->i", step, step) < r * r)
    # Runs of points joined to their successor are clusters already; a graph over the runs (a few
    # times fewer nodes than points) joins those that the longer links connect.
    run = np.concatenate([[0], np.cumsum(~linked[0])])
    rows, cols = [np.empty(0, np.intp)], [np.empty(0, np.intp)]
    for k, joined in enumerate(linked[1:], start=2):
        i = np.flatnonzero(joined)
        a, b = run[i], run[i + k]
        rows.append(a[a != b])
        cols.append(b[a != b])
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    n_runs = int(run[-1]) + 1
    links = coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(n_runs, n_runs))
    n_clusters, run_label = connected_components(links, directed=False)
    label = run_label[run]
    farthest = np.full(n_clusters, -np.inf)
    np.maximum.at(farthest, label, dist)
    candidates = np.flatnonzero(dist == farthest[label])
    representative = np.empty(n_clusters, np.intp)
    representative[label[candidates]] = candidates  # on ties any of them: all are as far
    return label, representative


def _inside(vertices: np.ndarray, faces: np.ndarray, points: np.ndarray) -> np.ndarray:
    """w > 0.5 for the generalised winding number w. The fast (Barnes-Hut) winding number is off by
    up to ~3e-3 on our test meshes; wherever it lands within WINDING_MARGIN of 0.5 (only near the
    w = 1/2 sheet spanning the holes of open meshes) w is recomputed exactly, O(faces) per point."""
    wn = igl.FastWindingNumberBVH()
    wn.init(vertices, faces)
    w = wn.winding_number(points)
    unsure = np.abs(w - 0.5) < WINDING_MARGIN
    if unsure.any():
        w[unsure] = igl.winding_number(vertices, faces, np.ascontiguousarray(points[unsure]))
    return w > 0.5


class _Laps:
    """CPU time of this process between calls, added up per name into `timings` (if given): how
    benchmarks/ingest/profile_shard.py sees the parts of a backend without a copy of its steps."""

    def __init__(self, timings: dict[str, float] | None):
        self.timings, self.t = timings, time.process_time()

    def __call__(self, name: str) -> None:
        if self.timings is not None:
            now = time.process_time()
            self.timings[name] = self.timings.get(name, 0.0) + now - self.t
            self.t = now


def _igl(vertices: np.ndarray, faces: np.ndarray, points: np.ndarray, *,
         timings: dict[str, float] | None = None) -> np.ndarray:
    lap = _Laps(timings)
    order = _morton_order(points)
    q = np.ascontiguousarray(points[order])
    lap("morton order")
    tree = igl.AABB()
    tree.init(vertices, faces)
    lap("AABB build")
    dist = np.sqrt(tree.squared_distance(vertices, faces, q)[0])
    lap("distance")
    if _is_closed(faces, len(vertices)):
        lap("closed check")
        # One winding number per cluster, at its point farthest from the surface (where the fast
        # winding number is both cheapest and most accurate): 10-20x fewer evaluations.
        label, representative = _winding_clusters(q, dist)
        lap("clusters")
        inside = _inside(vertices, faces, np.ascontiguousarray(q[representative]))[label]
    else:
        lap("closed check")
        inside = _inside(vertices, faces, q)
    lap("winding number")
    sdf = np.empty(len(points))
    sdf[order] = np.where(inside, -dist, dist)
    lap("sign + unsort")
    return sdf


def _mesh_to_sdf(vertices: np.ndarray, faces: np.ndarray, points: np.ndarray, *,
                 surface_samples: int = MESH_TO_SDF_SURFACE_SAMPLES) -> np.ndarray:
    """`mesh_to_sdf.mesh_to_sdf(mesh, points, surface_point_method='sample', sign_method='normal')`,
    in the mesh's own units (that call does not rescale; only `sample_sdf_near_surface` does).

    Its surface cloud is drawn here with a fixed seed instead of NumPy's global RNG, so the result
    is deterministic; otherwise this is exactly what that call computes."""
    # Imported lazily: it pulls in pyrender / PyOpenGL. The 'sample' + 'normal' path never creates a
    # GL context, so no PYOPENGL_PLATFORM / display setting is needed (checked headless).
    from mesh_to_sdf.surface_point_cloud import SurfacePointCloud

    mesh = trimesh.Trimesh(vertices, faces, process=False)
    samples, face_index = trimesh.sample.sample_surface(mesh, surface_samples, seed=0)
    cloud = SurfacePointCloud(mesh, samples, normals=mesh.face_normals[face_index])
    return np.asarray(cloud.get_sdf_in_batches(points, use_depth_buffer=False), dtype=np.float64)


SDF_BACKENDS: dict[str, SdfBackend] = {"igl": _igl, "mesh_to_sdf": _mesh_to_sdf}


def signed_distance(mesh: trimesh.Trimesh, points: np.ndarray, backend: str = "igl") -> np.ndarray:
    """Signed distance (negative inside) from `mesh` to each of `points` (M, 3), float64 (M,)."""
    fn = SDF_BACKENDS.get(backend)
    if fn is None:
        raise ValueError(f"unknown SDF backend {backend!r}; allowed: {', '.join(SDF_BACKENDS)}")
    vertices = np.ascontiguousarray(mesh.vertices, dtype=np.float64)
    faces = np.ascontiguousarray(mesh.faces, dtype=np.int64)
    if len(faces) == 0 or len(vertices) == 0:
        raise ValueError(f"cannot compute signed distance to an empty mesh "
                         f"({len(vertices)} vertices, {len(faces)} faces)")
    if not np.isfinite(vertices).all():
        raise ValueError("mesh has non-finite vertex coordinates")
    if faces.shape[1] != 3 or faces.min() < 0 or faces.max() >= len(vertices):
        raise ValueError(f"mesh faces must be (F, 3) indices into its {len(vertices)} vertices")
    points = np.ascontiguousarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"query points must have shape (M, 3), got {points.shape}")
    if not np.isfinite(points).all():
        bad = int((~np.isfinite(points).all(axis=1)).sum())
        raise ValueError(f"{bad} of {len(points)} query points are not finite (NaN or inf)")
    if len(points) == 0:
        return np.empty(0)
    return fn(vertices, faces, points)
