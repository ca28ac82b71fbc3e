"""`raywsl ingest`: meshes -> SDF samples in the sample store (samples.zarr), as a Ray Data job.

    the source's meshes --driver--> samples.zarr created in the cache (atomically), one row per mesh
                                    in the fixed order of store/split.py (held-out shapes first),
                                    every shard pending
    the shards this run needs (held-out rows + its data.shapes training rows) that are pending
                        --Ray Data--> ingest_shards (one task per shard: load, normalise, sample,
                                      write the shard, then its done marker) --> per-shard summaries

The driver only creates the store and shows progress; the workers write their own shards, so nothing
large flows back through Ray. A later run that needs more shapes fills the shards it lacks; a killed
run resumes (shards with a done marker are skipped, the others recomputed from scratch). Sampling is
seeded per shape (from `seed` and the shape id), so a resumed or extended store equals one made at
once, whatever the scheduling.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

from raywsl import cache
from raywsl import contract as C
from raywsl.config import Config, to_dict
from raywsl.data.sources import MeshRef, resolve_source
from raywsl.geometry.sampling import sample_mesh
from raywsl.progress import Progress
from raywsl.runtime import (PROBE_ATTEMPTS, ShardsUnfinished, finish_shards, isolate_crashes, ray_remote_args,
                            ray_session, task_concurrency, unfinished_message)
from raywsl.store.rows import DONE, FAILED, ArraySpec, RowStore
from raywsl.store.split import held_out_count, shards_of, store_order

log = logging.getLogger(__name__)

MAX_BLOCKS = 4096  # one shard per block up to here; beyond, blocks hold several shards
MAX_LOGGED_FAILURES = 20
TASK_RETRIES = 2  # retries of a shard task whose worker process died


def sample_arrays(cfg: Config) -> list[ArraySpec]:
    m, s = cfg.ingest.points, cfg.ingest.surface_points
    return [ArraySpec(C.POINTS, (m, 3)), ArraySpec(C.SDF, (m,)), ArraySpec(C.SURFACE, (s, 3)),
            ArraySpec(C.NORMALS, (s, 3)), ArraySpec(C.CENTER, (3,), "float64"), ArraySpec(C.SCALE, (), "float64")]


def source_fingerprint(refs: list[MeshRef]) -> str:
    """What identifies a source: its meshes' ids, URIs and labels."""
    return C.fingerprint("source", sorted((r.shape_id, r.uri, r.category) for r in refs))


def ordered_refs(cfg: Config, refs: list[MeshRef]) -> list[MeshRef]:
    """The source's meshes in the stores' row order (store/split.py)."""
    return [refs[k] for k in store_order([r.shape_id for r in refs], cfg.seed)]


def needed_rows(store: RowStore, cfg: Config) -> range:
    """The rows a run needs ingested: the held-out ones, then its training shapes, up to the end of
    the last weight shard fit will fill (fit works whole shards: a row it finds without samples would
    be committed as failed)."""
    n = cfg.ingest_shapes
    if not n:
        return range(store.n_rows)
    stop = int(store.attrs[C.Attr.HELD_OUT]) + n
    return range(min(store.n_rows, -(-stop // cfg.fit.shard_size) * cfg.fit.shard_size))


def create_store(cfg: Config, plan: C.Plan) -> RowStore:
    """The sample store of `plan`, created in the cache (complete or not at all) if it is not there."""
    art = plan["ingest"]
    if store := RowStore.open_published(plan.samples, "samples", art.path):
        return store
    refs = ordered_refs(cfg, resolve_source(plan.source))
    ids = [r.shape_id for r in refs]
    with cache.publishing(art, {"rows": len(refs)}) as folder:
        RowStore.create(
            C.join(folder, C.SAMPLES), kind="samples", fingerprint=art.fingerprint,
            ids=ids, sources=[r.uri for r in refs], categories=[r.category for r in refs],
            shard_size=cfg.ingest.shard_size, arrays=sample_arrays(cfg),
            reasons=[C.REJECTED + r.problem if r.problem else "" for r in refs],
            attrs={C.Attr.DATA_SOURCE: cfg.data.source, C.Attr.SEED: cfg.seed, C.Attr.INGEST: to_dict(cfg.ingest),
                   C.Attr.TEST_FRACTION: cfg.ingest.test_fraction,
                   C.Attr.HELD_OUT: held_out_count(ids, cfg.seed, cfg.ingest.test_fraction),
                   C.Attr.NORMALISATION: "normalised = (v - center) * scale; sdf < 0 inside"})
    return RowStore.open(plan.samples, mode="r+", kind="samples")


def ingest(cfg: Config, plan: C.Plan) -> dict[str, Any]:
    """Fill the rows of the sample store this run needs; returns the counts over those rows (as
    `raywsl inspect --json` has them) and `computed`, the number of shards ingested now. Raises
    ShardsUnfinished, after everything else is written, if shards could not be finished for a
    reason no single mesh explains (their rows stay pending for the rerun)."""
    store = create_store(cfg, plan)
    rows = needed_rows(store, cfg)
    shards = shards_of(store, rows)
    pending = store.pending_shards(shards)
    log.info("ingest: %d of %d meshes needed (%d held out) in %d shards -> %s (%d shards already done)",
             len(rows), store.n_rows, int(store.attrs[C.Attr.HELD_OUT]), len(shards), store.path,
             len(shards) - len(pending))
    errors: dict[int, str] = {}
    if pending:
        with ray_session(cfg.ray.address, cfg.ray.num_cpus or None):
            errors = finish_shards(pending, lambda shards, skip: _shard_pass(store, shards, cfg, skip),
                                   store.pending_shards, lambda shards: _find_crashing_rows(store, shards, cfg),
                                   worker="worker process", shape=("mesh", "meshes"))
    summary = store.rows_summary(rows)
    for f in summary["failures"][:MAX_LOGGED_FAILURES]:
        log.warning("failed: %s: %s", f["shape_id"], f["reason"])
    if summary["failed"] > MAX_LOGGED_FAILURES:
        log.warning("... and %d more failures: `raywsl inspect %s` lists them all",
                    summary["failed"] - MAX_LOGGED_FAILURES, store.path)
    if errors:
        raise ShardsUnfinished(unfinished_message("ingest", store, errors))
    return {**summary, "computed": len(pending)}


def _shard_pass(store: RowStore, shards: list[int], cfg: Config, skip: dict[int, str]) -> dict[int, str]:
    """One Ray Data pass over `shards`; returns {shard: error} of the shards whose task raised.
    Shards whose worker died (Ray Data's retries used up) come back neither done nor in the result."""
    import ray

    ds = ray.data.from_items([{"shard": k} for k in shards], override_num_blocks=min(len(shards), MAX_BLOCKS))
    tasks = task_concurrency()  # a pool no larger than its input blocks (else Ray warns that it is)
    with ray_remote_args():  # max_retries
        ds = ds.map_batches(ingest_shards, batch_size=1, num_cpus=1,
                            compute=ray.data.TaskPoolStrategy(size=tasks and min(tasks, len(shards), MAX_BLOCKS)),
                            memory=_memory(cfg), max_retries=TASK_RETRIES,
                            fn_kwargs={"path": store.path, "cfg": cfg, "skip": skip})
    # Ray Data retries a task whose worker died, without limit by default: one mesh that crashes a
    # native library would hang the job. The retries are bounded above; the blocks that still fail
    # are let through (the caller probes their shards). On this dataset's own context: the global
    # one would leak into every later dataset of the process.
    ds.context.max_errored_blocks = len(shards)
    rows = [store.shard_rows(k) for k in shards]
    progress = Progress("ingest", total=sum(r.stop - r.start for r in rows), unit="shapes")
    errors = {}
    for row in ds.iter_rows():
        if row["error"]:
            errors[int(row["shard"])] = str(row["error"])
            log.warning("shard %d failed: %s", row["shard"], row["error"])
            continue
        progress.update(int(row["done"]) + int(row["failed"]), failed=int(row["failed"]))
        log.debug("shard %d: %d done, %d failed in %.1fs", row["shard"], row["done"], row["failed"],
                  row["seconds"])
    progress.close()
    return errors


def probe_mesh(shape_id: str, uri: str, ic, seed: int) -> str:
    """Sample one mesh and return only its verdict ("" or why it fails), never the samples."""
    os.environ.setdefault("IGL_NUM_THREADS", "1")
    return sample_mesh(shape_id, uri, ic, seed)[1]


def _find_crashing_rows(store: RowStore, shards: list[int], cfg: Config) -> dict[int, str]:
    """The rows of `shards` whose mesh kills the process sampling it, alone, every time: {row: reason}."""
    calls = {}
    for k in shards:
        rows = store.shard_rows(k)
        meta = store.row_meta(rows)
        for row, shape_id, uri in zip(range(rows.start, rows.stop), meta[C.SHAPE_ID], meta[C.SOURCE]):
            calls[row] = (str(shape_id), str(uri), cfg.ingest, cfg.seed)
    verdicts = isolate_crashes(probe_mesh, calls, attempts=PROBE_ATTEMPTS, num_cpus=1, memory=_memory(cfg))
    for row, why in verdicts.items():
        log.warning("row %d (%s): %s while sampling it", row, calls[row][1], why)
    return {row: f"{calls[row][1]}: {why} while sampling this mesh, alone, {PROBE_ATTEMPTS} times"
            for row, why in verdicts.items()}


def _memory(cfg: Config) -> int | None:
    """Ray's `memory` reservation of one ingest task, in bytes (None: no reservation)."""
    return int(cfg.ingest.memory_gb * 1024**3) or None


def ingest_shards(batch: dict[str, np.ndarray], path: str, cfg: Config,
                  skip: dict[int, str] | None = None) -> dict[str, np.ndarray]:
    """Ray Data task: compute and write each shard of `batch`; return one summary row per shard.
    Rows in `skip` are recorded as failed with the given reason, without sampling. An exception
    is not a mesh's fault (sample_mesh records those): it is reported in the shard's `error`, and
    the shard stays pending."""
    # One SDF thread per task: Ray runs one task per core, and libigl would otherwise start a
    # thread per core in each of them (read when libigl first runs in this worker process).
    os.environ.setdefault("IGL_NUM_THREADS", "1")
    out: dict[str, list] = {"shard": [], "done": [], "failed": [], "seconds": [], "error": []}
    for k in batch["shard"].tolist():
        t0 = time.perf_counter()
        status, error = np.zeros(0, "int8"), ""
        try:
            _maybe_fail(k)
            store = RowStore.open(path, mode="r+", kind="samples")
            if store.shard_done(k):  # a retried task may find its shard already committed
                status = store.shard_status(k)
            else:
                status = _ingest_shard(store, k, cfg, skip or {})
        except Exception as e:  # noqa: BLE001 - reported to the driver, which stops the job
            error = f"{type(e).__name__}: {e}"
        out["shard"].append(k)
        out["done"].append(int((status == DONE).sum()))
        out["failed"].append(int((status == FAILED).sum()))
        out["seconds"].append(time.perf_counter() - t0)
        out["error"].append(error)
    return {key: np.asarray(v) for key, v in out.items()}


def _maybe_fail(k: int) -> None:
    """Fault injection for the tests: shard $RAYWSL_FAIL_SHARD raises an environment error, as a full
    disk would (or, with $RAYWSL_FAIL_MODE=crash, kills its process, as a lost node would); every
    time, or with $RAYWSL_FAIL_MARKER only the first time (the file records that it did)."""
    marker = os.environ.get("RAYWSL_FAIL_MARKER", "")
    if os.environ.get("RAYWSL_FAIL_SHARD") != str(k) or (marker and os.path.exists(marker)):
        return
    if marker:
        open(marker, "w").close()
    if os.environ.get("RAYWSL_FAIL_MODE") == "crash":
        os._exit(137)
    raise OSError(28, "No space left on device (injected)")


def _ingest_shard(store: RowStore, k: int, cfg: Config, skip: dict[int, str]) -> np.ndarray:
    rows = store.shard_rows(k)
    meta = store.row_meta(rows)
    n = rows.stop - rows.start
    arrays = {spec.name: np.zeros((n, *spec.row_shape), spec.dtype) for spec in sample_arrays(cfg)}
    status = np.full(n, FAILED, dtype="int8")
    reason = [""] * n
    written = store.read_shard(k, [C.REASON])[C.REASON]  # the driver's rejections (create_store)
    for i, (shape_id, uri) in enumerate(zip(meta[C.SHAPE_ID].tolist(), meta[C.SOURCE].tolist())):
        if str(written[i]).startswith(C.REJECTED):
            reason[i] = str(written[i])
            continue
        if rows.start + i in skip:
            reason[i] = skip[rows.start + i]
            continue
        values, reason[i] = sample_mesh(shape_id, uri, cfg.ingest, cfg.seed)
        if values:
            for name, value in values.items():
                arrays[name][i] = value
            status[i] = DONE
    store.write_shard(k, arrays, status, reason)
    return status
