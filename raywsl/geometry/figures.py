"""PNG figures, headless: mesh renders and the plots an evaluation reports.

Figures are built on `matplotlib.figure.Figure` objects and saved with the Agg renderer, never via
pyplot, so nothing needs a display and no global figure state leaks between calls. Every function
writes one PNG of a fixed pixel size (no tight bounding box) and returns its path.

Meshes are drawn by a small numpy z-buffer rasteriser rather than matplotlib's Poly3DCollection,
which sorts and draws polygons one by one and takes seconds per 20k-face mesh: orthographic
projection from a fixed 3/4 view with +Y up, per-pixel depth, flat Lambert shading per face, 2x2
supersampling. Faces seen from behind (the inside of an open surface, or an inverted mesh) are
drawn in a warm colour so such defects show.
"""

from __future__ import annotations

import io
import math
import os
from typing import Mapping, Sequence, Union

import numpy as np
import trimesh
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from raywsl import cache

PathLike = Union[str, os.PathLike]  # a local path or an fsspec URL (s3://...)

DPI = 100
FRONT = np.array([0.55, 0.68, 0.88])  # outward faces
BACK = np.array([0.90, 0.62, 0.42])  # faces seen from inside
BACKGROUND = 1.0
LIGHT = np.array([-0.35, 0.55, 1.0]) / np.linalg.norm([-0.35, 0.55, 1.0])  # upper left, in front (view coords)
MAX_CANDIDATES = 1 << 21  # (face, pixel) candidates tested at once: bounds temporaries to ~250 MB


def _view_basis(elev: float, azim: float) -> np.ndarray:
    """Rows: screen right, screen up, towards the camera; a rotation (det +1), so outward faces
    keep facing the camera. azim turns the camera from +Z towards +X, elev raises it above XZ."""
    el, az = math.radians(elev), math.radians(azim)
    forward = np.array([math.sin(az) * math.cos(el), math.sin(el), math.cos(az) * math.cos(el)])
    right = np.cross([0.0, 1.0, 0.0], forward)
    right /= np.linalg.norm(right)
    return np.stack([right, np.cross(forward, right), forward])


def render_mesh(mesh: trimesh.Trimesh, size: int = 256, elev: float = 25.0, azim: float = 35.0,
                supersample: int = 2) -> np.ndarray:
    """An RGB image (size, size, 3) in [0, 1] of `mesh`, centred and scaled to fill the frame."""
    s = size * supersample
    v = np.asarray(mesh.vertices, dtype=np.float64)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    centre = (v.min(axis=0) + v.max(axis=0)) / 2
    radius = max(np.linalg.norm(v - centre, axis=1).max(), 1e-12)
    v = (v - centre) / radius @ _view_basis(elev, azim).T
    tri = v[faces]  # (F, 3 corners, xyz) in view coords, within the unit ball
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-30)
    facing = normals[:, 2] >= 0
    lambert = np.abs(normals @ LIGHT)  # two-sided: light the side the camera sees
    colours = np.where(facing[:, None], FRONT, BACK) * (0.25 + 0.75 * lambert)[:, None]

    # Screen coordinates in pixels (row 0 at the top), with a small margin around the unit disc.
    px = (tri[..., 0] * 0.9 + 1) * (s / 2)
    py = (1 - tri[..., 1] * 0.9) * (s / 2)
    x0 = np.clip(np.floor(px.min(axis=1) - 0.5), 0, s - 1).astype(np.int64)
    x1 = np.clip(np.ceil(px.max(axis=1) - 0.5), 0, s - 1).astype(np.int64)
    y0 = np.clip(np.floor(py.min(axis=1) - 0.5), 0, s - 1).astype(np.int64)
    y1 = np.clip(np.ceil(py.max(axis=1) - 0.5), 0, s - 1).astype(np.int64)
    width, height = x1 - x0 + 1, y1 - y0 + 1
    denom = (py[:, 1] - py[:, 2]) * (px[:, 0] - px[:, 2]) + (px[:, 2] - px[:, 1]) * (py[:, 0] - py[:, 2])
    ids = np.flatnonzero(np.abs(denom) > 1e-12)  # edge-on faces cover no pixel centre
    counts = (width * height)[ids]

    depth = np.full(s * s, -np.inf)
    face_at = np.full(s * s, -1, dtype=np.int64)
    bounds = np.searchsorted(np.cumsum(counts), np.arange(MAX_CANDIDATES, counts.sum(), MAX_CANDIDATES))
    for chunk, n in zip(np.split(ids, bounds), np.split(counts, bounds)):
        # One row per (face, pixel of its bounding box): barycentric test at the pixel centre.
        f = np.repeat(chunk, n)
        local = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        ix, iy = x0[f] + local % width[f], y0[f] + local // width[f]
        dx, dy = ix + 0.5 - px[f, 2], iy + 0.5 - py[f, 2]
        l0 = ((py[f, 1] - py[f, 2]) * dx + (px[f, 2] - px[f, 1]) * dy) / denom[f]
        l1 = ((py[f, 2] - py[f, 0]) * dx + (px[f, 0] - px[f, 2]) * dy) / denom[f]
        l2 = 1 - l0 - l1
        inside = (l0 >= -1e-9) & (l1 >= -1e-9) & (l2 >= -1e-9)
        f, l0, l1, l2 = f[inside], l0[inside], l1[inside], l2[inside]
        z = l0 * tri[f, 0, 2] + l1 * tri[f, 1, 2] + l2 * tri[f, 2, 2]
        pix = (iy * s + ix)[inside]
        np.maximum.at(depth, pix, z)  # nearest surface per pixel (larger z = closer)
        won = z >= depth[pix]
        face_at[pix[won]] = f[won]

    image = np.full((s * s, 3), BACKGROUND)
    hit = face_at >= 0
    image[hit] = colours[face_at[hit]]
    return image.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))


def _render_cell(ax, mesh: trimesh.Trimesh | None, size: int, elev: float = 25.0, azim: float = 35.0) -> None:
    """One mesh's render in `ax`; a None or face-less mesh gets an empty cell saying "no surface"."""
    ax.set_axis_off()
    if mesh is None or len(mesh.faces) == 0:
        ax.imshow(np.full((size, size, 3), 0.93), vmin=0, vmax=1)
        ax.text(0.5, 0.5, "no surface", ha="center", va="center", color="0.35", transform=ax.transAxes)
    else:
        ax.imshow(render_mesh(mesh, size, elev, azim), vmin=0, vmax=1, interpolation="nearest")


def render_meshes(meshes: Sequence[trimesh.Trimesh | None], path, titles: Sequence[str] | None = None,
                  ncols: int = 4, size: int = 256, elev: float = 25.0, azim: float = 35.0) -> PathLike:
    """A grid of renders, one cell of `size` x `size` pixels (plus a title line) per mesh; a None
    or face-less mesh gets an empty cell saying "no surface". Each mesh is framed on its own."""
    n = max(len(meshes), 1)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    title_px = 22 if titles is not None else 0
    height = nrows * (size + title_px)  # pixels; each cell is a title band above a square image
    fig = Figure(figsize=(ncols * size / DPI, height / DPI), dpi=DPI)
    for i, mesh in enumerate(meshes):
        row, col = divmod(i, ncols)
        _render_cell(fig.add_axes((col / ncols, 1 - (row + 1) / nrows, 1 / ncols, size / height)), mesh, size,
                     elev, azim)
        if titles is not None:
            fig.text((col + 0.5) / ncols, 1 - row / nrows - 0.5 * title_px / height, str(titles[i]),
                     ha="center", va="center", fontsize=9)
    return save_figure(fig, path)


def plot_histogram(values: Mapping[str, Sequence[float]], path, xlabel: str, bins: int = 50,
                   title: str | None = None) -> PathLike:
    """Overlaid histograms on shared bins (e.g. distances of generated vs reference shapes).
    Non-finite values are left out and counted in the legend."""
    fig = Figure(figsize=(6.4, 4.8), dpi=DPI)
    ax = fig.add_subplot()
    arrays = {name: np.asarray(v, dtype=np.float64).ravel() for name, v in values.items()}
    finite = [a[np.isfinite(a)] for a in arrays.values()]
    pooled = np.concatenate(finite) if finite else np.empty(0)
    if pooled.size:
        edges = np.histogram_bin_edges(pooled, bins=bins)
        for (name, a), f in zip(arrays.items(), finite):
            label = f"{name} (n={f.size}, mean={f.mean():.4g})" if f.size else f"{name} (n=0)"
            if f.size < a.size:
                label += f", {a.size - f.size} non-finite"
            ax.hist(f, bins=edges, alpha=0.55, label=label)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


def plot_spectrum(explained_ratio: Sequence[float], path, title: str | None = None) -> PathLike:
    """PCA spectrum: explained-variance ratio per component (log scale) and its cumulative sum."""
    ratio = np.asarray(explained_ratio, dtype=np.float64)
    k = np.arange(1, len(ratio) + 1)
    fig = Figure(figsize=(6.4, 4.8), dpi=DPI)
    ax = fig.add_subplot()
    ax.plot(k, np.where(ratio > 0, ratio, np.nan), "o-", ms=3, color="C0", label="per component")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("principal component")
    ax.set_ylabel("explained variance ratio", color="C0")
    cum = ax.twinx()
    cum.plot(k, np.cumsum(ratio), "-", color="C1")
    cum.set_ylim(0, 1.02)
    cum.set_ylabel("cumulative", color="C1")
    ax.set_title(title or f"top {len(ratio)} components: {np.sum(ratio):.1%} of the variance")
    return save_figure(fig, path)


def plot_embedding(W, labels: Sequence | None, path, method: str = "pca", seed: int = 0,
                   title: str | None = None) -> PathLike:
    """A 2-D embedding of weight vectors (rows of W), coloured by label. `method`: "pca" (the top
    two principal directions, axes show their variance share) or "tsne" (on the top-50 PCA
    projection, the usual preprocessing for very wide vectors; minutes for thousands of points)."""
    from sklearn.decomposition import PCA

    W = np.asarray(W, dtype=np.float64)
    if method == "pca":
        pca = PCA(n_components=2, random_state=seed).fit(W)
        xy = pca.transform(W)
        axis_labels = [f"PC{i + 1} ({r:.1%})" for i, r in enumerate(pca.explained_variance_ratio_)]
    elif method == "tsne":
        from sklearn.manifold import TSNE

        reduced = PCA(n_components=min(50, *W.shape), random_state=seed).fit_transform(W)
        # Exact gradients below 500 points: as fast there, and Barnes-Hut's OpenMP start-up can
        # take tens of seconds on a busy machine.
        xy = TSNE(n_components=2, perplexity=min(30.0, (len(W) - 1) / 3), init="pca", random_state=seed,
                  method="exact" if len(W) <= 500 else "barnes_hut").fit_transform(reduced)
        axis_labels = ["t-SNE 1", "t-SNE 2"]
    else:
        raise ValueError(f"unknown embedding method {method!r} (pca or tsne)")

    fig = Figure(figsize=(6.4, 5.6), dpi=DPI)
    ax = fig.add_subplot()
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=10)
    else:
        classes, y = np.unique(np.asarray(labels), return_inverse=True)
        n = len(classes)
        # Distinct qualitative colours up to 20 classes (with a legend); a continuous map beyond.
        cmap = colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"]
        for i, name in enumerate(classes):
            ax.scatter(xy[y == i, 0], xy[y == i, 1], s=10, label=str(name),
                       color=cmap(i) if n <= 20 else cmap(i / (n - 1)))
        if n <= 20:
            ax.legend(fontsize=8, loc="best")
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.set_title(title or f"{len(W)} weight vectors ({method})")
    return save_figure(fig, path)


def plot_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path, xlabel: str = "step",
                ylabel: str = "loss", log_y: bool | None = None, title: str | None = None) -> PathLike:
    """Line plots of name -> (steps, values), e.g. loss curves. `log_y` defaults to a log axis
    when every finite value is positive."""
    fig = Figure(figsize=(6.4, 4.8), dpi=DPI)
    ax = fig.add_subplot()
    values = [np.asarray(v, dtype=np.float64) for _, v in curves.values()]
    finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.empty(0)
    for (name, (steps, _)), v in zip(curves.items(), values):
        ax.plot(np.asarray(steps), v, label=name, lw=1.2)
    if log_y if log_y is not None else (finite.size > 0 and bool((finite > 0).all())):
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if curves:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_bands(panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]]], path,
               xlabel: str = "step", title: str | None = None, log_y: Sequence[str] = ()) -> PathLike:
    """Side-by-side panels, one per ylabel -> {name: (x, mean, std)}: a line per name with the band
    mean ± std shaded (e.g. a metric averaged over shapes). A name keeps its colour in every panel;
    non-finite values leave gaps. Panels named in `log_y` get a log y axis (the band's lower edge is
    then clipped at a tenth of the mean)."""
    fig = Figure(figsize=(6.4 * max(len(panels), 1), 4.8), dpi=DPI)
    names = list(dict.fromkeys(name for curves in panels.values() for name in curves))
    for i, (ylabel, curves) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for name, (x, mean, std) in curves.items():
            x, mean, std = (np.asarray(a, dtype=np.float64) for a in (x, mean, std))
            colour = f"C{names.index(name) % 10}"
            ax.plot(x, mean, "o-", ms=3, lw=1.2, color=colour, label=name)
            low = np.maximum(mean - std, mean / 10) if ylabel in log_y else mean - std
            ax.fill_between(x, low, mean + std, color=colour, alpha=0.2, lw=0)
        if ylabel in log_y:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if curves:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def save_figure(fig: Figure, path: PathLike) -> PathLike:
    """Write the PNG atomically (a reader never sees half a picture) to a local path or an fsspec URL;
    returns `path`."""
    png = io.BytesIO()
    fig.savefig(png, dpi=DPI, format="png")
    cache.write_bytes(os.fspath(path), png.getvalue())
    return path


def plot_with_renders(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                      meshes: Sequence[trimesh.Trimesh | None], titles: Sequence[str], path, xlabel: str,
                      ylabel: str, marks: Sequence[float] = (), title: str | None = None,
                      size: int = 200) -> PathLike:
    """A step plot of name -> (x, y) above a row of mesh renders (e.g. the number of components along an
    interpolation, with the shapes at the `marks`, drawn as dashed lines on the plot)."""
    n = max(len(meshes), 1)
    width = max(6.4 * DPI, n * size)
    plot_px, title_px = 320, 22
    height = plot_px + size + title_px
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    ax = fig.add_axes((0.08, (size + title_px + 40) / height, 0.88, (plot_px - 70) / height))
    for name, (x, y) in curves.items():
        ax.step(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), where="mid", lw=1.2,
                label=name, alpha=0.85)
    for m in marks:
        ax.axvline(m, color="0.4", ls="--", lw=0.8)
    ys = np.concatenate([np.asarray(y, dtype=np.float64) for _, y in curves.values()]) if curves else np.zeros(1)
    ys = ys[np.isfinite(ys)] if np.isfinite(ys).any() else np.zeros(1)
    ax.set_ylim(ys.min() - 0.5, ys.max() + 0.5)  # a constant count is a line in the middle, not a zoom on it
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(curves) > 1:
        ax.legend(fontsize=7, ncol=min(len(curves), 5))
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9, wrap=True)
    cell = size / width
    left = (1 - n * cell) / 2
    for i, mesh in enumerate(meshes):
        _render_cell(fig.add_axes((left + i * cell, 0, cell, size / height)), mesh, size)
        fig.text(left + (i + 0.5) * cell, (size + title_px / 2) / height, str(titles[i]), ha="center",
                 va="center", fontsize=8)
    return save_figure(fig, path)
