"""Where one ingest shard's time goes: every stage of `sample_mesh` and the shard write, per mesh.

    .venv/bin/python benchmarks/ingest/profile_shard.py MESH [MESH ...] [--points N] [--surface-points S]
                                                        [--repeat R] [--cprofile] [--threads T]

Each MESH is a mesh file (as ingest reads it). Per mesh, the stages of `raywsl.geometry.sampling.
sample_mesh` run one after the other under explicit timers of this process's CPU time (so other
load on the machine barely moves them), the median of `--repeat` runs after a warm-up, pinned to
`--threads` cores (1: per-core numbers; set before numpy / libigl load):

    read        trimesh.load (the file, process=False)
    process     the rest of load_mesh: checks, vertex merge / zero-area faces (process=True, validate=True)
    normalise   centring and scaling into the unit sphere
    query       query points (sample_query_points; it and sample_surface each build the face
                table that sample_shape builds once for both)
    sdf         signed distances of the query points (signed_distance), split into its parts
    surface     surface cloud + normals (sample_surface)
    finish      finiteness checks and the float32 copies of sample_shape / sample_mesh
    write       RowStore.write_shard of one shard of these meshes (a real Zarr store on disk, in a
                temporary folder), per mesh; the store's creation is not counted (the driver does it once)

`--cprofile` also prints the top functions of one `sample_mesh` call per mesh (cumulative time).
"""

from __future__ import annotations

import argparse
import os


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("meshes", nargs="+", help="mesh files")
    ap.add_argument("--points", type=int, default=200_000, help="query points per shape (200000)")
    ap.add_argument("--surface-points", type=int, default=16_384, help="surface points per shape (16384)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per mesh; the median is shown (3)")
    ap.add_argument("--threads", type=int, default=1, help="cores to use (1: per-core numbers)")
    ap.add_argument("--cprofile", action="store_true", help="print a cProfile of one sample_mesh per mesh")
    return ap.parse_args()


ARGS = parse_args()
for var in ("IGL_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)
os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: ARGS.threads])

import cProfile  # noqa: E402
import pstats  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import trimesh  # noqa: E402

from raywsl import contract as C  # noqa: E402
from raywsl.config import Config  # noqa: E402
from raywsl.data.meshes import load_mesh, normalise  # noqa: E402
from raywsl.geometry import sdf as sdf_module  # noqa: E402
from raywsl.geometry.sampling import sample_mesh, sample_query_points, sample_surface, shape_rng  # noqa: E402
from raywsl.ingest.pipeline import sample_arrays  # noqa: E402
from raywsl.store.rows import DONE, RowStore  # noqa: E402

STAGES = ("read", "process", "normalise", "query", "sdf", "surface", "finish")


def sdf_parts(mesh: trimesh.Trimesh, query: np.ndarray) -> dict[str, float]:
    """The parts of signed_distance: input checks and copies, then whatever the backend reports
    through its `timings` hook, if it has one (sdf._igl(..., timings=dict))."""
    t = {}
    t0 = time.process_time()
    vertices = np.ascontiguousarray(mesh.vertices, dtype=np.float64)
    faces = np.ascontiguousarray(mesh.faces, dtype=np.int64)
    points = np.ascontiguousarray(query, dtype=np.float64)
    t["sdf: input copies"] = time.process_time() - t0
    parts: dict[str, float] = {}
    try:
        sdf_module._igl(vertices, faces, points, timings=parts)
    except TypeError:  # a backend without the hook: only its total
        t0 = time.process_time()
        sdf_module._igl(vertices, faces, points)
        parts["backend"] = time.process_time() - t0
    t.update({f"sdf: {k}": v for k, v in parts.items()})
    return t


def stages(path: str, cfg: Config) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    ic, t = cfg.ingest, {}
    t0 = time.process_time()
    loaded = trimesh.load(path, force="mesh", process=False)
    t["read"] = time.process_time() - t0
    t0 = time.process_time()
    mesh = load_mesh(path, ic.max_faces)
    t["process"] = max(time.process_time() - t0 - t["read"], 0.0)  # load_mesh reads the file again
    del loaded
    t0 = time.process_time()
    mesh, center, scale = normalise(mesh, ic.margin)
    t["normalise"] = time.process_time() - t0
    rng = shape_rng(cfg.seed, os.path.basename(path))
    t0 = time.process_time()
    query = sample_query_points(mesh, ic.points, rng, tuple(ic.near_sigmas), tuple(ic.mix))
    t["query"] = time.process_time() - t0
    t0 = time.process_time()
    sdf = sdf_module.signed_distance(mesh, query, ic.backend)
    t["sdf"] = time.process_time() - t0
    t0 = time.process_time()
    surface, normals = sample_surface(mesh, ic.surface_points, rng)
    t["surface"] = time.process_time() - t0
    t0 = time.process_time()
    sdf32 = np.asarray(sdf, dtype=np.float32)
    ok = np.isfinite(sdf32).all() and np.isfinite(query).all()
    t["finish"] = time.process_time() - t0
    assert ok, path
    return t, {C.POINTS: query, C.SDF: sdf32, C.SURFACE: surface, C.NORMALS: normals,
               C.CENTER: center, C.SCALE: scale}


def write_times(values: list[dict[str, np.ndarray]], cfg: Config, repeat: int) -> float:
    """Seconds per mesh to write one shard holding all `values` rows (median of `repeat` writes)."""
    n = len(values)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        cfg.ingest.shard_size = n
        store = RowStore.create(os.path.join(tmp, "samples.zarr"), kind="samples", fingerprint="profile",
                                ids=[f"m{i}" for i in range(n)], sources=[""] * n, categories=[""] * n,
                                shard_size=n, arrays=sample_arrays(cfg))
        arrays = {spec.name: np.stack([v[spec.name] for v in values]).astype(spec.dtype)
                  for spec in sample_arrays(cfg)}
        status, reason = np.full(n, DONE, "int8"), [""] * n
        runs = []
        for _ in range(repeat):
            t0 = time.process_time()
            store.write_shard(0, arrays, status, reason)
            runs.append(time.process_time() - t0)
    return float(np.median(runs)) / n


def main() -> None:
    cfg = Config()
    cfg.ingest.points, cfg.ingest.surface_points = ARGS.points, ARGS.surface_points
    print(f"{ARGS.points:,} query points, {ARGS.surface_points:,} surface points, {ARGS.threads} thread(s), "
          f"median of {ARGS.repeat}\n")
    rows, values = [], []
    for path in ARGS.meshes:
        stages(path, cfg)  # warm-up (imports, caches)
        runs = [stages(path, cfg) for _ in range(ARGS.repeat)]
        t = {k: float(np.median([r[0][k] for r in runs])) for k in STAGES}
        values.append(runs[0][1])
        mesh = normalise(load_mesh(path, cfg.ingest.max_faces), cfg.ingest.margin)[0]
        parts = [sdf_parts(mesh, runs[0][1][C.POINTS]) for _ in range(ARGS.repeat)]
        t.update({k: float(np.median([p[k] for p in parts])) for k in parts[0]})
        t0 = time.process_time()
        sample_mesh(os.path.basename(path), path, cfg.ingest, cfg.seed)
        t["sample_mesh (one call)"] = time.process_time() - t0
        rows.append((os.path.basename(path), len(mesh.faces), bool(mesh.is_watertight), t))
        if ARGS.cprofile:
            prof = cProfile.Profile()
            prof.runcall(sample_mesh, os.path.basename(path), path, cfg.ingest, cfg.seed)
            print(f"--- cProfile of sample_mesh({os.path.basename(path)}), top 25 by cumulative time")
            pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    write = write_times(values, cfg, ARGS.repeat)

    keys = list(STAGES) + sorted({k for r in rows for k in r[3] if k.startswith("sdf: ")}, key=lambda k: k)
    keys += ["sample_mesh (one call)"]
    print("| stage (s) | " + " | ".join(f"{name} ({faces:,} f{'' if closed else ', open'})"
                                        for name, faces, closed, _ in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{r[3][k]:.3f}" if k in r[3] else "-" for r in rows) + " |")
    total = [sum(r[3][k] for k in STAGES) for r in rows]
    print("| **sum of stages** | " + " | ".join(f"**{x:.3f}**" for x in total) + " |")
    print(f"| write (per mesh, one shard of {len(rows)}) | " + " | ".join(f"{write:.3f}" for _ in rows) + " |")


if __name__ == "__main__":
    main()
