"""Per-shape SDF sampling: the default backend (igl) against mesh-to-sdf, per core, on the same meshes.

    .venv/bin/python benchmarks/ingest/bench_sdf.py [--points N] [--shapes K] [--threads T]
                                                    [--m2s-points N] [--reference-points R]

Speed: `sample_shape` end to end (query points, signed distances, surface cloud) at `--points`
query points: median of 3 runs for igl, one run for mesh-to-sdf (surface_point_method='sample',
sign_method='normal', its default 10 M-point surface cloud). With `--m2s-points` below `--points`,
mesh-to-sdf runs on fewer points and its time is extrapolated from a fixed part (drawing the cloud
and building its k-d tree, timed by a 1-point call) plus a per-point part. That underestimates it:
its per-point cost grows with the batch (on the sphere ~7,000 points/s at 40,000 points, ~4,000 at
200,000), so the default runs it in full, ~9 minutes in all.

Per core: `--threads T` (default 1) sets IGL_NUM_THREADS / OMP / BLAS thread counts and pins this
process to the first T cores it may use, before numpy or libigl are imported.

Accuracy: on `--reference-points` of the points mesh-to-sdf sampled, both backends' stored float32
values against the exact SDF of the mesh: |d| from libigl's exact point-triangle distance, sign from
libigl's exact generalised winding number (inside iff w > 1/2; O(points x faces)). For the analytic
shapes the sign is also checked against the analytic SDF, at points farther from the surface than
the tessellation error.

Meshes: icosphere, subdivided box, torus; two open meshes (the sphere with its cap cut off, the
torus with 3 % of its faces removed); and the first K of a fixed list of corpus shapes when
`raywsl.data.corpus` is there (normalised as ingest does).
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", type=int, default=200_000, help="query points per shape (200000)")
    ap.add_argument("--shapes", type=int, default=2, help="corpus shapes added to the primitives (2)")
    ap.add_argument("--threads", type=int, default=1, help="cores to use (1: per-core numbers)")
    ap.add_argument("--m2s-points", type=int, help="query points for mesh-to-sdf (default: --points)")
    ap.add_argument("--reference-points", type=int, default=20_000, help="points checked exactly (20000)")
    ap.add_argument("--surface-points", type=int, default=16_384, help="surface samples per shape (16384)")
    args = ap.parse_args()
    args.m2s_points = args.m2s_points or args.points
    return args


ARGS = parse_args()
# Thread counts and the CPU mask must be set before numpy / libigl start their thread pools.
for var in ("IGL_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)
os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: ARGS.threads])

import importlib.metadata  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable  # noqa: E402

import igl  # noqa: E402
import numpy as np  # noqa: E402
import trimesh  # noqa: E402

from raywsl.geometry.sampling import DEFAULT_MIX, DEFAULT_NEAR_SIGMAS, sample_shape  # noqa: E402
from raywsl.geometry.sdf import signed_distance  # noqa: E402

BOX_HALF = np.array([0.6, 0.4, 0.8])
TORUS = (0.6, 0.25)  # major, minor radius, around the z axis
CORPUS_INDICES = (5, 8, 6, 10, 9, 7, 2, 0)  # mug, airplane, chair, pebbles, lamp, table, double torus, blob


@dataclass
class Case:
    name: str
    mesh: trimesh.Trimesh
    analytic: Callable[[np.ndarray], np.ndarray] | None = None


def box_sdf(p):
    q = np.abs(p) - BOX_HALF
    return np.linalg.norm(np.maximum(q, 0), axis=1) + np.minimum(q.max(axis=1), 0)


def torus_sdf(p):
    return np.hypot(np.linalg.norm(p[:, :2], axis=1) - TORUS[0], p[:, 2]) - TORUS[1]


def sphere_sdf(p):
    return np.linalg.norm(p, axis=1) - 1


def cases(n_corpus: int) -> list[Case]:
    sphere = trimesh.creation.icosphere(subdivisions=5)
    box = trimesh.creation.box(extents=2 * BOX_HALF)
    for _ in range(5):  # 12 -> 12,288 faces, still exactly the box
        box = box.subdivide()
    torus = trimesh.creation.torus(*TORUS, major_sections=128, minor_sections=64)
    cap = sphere.triangles_center[:, 2] < 0.6
    kept = np.random.default_rng(0).random(len(torus.faces)) > 0.03
    out = [
        Case("sphere", sphere, sphere_sdf),
        Case("box", box, box_sdf),
        Case("torus", torus, torus_sdf),
        Case("cut sphere (open)", trimesh.Trimesh(sphere.vertices, sphere.faces[cap], process=False)),
        Case("torus, 3% faces removed (open)", trimesh.Trimesh(torus.vertices, torus.faces[kept], process=False)),
    ]
    if n_corpus > 0:
        try:
            from raywsl.data.corpus import generate_shape
            from raywsl.data.meshes import normalise
        except ImportError as e:
            print(f"(corpus shapes skipped: {e})", file=sys.stderr)
            return out
        for i in CORPUS_INDICES[:n_corpus]:
            shape = generate_shape(i, seed=0)
            out.append(Case(f"corpus {shape.shape_id}", normalise(shape.mesh, 0.03)[0]))
    return out


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def exact_sdf(mesh: trimesh.Trimesh, p: np.ndarray) -> np.ndarray:
    v, f = np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces, np.int64)
    d = np.sqrt(igl.point_mesh_squared_distance(p, v, f)[0])
    return np.where(igl.winding_number(v, f, p) > 0.5, -d, d)


def tessellation_band(case: Case) -> float:
    """Largest deviation of the mesh from the analytic surface, x1.5: beyond it the signs agree."""
    return 1.5 * float(np.abs(case.analytic(np.asarray(case.mesh.sample(100_000, seed=0)))).max())


def accuracy(sdf: np.ndarray, ref: np.ndarray, analytic: np.ndarray | None, band: float) -> dict:
    err = np.abs(sdf.astype(np.float64) - ref)
    row = {"sign_err": float(np.mean((sdf < 0) != (ref < 0))), "max_err": float(err.max()),
           "mean_err": float(err.mean())}
    if analytic is not None:
        far = np.abs(analytic) > band
        row["analytic_sign_err"] = float(np.mean((sdf[far] < 0) != (analytic[far] < 0)))
    return row


def bench(case: Case) -> dict:
    mesh, n, n_m = case.mesh, ARGS.points, ARGS.m2s_points
    kw = dict(surface_points=ARGS.surface_points, near_sigmas=DEFAULT_NEAR_SIGMAS, mix=DEFAULT_MIX)
    sample_shape(mesh, points=1000, rng=np.random.default_rng(0), **kw)  # warm-up
    runs = [timed(lambda: sample_shape(mesh, points=n, rng=np.random.default_rng(s), **kw))[0] for s in range(3)]
    t_m, s_m = timed(lambda: sample_shape(mesh, points=n_m, rng=np.random.default_rng(100),
                                          backend="mesh_to_sdf", **kw))
    t_fixed = None
    if n_m < n:  # fixed part (surface cloud + k-d tree) plus a per-point part, scaled to n points
        t_fixed, _ = timed(lambda: signed_distance(mesh, np.zeros((1, 3)), backend="mesh_to_sdf"))
        t_m = t_fixed + max(t_m - t_fixed, 0.0) * n / n_m

    pts = s_m.points.astype(np.float64)
    sdf_igl = signed_distance(mesh, pts).astype(np.float32)  # igl on the very same points, stored as float32
    sub = np.random.default_rng(1).choice(len(pts), min(ARGS.reference_points, len(pts)), replace=False)
    ref = exact_sdf(mesh, pts[sub])
    analytic = case.analytic(pts[sub]) if case.analytic else None
    band = tessellation_band(case) if case.analytic else 0.0
    t_igl = float(np.median(runs))
    closed = mesh.is_watertight and mesh.is_winding_consistent
    return {"mesh": case.name, "faces": len(mesh.faces), "closed": closed, "igl_s": t_igl, "m2s_s": t_m,
            "m2s_fixed_s": t_fixed, "ratio": t_m / t_igl, "band": band,
            "igl": accuracy(sdf_igl[sub], ref, analytic, band), "m2s": accuracy(s_m.sdf[sub], ref, analytic, band)}


def machine() -> str:
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                   platform.machine())
    packages = ("numpy", "scipy", "libigl", "trimesh", "mesh-to-sdf", "scikit-learn")
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in packages)
    cores = sorted(os.sched_getaffinity(0))
    return f"{cpu}, {os.cpu_count()} cores, run on cores {cores}; Python {platform.python_version()}, {versions}"


def main() -> None:
    n, n_m = ARGS.points, ARGS.m2s_points
    print(f"command: {' '.join([os.path.relpath(sys.executable), *sys.argv])}")
    print(f"machine: {machine()}")
    sigmas = tuple(round(s, 4) for s in DEFAULT_NEAR_SIGMAS)
    print(f"query mix (near fine, near coarse, uniform) = {DEFAULT_MIX}, near sigmas = {sigmas}\n", flush=True)
    rows = []
    for case in cases(ARGS.shapes):
        r = bench(case)
        rows.append(r)
        print(f"  {r['mesh']}: igl {r['igl_s']:.2f} s, mesh-to-sdf {r['m2s_s']:.1f} s, {r['ratio']:.0f}x",
              file=sys.stderr, flush=True)

    extrapolated = n_m < n
    print(f"Speed per shape at {n:,} query points, {ARGS.threads} thread(s)"
          + (f"; mesh-to-sdf run at {n_m:,} points and extrapolated:\n" if extrapolated else ":\n"))
    print("| mesh | faces | closed | igl s/shape | igl points/s | mesh-to-sdf s/shape | mesh-to-sdf points/s "
          "| ratio |" + (" m2s fixed s |" if extrapolated else ""))
    print("|---|---:|:-:|---:|---:|---:|---:|---:|" + ("---:|" if extrapolated else ""))
    for r in rows:
        print(f"| {r['mesh']} | {r['faces']:,} | {'yes' if r['closed'] else 'no'} | {r['igl_s']:.2f} "
              f"| {n / r['igl_s']:,.0f} | {r['m2s_s']:.1f} | {n / r['m2s_s']:,.0f} | **{r['ratio']:.0f}x** |"
              + (f" {r['m2s_fixed_s']:.1f} |" if extrapolated else ""))
    ratios = np.array([r["ratio"] for r in rows])
    print(f"\nratio: min {ratios.min():.0f}x, geometric mean {np.exp(np.log(ratios).mean()):.0f}x, "
          f"max {ratios.max():.0f}x\n")

    print(f"Accuracy on {min(ARGS.reference_points, n_m):,} of the points mesh-to-sdf sampled, against the exact "
          "mesh SDF (sign: exact winding number); last column: against the analytic SDF outside the "
          "tessellation band:\n")
    print("| mesh | backend | sign errors | max abs error | mean abs error | sign errors vs analytic (band) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        for key, label in (("igl", "igl"), ("m2s", "mesh-to-sdf")):
            a = r[key]
            vs = f"{a['analytic_sign_err']:.2%} ({r['band']:.1e})" if "analytic_sign_err" in a else "-"
            print(f"| {r['mesh']} | {label} | {a['sign_err']:.2%} | {a['max_err']:.2e} | {a['mean_err']:.2e} "
                  f"| {vs} |")


if __name__ == "__main__":
    main()
