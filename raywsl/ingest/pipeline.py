"""`raywsl ingest`: meshes -> SDF samples in `samples.zarr`, as a Ray Data job.

    manifest (data.source) --driver--> samples.zarr created, one row per mesh, all shards pending
    pending shard ids --Ray Data--> ingest_shards (one task per shard: load, normalise, sample,
                                    write the shard, then its done marker) --> per-shard summaries

The driver only creates the store and prints progress; the workers write their own shards, so
nothing large flows back through Ray. Re-running the same command resumes: shards with a done
marker are skipped, the others are recomputed from scratch. Sampling is seeded per shape (from
`seed` and the shape id), so a resumed store equals an uninterrupted one, whatever the scheduling.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from typing import Any

import numpy as np

from raywsl import layout as L
from raywsl.config import Config, fingerprint, to_dict
from raywsl.data.meshes import MeshError, load_mesh, normalise
from raywsl.data.sources import MeshRef, resolve_source
from raywsl.ingest.sampling import sample_shape, shape_rng
from raywsl.progress import Progress
from raywsl.runtime import ray_session, task_concurrency
from raywsl.store.rows import DONE, FAILED, ArraySpec, RowStore

log = logging.getLogger(__name__)

MAX_BLOCKS = 4096  # one shard per block up to here; beyond, blocks hold several shards
MAX_LOGGED_FAILURES = 20
TASK_RETRIES = 2  # retries of a shard task whose worker process died


def sample_arrays(cfg: Config) -> list[ArraySpec]:
    m, s = cfg.ingest.points, cfg.ingest.surface_points
    return [ArraySpec(L.POINTS, (m, 3)), ArraySpec(L.SDF, (m,)), ArraySpec(L.SURFACE, (s, 3)),
            ArraySpec(L.NORMALS, (s, 3)), ArraySpec(L.CENTER, (3,), "float64"), ArraySpec(L.SCALE, (), "float64")]


def samples_fingerprint(cfg: Config, refs: list[MeshRef]) -> str:
    """What decides the samples: the seed, the ingest settings and the meshes (ids, URIs, labels)."""
    return fingerprint("samples", cfg.seed, to_dict(cfg.ingest, fingerprint_only=True),
                       [(r.shape_id, r.uri, r.category) for r in refs])


def ingest(cfg: Config, restart: bool = False) -> dict[str, Any]:
    """Run (or resume) ingest for `cfg`; returns the store summary (as `raywsl inspect --json`)."""
    run = L.RunLayout(cfg.run_dir)
    refs = resolve_source(cfg.data.source)
    fp = samples_fingerprint(cfg, refs)
    store = RowStore.open_or_create(
        run.samples, kind="samples", fingerprint=fp, restart=restart,
        ids=[r.shape_id for r in refs], sources=[r.uri for r in refs],
        categories=[r.category for r in refs], shard_size=cfg.ingest.shard_size,
        arrays=sample_arrays(cfg),
        attrs={"data_source": cfg.data.source, "seed": cfg.seed, "ingest": to_dict(cfg.ingest),
               "test_fraction": cfg.ingest.test_fraction,
               "normalisation": "normalised = (v - center) * scale; sdf < 0 inside"})
    pending = store.pending_shards()
    log.info("ingest: %d meshes in %d shards -> %s (%d shards already done)",
             store.n_rows, store.n_shards, store.path, store.n_shards - len(pending))
    if pending:
        with ray_session(cfg.ray.address, cfg.ray.num_cpus or None):
            _run_shards(store, pending, cfg)
    summary = store.summary()
    for f in summary["failures"][:MAX_LOGGED_FAILURES]:
        log.warning("failed: %s: %s", f["shape_id"], f["reason"])
    if summary["failed"] > MAX_LOGGED_FAILURES:
        log.warning("... and %d more failures: `raywsl inspect %s` lists them all",
                    summary["failed"] - MAX_LOGGED_FAILURES, store.path)
    if summary["pending"]:
        log.warning("%d rows are pending (shards that did not finish): rerun the same command to "
                    "retry them", summary["pending"])
    return summary


def _run_shards(store: RowStore, pending: list[int], cfg: Config) -> None:
    """Run the pending shards; then, if some lost their worker (a native crash on one mesh), find
    the meshes that crash it, fail just those rows, and run those shards again."""
    _shard_pass(store, pending, cfg, skip={})
    crashed = [k for k in pending if not store.shards_done()[k]]
    if crashed:
        log.warning("%d shard(s) lost their worker process; probing their meshes one by one", len(crashed))
        skip = _find_crashing_rows(store, crashed, cfg)
        _shard_pass(store, crashed, cfg, skip)


def _shard_pass(store: RowStore, shards: list[int], cfg: Config, skip: dict[int, str]) -> None:
    import ray

    # Ray Data retries a task whose worker died without limit: one mesh that crashes a native
    # library would hang the job. Bound the retries and let such blocks fail; their shards keep
    # no marker and are handled by the caller.
    ray.data.DataContext.get_current().max_errored_blocks = len(shards)
    ds = ray.data.from_items([{"shard": k} for k in shards], override_num_blocks=min(len(shards), MAX_BLOCKS))
    with warnings.catch_warnings():  # Ray 2.60 has no named parameter for max_retries yet
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = ds.map_batches(ingest_shards, batch_size=1, num_cpus=1, concurrency=task_concurrency(),
                            max_retries=TASK_RETRIES,
                            fn_kwargs={"path": store.path, "cfg": cfg, "skip": skip})
    rows = [store.shard_rows(k) for k in shards]
    progress = Progress("ingest", total=sum(r.stop - r.start for r in rows), unit="shapes")
    for row in ds.iter_rows():
        progress.update(int(row["done"]) + int(row["failed"]), failed=int(row["failed"]))
        log.debug("shard %d: %d done, %d failed in %.1fs", row["shard"], row["done"], row["failed"],
                  row["seconds"])
    progress.close()


def _find_crashing_rows(store: RowStore, shards: list[int], cfg: Config) -> dict[int, str]:
    """Sample every row of `shards` in its own task, without retries: the rows whose task dies are
    the culprits. Returns {row: reason}."""
    import ray

    probe = ray.remote(num_cpus=1, max_retries=0)(sample_row)
    refs = {}
    for k in shards:
        rows = store.shard_rows(k)
        meta = store.row_meta(rows)
        for row, shape_id, uri in zip(range(rows.start, rows.stop), meta[L.SHAPE_ID], meta[L.SOURCE]):
            refs[row] = (str(uri), probe.remote(str(shape_id), str(uri), cfg))
    crashing = {}
    for row, (uri, ref) in refs.items():
        try:
            ray.get(ref)
        except ray.exceptions.RayError as e:
            crashing[row] = f"{uri}: the worker process died while sampling this mesh ({type(e).__name__})"
            log.warning("row %d crashes its worker: %s", row, uri)
    return crashing


def ingest_shards(batch: dict[str, np.ndarray], path: str, cfg: Config,
                  skip: dict[int, str] | None = None) -> dict[str, np.ndarray]:
    """Ray Data task: compute and write each shard of `batch`; return one summary row per shard.
    Rows in `skip` are recorded as failed with the given reason, without sampling."""
    # One SDF thread per task: Ray runs one task per core, and libigl would otherwise start a
    # thread per core in each of them (read when libigl first runs in this worker process).
    os.environ.setdefault("IGL_NUM_THREADS", "1")
    store = RowStore.open(path, mode="r+", kind="samples")
    out: dict[str, list] = {"shard": [], "done": [], "failed": [], "seconds": []}
    for k in batch["shard"].tolist():
        t0 = time.perf_counter()
        if store.shards_done()[k]:  # a retried task may find its shard already committed
            status = store.read_shard(k, [L.STATUS])[L.STATUS]
        else:
            status = _ingest_shard(store, k, cfg, skip or {})
        out["shard"].append(k)
        out["done"].append(int((status == DONE).sum()))
        out["failed"].append(int((status == FAILED).sum()))
        out["seconds"].append(time.perf_counter() - t0)
    return {key: np.asarray(v) for key, v in out.items()}


def _ingest_shard(store: RowStore, k: int, cfg: Config, skip: dict[int, str]) -> np.ndarray:
    rows = store.shard_rows(k)
    meta = store.row_meta(rows)
    n = rows.stop - rows.start
    arrays = {spec.name: np.zeros((n, *spec.row_shape), spec.dtype) for spec in sample_arrays(cfg)}
    status = np.full(n, FAILED, dtype="int8")
    reason = [""] * n
    for i, (shape_id, uri) in enumerate(zip(meta[L.SHAPE_ID].tolist(), meta[L.SOURCE].tolist())):
        if rows.start + i in skip:
            reason[i] = skip[rows.start + i]
            continue
        values, reason[i] = sample_row(shape_id, uri, cfg)
        if values:
            for name, value in values.items():
                arrays[name][i] = value
            status[i] = DONE
    store.write_shard(k, arrays, status, reason)
    return status


def sample_row(shape_id: str, uri: str, cfg: Config) -> tuple[dict[str, np.ndarray] | None, str]:
    """Load, normalise and sample one mesh: (arrays, "") or (None, the reason it failed)."""
    ic = cfg.ingest
    if os.environ.get("RAYWSL_CRASH_SHAPE") == shape_id:  # fault injection for the crash test
        os._exit(139)
    try:
        mesh, center, scale = normalise(load_mesh(uri, ic.max_faces), ic.margin)
    except MeshError as e:
        return None, str(e)
    try:
        s = sample_shape(mesh, points=ic.points, surface_points=ic.surface_points,
                         near_sigmas=tuple(ic.near_sigmas), mix=tuple(ic.mix), backend=ic.backend,
                         rng=shape_rng(cfg.seed, shape_id))
        if not (np.isfinite(s.sdf).all() and np.isfinite(s.points).all()):
            raise ValueError("non-finite signed distances")
    except Exception as e:  # one shape's failure must not take the shard down
        return None, f"{uri}: SDF sampling failed ({type(e).__name__}: {e})"
    return {L.POINTS: s.points, L.SDF: s.sdf, L.SURFACE: s.surface, L.NORMALS: s.normals,
            L.CENTER: center, L.SCALE: scale}, ""
