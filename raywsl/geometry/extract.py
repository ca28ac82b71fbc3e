"""Fields -> meshes: sample a signed distance field on a regular grid, run marching cubes.

A field is a callable mapping a float32 tensor of points (n, 3) to values (n,), negative inside.
A batch of fields maps (B, n, 3) -> (B, n) (or (B, n, 1)): B shapes evaluated together, e.g. B
stacked MLPs; field b gets its own points p[b]. `extract_mesh` takes one field, `extract_meshes`
a batch, and each returns `Extraction` records: a mesh, or None and the reason there is none.

Grid convention. `resolution` n is the number of cells per axis of the cube [-bound, bound]^3. The
field is sampled at the cell corners: (n + 1)^3 points x_i = -bound + i h, h = 2 bound / n,
i = 0..n, so the cube's own corners are sample points and the grid at n / 2 is every other point
of the grid at n. Array axes 0, 1, 2 are x, y, z. Marching cubes (scikit-image, Lewiner) puts a
vertex on each cell edge whose ends lie on opposite sides of `level`, by linear interpolation;
faces are wound so that normals point towards increasing values (outward for an SDF), so a
closed mesh has positive volume. A surface that leaves the cube is cut open there. Grid values
exactly at the level (analytic shapes aligned with the grid) are legal but can pinch a part that
is one cell thin into a non-watertight mesh.

Coarse-to-fine (`coarse=`). Marching cubes only looks at cells whose corners are not all on one
side of the level, and each vertex depends only on the two values at the ends of its edge. So
the fine grid needs exact values only at the corners of cells the surface crosses, and values on
the right side of the level everywhere else. Assume the field never overestimates the distance to
its own level set by more than a factor L: |f(x) - level| <= L dist(x, {f = level}) at grid points
(true of any L-Lipschitz field; a true SDF has L = 1). Every point of a cell of side h lies within
h sqrt(3) / 2 of one of its corners, so a cell whose corners are all on one side of the level with
|f - level| > L h sqrt(3) / 2 holds no surface (the field is continuous: a sign change of the fine
grid inside it would be a point of the level set that close to a corner), and neither does any
finer cell inside it. The scheme:
  1. evaluate the dense grid at resolution `coarse`;
  2. mark the cells that may hold surface (fail that test) inside the cells marked at the level
     before (at the first level: all cells);
  3. double the resolution: every value starts as the trilinear upsample of the level before
     (inside an unmarked cell all corners are on one side, so their interpolation is too), and
     the field is evaluated exactly at the new points of marked cells; repeat 2-3 up to
     `resolution`.
At the target resolution every cell the surface crosses has all its corners evaluated exactly
and every other cell has all its corners on one side, so marching cubes gives the same mesh as
on the dense grid (bit for bit if the field gives the same value at a point whatever the chunk;
batched matrix products may differ in the last bits), at a cost ~ area / h^2 instead of
volume / h^3 field evaluations.
`lipschitz` is the assumed L. A learned field is an SDF only approximately: where it
overestimates the distance to its surface by more than `lipschitz`, surface inside a cell judged
empty is lost (typically a small floater between coarse grid points). The default 2 leaves a
factor 2 over a true SDF. A 54k-parameter MLP fitted for 200 steps overestimated by up to 2.8
near its surface and still gave exactly the dense mesh at 128^3 and 256^3, 9-19x faster
(benchmarks/eval/bench_extract.py). Raise it for rough fields (the cost grows about linearly), or
compare against a dense extraction.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import trimesh
from skimage.measure import marching_cubes

Field = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Extraction:
    """One field's result: a mesh, or None and the reason ("" when there is a mesh)."""

    mesh: trimesh.Trimesh | None
    reason: str
    seconds: float  # this field's share: the batch's field evaluation / B + its own marching cubes
    evaluated: int  # grid points at which the field was evaluated ((resolution + 1)^3 when dense)

    @property
    def ok(self) -> bool:
        return self.mesh is not None


def extract_mesh(field: Field, resolution: int = 256, **kwargs) -> Extraction:
    """One field (n, 3) -> (n,); keyword arguments as for `extract_meshes`."""
    return extract_meshes(lambda p: field(p[0]).reshape(1, -1), 1, resolution, **kwargs)[0]


def extract_meshes(
    fields: Field,
    n_fields: int,
    resolution: int = 256,
    *,
    bound: float = 1.0,
    level: float = 0.0,
    coarse: int | None = None,
    lipschitz: float = 2.0,
    chunk: int = 1 << 18,
    device: str | torch.device = "auto",
    center: np.ndarray | None = None,
    scale: float | np.ndarray | None = None,
) -> list[Extraction]:
    """Meshes of the level sets of a batch of `n_fields` fields (B, n, 3) -> (B, n).

    resolution: cells per axis of [-bound, bound]^3. coarse: None for the dense grid, or the
    resolution coarse-to-fine starts at (resolution / coarse must be a power of 2); lipschitz: the
    Lipschitz bound it assumes (see the module docstring). chunk: points per field call, summed
    over the batch (bounds memory). device: where points are made and the fields run ("auto":
    cuda if available). center (3,) or (B, 3) and scale () or (B,): map vertices back to the
    shapes' original frames, where normalised = (original - center) * scale.
    A field with no crossing of `level` or with NaN/Inf values gets mesh None and a reason; the
    others in the batch are unaffected.
    """
    if coarse is not None and not (coarse > 0 and resolution % coarse == 0
                                   and (resolution // coarse).bit_count() == 1):
        raise ValueError(f"resolution / coarse must be a power of 2, got {resolution} / {coarse}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    grid = _Grid(fields, n_fields, bound, chunk, torch.device(device))

    t0 = time.perf_counter()
    n = resolution if coarse is None else coarse
    values = grid.evaluate(n, None)  # (n + 1)^3 per field
    evaluated = [values[0].size] * n_fields
    reasons = [_nonfinite(v) for v in values]
    marked: list[np.ndarray | None] = [None] * n_fields  # cells that may hold surface, per field
    while n < resolution:
        margin = lipschitz * (2 * bound / n) * math.sqrt(3) / 2
        todo = []
        for b in range(n_fields):
            if reasons[b]:  # a broken field gets no more evaluations
                todo.append(np.empty(0, np.int64))
                continue
            cells = _may_hold_surface(values[b] - level, margin)
            if marked[b] is not None:
                cells &= _upsample_cells(marked[b])
            marked[b] = cells
            values[b] = _upsample(values[b])
            todo.append(_new_points(cells))
        n *= 2
        for b, (idx, new) in enumerate(zip(todo, grid.evaluate(n, todo))):
            np.put(values[b], idx, new)
            evaluated[b] += len(idx)
            reasons[b] = reasons[b] or _nonfinite(new)
    share = (time.perf_counter() - t0) / n_fields

    centers = np.broadcast_to(np.zeros(3) if center is None else np.asarray(center, float), (n_fields, 3))
    scales = np.broadcast_to(1.0 if scale is None else np.asarray(scale, float), (n_fields,))
    out = []
    for b in range(n_fields):
        t1 = time.perf_counter()
        mesh, reason = None, reasons[b]
        if not reason:
            mesh, reason = _march(values[b], level, bound)
        if mesh is not None:
            mesh.vertices = mesh.vertices / scales[b] + centers[b]
        out.append(Extraction(mesh, reason, share + time.perf_counter() - t1, evaluated[b]))
    return out


DECODE_BATCH = 8  # fields decoded at once by decode_rows


def decode_device(fit_device: str) -> str:
    """Where a run decodes its fields (recon, stability, the encoder's figures, the probes): the GPU of
    the process when there is one, unless fit.device is cpu."""
    return "cuda" if fit_device != "cpu" and torch.cuda.is_available() else "cpu"


def decode_rows(bind: Callable[[torch.Tensor], Field], rows: torch.Tensor, resolution: int,
                device: str | torch.device = "cpu", batch: int = DECODE_BATCH) -> list[Extraction]:
    """Meshes of weight rows (n, P): `bind(rows)` makes their batched field (a field type's `bind`),
    decoded `batch` rows at a time on `device`, without gradients. What recon, sample and the
    stability experiment share."""
    out: list[Extraction] = []
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch].to(device)
        with torch.no_grad():
            out += extract_meshes(bind(chunk), len(chunk), resolution, device=device)
    return out


class _Grid:
    """Evaluates a batch of fields at grid points, chunk by chunk, without gradients."""

    def __init__(self, fields: Field, n_fields: int, bound: float, chunk: int, device: torch.device):
        self.fields, self.n_fields, self.bound, self.device = fields, n_fields, bound, device
        self.per_call = max(1, chunk // n_fields)  # points per field in one call

    @torch.no_grad()
    def evaluate(self, n: int, idx: list[np.ndarray] | None) -> list[np.ndarray]:
        """Float32 values per field on the (n + 1)^3 grid: at the flat indices `idx[b]` for field b
        (shorter lists padded with point 0, whose values are dropped), or, if idx is None, at
        every point, as a (n + 1, n + 1, n + 1) array."""
        B = self.n_fields
        if idx is None:
            m, padded = (n + 1) ** 3, None
        else:
            m = max(len(i) for i in idx)
            padded = np.zeros((B, m), np.int64)
            for b, i in enumerate(idx):
                padded[b, : len(i)] = i
        out = np.empty((B, m), np.float32)
        for s in range(0, m, self.per_call):
            e = min(s + self.per_call, m)
            if padded is None:
                points = self._coords(torch.arange(s, e, device=self.device), n).expand(B, -1, -1)
            else:
                points = self._coords(torch.from_numpy(padded[:, s:e]).to(self.device), n)
            v = self.fields(points)
            if v.numel() != B * (e - s):
                raise ValueError(f"fields returned shape {tuple(v.shape)} for points {tuple(points.shape)}")
            out[:, s:e] = v.reshape(B, e - s).float().cpu().numpy()
        if idx is None:
            return list(out.reshape(B, n + 1, n + 1, n + 1))
        return [o[: len(i)] for o, i in zip(out, idx)]

    def _coords(self, q: torch.Tensor, n: int) -> torch.Tensor:
        """Flat indices (..., k) -> points (..., k, 3); the same float32 values at every level
        (h halves exactly), so the coarse-to-fine and dense grids sample identical points."""
        ijk = torch.stack((q // (n + 1) ** 2, q // (n + 1) % (n + 1), q % (n + 1)), dim=-1)
        return ijk.float() * (2 * self.bound / n) - self.bound


def _nonfinite(values: np.ndarray) -> str:
    bad = int(np.count_nonzero(~np.isfinite(values)))
    return f"no surface: NaN/Inf field values at {bad:,} of {values.size:,} points evaluated" if bad else ""


def _corners(g: np.ndarray) -> list[np.ndarray]:
    """The 8 corner values of every cell of a (n + 1)^3 grid, each as an n^3 array."""
    n = g.shape[0] - 1
    return [g[a:a + n, b:b + n, c:c + n] for a in (0, 1) for b in (0, 1) for c in (0, 1)]


def _may_hold_surface(g: np.ndarray, margin: float) -> np.ndarray:
    """Cells (n^3 bool) not proven empty: corners not all > margin and not all < -margin."""
    corners = _corners(g)  # pairwise reduce: np.minimum.reduce(corners) would stack all 8 first
    return (functools.reduce(np.minimum, corners) <= margin) & (functools.reduce(np.maximum, corners) >= -margin)


def _upsample(v: np.ndarray) -> np.ndarray:
    """(n + 1)^3 -> (2n + 1)^3 by trilinear interpolation. With align_corners the old points land
    exactly on the even indices (weights 1 and 0), so evaluated values are kept bit for bit."""
    t = torch.from_numpy(v)[None, None]
    size = (2 * v.shape[0] - 1,) * 3
    return torch.nn.functional.interpolate(t, size=size, mode="trilinear", align_corners=True)[0, 0].numpy()


def _upsample_cells(cells: np.ndarray) -> np.ndarray:
    """n^3 -> (2n)^3: each cell's 8 children."""
    return cells.repeat(2, 0).repeat(2, 1).repeat(2, 2)


def _new_points(cells: np.ndarray) -> np.ndarray:
    """Flat indices on the (2n + 1)^3 grid of the points of marked n^3 cells that the n grid lacks."""
    fine = _upsample_cells(cells)
    m = fine.shape[0]
    points = np.zeros((m + 1,) * 3, bool)
    for a in (0, 1):
        for b in (0, 1):
            for c in (0, 1):
                points[a:a + m, b:b + m, c:c + m] |= fine
    points[::2, ::2, ::2] = False  # already evaluated at the coarser level
    return np.flatnonzero(points)


def _march(values: np.ndarray, level: float, bound: float) -> tuple[trimesh.Trimesh | None, str]:
    lo, hi = float(values.min()), float(values.max())
    if not lo < level < hi:  # marching cubes needs the level strictly inside the value range
        side = "above" if lo >= level else "below"
        return None, f"no surface: field {side} level {level:g} everywhere (range [{lo:.3g}, {hi:.3g}])"
    h = 2 * bound / (values.shape[0] - 1)
    try:
        verts, faces, _, _ = marching_cubes(values, level, spacing=(h, h, h), allow_degenerate=False)
    except (ValueError, RuntimeError) as e:  # recorded, never raised: one bad field must not stop a batch
        return None, f"no surface: marching cubes failed: {e}"
    if len(faces) == 0:
        return None, "no surface: marching cubes produced no faces"
    return trimesh.Trimesh(verts - bound, faces), ""
