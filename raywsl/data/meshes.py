"""Loading one mesh: read, validate, clean, normalise into the unit sphere.

Every problem with one mesh raises `MeshError` whose message names the file and what is wrong, so
ingest can record it as that row's failure and go on with the rest. Open or non-watertight meshes
are not errors: the SDF backend's winding-number sign handles them.
"""

from __future__ import annotations

import posixpath

import fsspec
from fsspec.implementations.local import LocalFileSystem
import numpy as np
import trimesh


class MeshError(ValueError):
    """One mesh cannot be used; the message says which file and why."""


def load_mesh(uri: str, max_faces: int) -> trimesh.Trimesh:
    """Read any format trimesh reads (scenes are merged into one mesh) and check it is usable."""
    ext = posixpath.splitext(uri)[1].lstrip(".").lower()
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        if not fs.exists(path):
            raise MeshError(f"{uri}: file not found")
        if isinstance(fs, LocalFileSystem):
            loaded = trimesh.load(path, force="mesh", process=False)  # keeps .mtl etc. beside it
        else:
            with fs.open(path, "rb") as f:
                loaded = trimesh.load(f, file_type=ext, force="mesh", process=False)
    except MeshError:
        raise
    except Exception as e:  # trimesh raises many types for bad files
        raise MeshError(f"{uri}: cannot read as a .{ext} mesh ({type(e).__name__}: {e})") from e
    if not isinstance(loaded, trimesh.Trimesh) or len(loaded.faces) == 0:
        raise MeshError(f"{uri}: empty mesh (no faces)")
    mesh = loaded
    if len(mesh.faces) > max_faces:
        raise MeshError(f"{uri}: {len(mesh.faces):,} faces, above the limit ingest.max_faces={max_faces:,}")
    bad = ~np.isfinite(mesh.vertices).all(axis=1)
    if bad.any():
        raise MeshError(f"{uri}: {int(bad.sum())} of {len(mesh.vertices)} vertices have NaN/Inf coordinates")
    if mesh.faces.max() >= len(mesh.vertices) or mesh.faces.min() < 0:
        raise MeshError(f"{uri}: faces index vertices that do not exist")
    # Merge duplicate vertices and drop zero-area faces: neither changes the surface.
    mesh = trimesh.Trimesh(mesh.vertices, mesh.faces, process=True, validate=True)
    if len(mesh.faces) == 0 or mesh.area <= 1e-12 * max(mesh.scale, 1e-30) ** 2:
        raise MeshError(f"{uri}: degenerate geometry (total surface area {mesh.area:.3g})")
    if mesh.scale <= 0:
        raise MeshError(f"{uri}: degenerate geometry (all vertices coincide)")
    return mesh


def normalise(mesh: trimesh.Trimesh, margin: float) -> tuple[trimesh.Trimesh, np.ndarray, float]:
    """Centre on the bounding-box centre and scale so the mesh fits in a sphere of radius
    1 / (1 + margin). Returns (normalised mesh, center, scale) with normalised = (v - center) * scale."""
    center = mesh.bounds.mean(axis=0)
    radius = float(np.linalg.norm(mesh.vertices - center, axis=1).max())
    if not radius > 0:
        raise MeshError("degenerate geometry: all vertices coincide")
    scale = 1.0 / ((1.0 + margin) * radius)
    out = trimesh.Trimesh((mesh.vertices - center) * scale, mesh.faces, process=False)
    return out, center, scale
