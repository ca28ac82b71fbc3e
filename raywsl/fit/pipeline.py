"""`raywsl fit`: the sample store -> one fitted field per shape in the weight store, as a Ray Data job.

    samples.zarr (or data.source sampled on the fly: fit.samples=stream, see inputs.py)
                 --driver--> weights.zarr created in the cache (same rows as the sample store, shards
                             of fit.shard_size), and the shared start row (shared: a seeded init;
                             warm: the anchor shape, fitted once in one Ray task), kept in the store
    the pending weight shards of this run's training shapes (data.shapes; never the held-out ones)
                 --RowStoreDatasource--> one block of samples per shard
                 --map_batches(FitActor pool)--> each actor fits its block B shapes at a time
                             (continuous batching), writes the shard, then its done marker
    --> fit_loss_curve.png beside the store: the mean loss of the shapes fitted this time

The weight store is a RowStore (store/rows.py), so resuming is the ingest story: shards with a done
marker are skipped, the others are refitted from scratch, and a later run with more shapes fits only
the shards it lacks. A shard's content depends only on its rows, the seed and the config (per-shape
init and point order are seeded by shape id, and a block is always one whole shard), so a resumed or
extended store equals one fitted at once. Actor processes that die are restarted by Ray and their
block is retried (bounded), losing no rows. The reconstructions are a stage of their own (recon.py).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
import torch

from raywsl import __version__, cache
from raywsl import contract as C
from raywsl import tracking
from raywsl.config import Config, to_dict
from raywsl.fit.engine import BatchedFitter, FitResult, ShapeData
from raywsl.fit.inputs import INPUTS, shape_samples
from raywsl.geometry import figures
from raywsl.geometry.sampling import shape_rng
from raywsl.models.fields import Field, field_from_config
from raywsl.progress import Progress
from raywsl.runtime import (PROBE_ATTEMPTS, ShardsUnfinished, crash_verdict, finish_shards, isolate_crashes,
                            ray_remote_args, ray_session, remote, unfinished_message)
from raywsl.store.rows import DONE, FAILED, ArraySpec, RowStore, StoreError
from raywsl.store.split import shards_of, training_range

log = logging.getLogger(__name__)

# The fitting actors' fault tolerance. Ray Data retries a block whose actor died without limit by
# default: one shape that crashes the process would hang the job, so a block's retries are bounded.
# The actors' restarts are not (-1): Ray Data's pool never replaces an actor that died for good, so
# with bounded restarts the blocks still to come would wait forever for it.
TASK_RETRIES = 2
ACTOR_RESTARTS = -1


def weight_arrays(field: Field) -> list[ArraySpec]:
    return [ArraySpec(C.ROW_WEIGHTS, (field.layout.size,)), ArraySpec(C.FIT_LOSS, ()),
            ArraySpec(C.FIT_STEPS, (), "int32"), ArraySpec(C.FIT_RESTARTS, (), "int32")]


def plan_field(cfg: Config, plan: C.Plan) -> Field:
    """The field of `cfg`, on the plan's trained base when its type needs one."""
    return field_from_config(cfg, base=plan["train-base"].path if "train-base" in plan else "")


# ------------------------------------------------------------------------------------ init strategies

def init_generator(seed: int, shape_id: str | None = None) -> torch.Generator:
    """The generator of a shared init (shape_id None) or of one shape's init."""
    if shape_id is None:
        return torch.Generator().manual_seed(seed)
    return torch.Generator().manual_seed(int(shape_rng(seed, shape_id).integers(2**62)))


def init_row(field: Field, init: str, seed: int, shape_id: str, shared: torch.Tensor | None) -> torch.Tensor:
    """The starting weights of one shape: its own seeded draw (random), its row from training the base
    (trained, when it has one) or the shared start row (shared: one seeded draw for all; warm: the
    anchor's fitted weights)."""
    if init == "random":
        return field.init_rows(1, init_generator(seed, shape_id))[0]
    if init == "trained" and (row := field.trained_row(shape_id)) is not None:
        return row
    assert shared is not None, f"fit.init={init} needs the shared start row"
    return shared


def fit_one(field: Field, cfg: Config, samples_path: str, row: int, shape_id: str, uri: str,
            start: torch.Tensor) -> FitResult:
    """Fit one shape alone from `start`, its samples read or sampled here (a Ray task: the warm-start
    anchor, with fit.gpus_per_actor GPUs when scaling.use_gpu; a crash probe)."""
    _maybe_crash_on([shape_id])
    points, sdf = shape_samples(cfg, samples_path, row, shape_id, uri)
    fitter = BatchedFitter(field, cfg.fit, cfg.fit.device)
    return next(iter(fitter.fit([ShapeData(row, shape_id, points, sdf, start)])))


def probe_fit(field: Field, cfg: Config, samples_path: str, row: int, shape_id: str, uri: str,
              start: torch.Tensor) -> str:
    """`fit_one`, returning only its verdict ("" or why it failed), never the weights."""
    return fit_one(field, cfg, samples_path, row, shape_id, uri, start).reason


# ------------------------------------------------------------------------------------ the job

def check_inputs(cfg: Config, plan: C.Plan) -> Any:
    """The fit's input, refused (StoreError) if the samples this run needs are not there."""
    return INPUTS[cfg.fit.samples](cfg, plan)


def fit(cfg: Config, plan: C.Plan) -> dict[str, Any]:
    """Fit (or resume fitting) the training shapes of this run; returns the counts over them and
    `computed`, the number of shards fitted now."""
    inp = check_inputs(cfg, plan)
    field = plan_field(cfg, plan)
    store = _create_store(cfg, plan, inp, field)
    if store.attrs[C.Attr.FROZEN_FINGERPRINT] != field.frozen_fingerprint():
        raise StoreError(f"{store.path} was fitted with other frozen parts (a changed trained base or masks) "
                         f"than {cfg.field.type} has now: rerun with --restart to fit it again")
    rows = training_range(store, cfg.data.shapes)
    shards = shards_of(store, rows)
    pending = store.pending_shards(shards)
    anchor_id = store.attrs[C.Attr.WARM_SHAPE]
    log.info("fit: %d training shapes from %s (%s), %s/%s field (%d parameters), init %s%s, %d shards "
             "(%d done) -> %s", len(rows), inp.where, cfg.fit.samples, cfg.field.type, cfg.field.preset,
             field.layout.size, cfg.fit.init, f" from {anchor_id}" if anchor_id else "", len(shards),
             len(shards) - len(pending), store.path)
    errors: dict[int, str] = {}
    if pending:
        with ray_session(cfg.ray.address, cfg.ray.num_cpus or None):
            _shared_start(store, field, cfg, inp, anchor_id)
            errors = _run_shards(store, inp, pending, cfg, plan)
    summary = store.rows_summary(rows)
    for f in summary["failures"][:20]:
        log.warning("failed: %s: %s", f["shape_id"], f["reason"])
    if errors:
        raise ShardsUnfinished(unfinished_message("fit", store, errors))
    return {**summary, "computed": len(pending)}


def _create_store(cfg: Config, plan: C.Plan, inp: Any, field: Field) -> RowStore:
    art = plan["fit"]
    if store := RowStore.open_published(plan.weights, "weights", art.path):
        return store
    anchor_id = _anchor_id(cfg, inp) if cfg.fit.init == "warm" else ""
    base_fp = plan["train-base"].fingerprint if "train-base" in plan else ""
    with cache.publishing(art, {"rows": len(inp.ids)}) as folder:
        store = RowStore.create(
            C.join(folder, C.WEIGHTS), kind="weights", fingerprint=art.fingerprint,
            ids=inp.ids, sources=inp.sources, categories=inp.categories,
            shard_size=cfg.fit.shard_size, arrays=weight_arrays(field),
            attrs={C.Attr.FIELD_TYPE: cfg.field.type, C.Attr.FIELD_PRESET: cfg.field.preset,
                   C.Attr.FIELD_CONFIG: field.config, C.Attr.LAYOUT: field.layout.to_json(),
                   C.Attr.PARAMS: field.layout.size, C.Attr.INIT: cfg.fit.init, C.Attr.WARM_SHAPE: anchor_id,
                   C.Attr.SEED: cfg.seed, C.Attr.FIT: to_dict(cfg.fit), C.Attr.HELD_OUT: inp.held_out,
                   C.Attr.SAMPLES_FINGERPRINT: plan["ingest"].fingerprint, C.Attr.BASE_FINGERPRINT: base_fp,
                   C.Attr.FROZEN_FINGERPRINT: field.frozen_fingerprint(),
                   C.Attr.VERSIONS: {"raywsl": __version__, "torch": torch.__version__}})
        _save_frozen(store, field)
    return RowStore.open(plan.weights, mode="r+", kind="weights")


def _save_frozen(store: RowStore, field: Field) -> None:
    """The field's frozen shared parts (asymmetric masks), as arrays `frozen/<name>` of the store."""
    frozen = field.frozen()
    if not frozen:
        return
    group = store.group.require_group(C.FROZEN)
    for name, tensor in frozen.items():
        values = tensor.numpy()
        group.create_array(name, shape=values.shape, dtype=values.dtype, compressors=None,
                           overwrite=True)[...] = values


def _anchor_id(cfg: Config, inp: Any) -> str:
    """The warm-start anchor: fit.warm_shape, or the first training shape with samples (the same for
    every data.shapes, so one weight store serves them all)."""
    usable = inp.usable()
    if cfg.fit.warm_shape:
        if cfg.fit.warm_shape not in inp.ids:
            raise StoreError(f"fit.warm_shape {cfg.fit.warm_shape!r} is not a shape of {inp.where}")
        if not usable[inp.ids.index(cfg.fit.warm_shape)]:
            raise StoreError(f"fit.warm_shape {cfg.fit.warm_shape!r} has no samples (ingest failed or pending)")
        return cfg.fit.warm_shape
    done = np.flatnonzero(usable[inp.held_out:])
    if not len(done):
        raise StoreError(f"{inp.where}: no training shape was ingested successfully; nothing to fit")
    return inp.ids[inp.held_out + int(done[0])]


def _shared_start(store: RowStore, field: Field, cfg: Config, inp: Any, anchor_id: str) -> None:
    """The start row every shape shares (not for random init), made once and kept in the store (the
    actors read it there), so a resumed or extended run never refits the anchor."""
    if cfg.fit.init == "random" or shared_row(store) is not None:
        return
    row = field.init_rows(1, init_generator(cfg.seed))[0]
    if cfg.fit.init == "warm":
        import ray

        k = inp.ids.index(anchor_id)
        t0 = time.perf_counter()
        task = remote(fit_one, num_cpus=1, num_gpus=_gpus_per_actor(cfg))
        try:
            result = ray.get(task.remote(field, cfg, inp.samples_path, k, anchor_id, inp.sources[k], row))
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, StoreError):
                raise StoreError(f"fit.init=warm: {e.cause}; pick another anchor with fit.warm_shape") from None
            raise
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError) as e:
            raise StoreError(f"fit.init=warm: the anchor shape {anchor_id}: {crash_verdict(e)}, every try; every "
                             f"shape starts from it, so nothing was fitted: pick another with fit.warm_shape") from None
        if not result.ok:
            raise StoreError(f"fit.init=warm: the anchor shape {anchor_id} failed to fit ({result.reason}); "
                             f"pick another with fit.warm_shape")
        log.info("fit: warm-start anchor %s fitted in %.1fs (loss %.4g)", anchor_id,
                 time.perf_counter() - t0, result.loss)
        row = torch.from_numpy(np.array(result.row))  # ray.get gives a read-only array
    arr = store.group.create_array(C.INIT_ROW, shape=(field.layout.size,), dtype="float32", compressors=None,
                                    overwrite=True)
    arr[:] = row.numpy()


def shared_row(store: RowStore) -> torch.Tensor | None:
    """The stored shared start row, or None (random init; or killed between creating and writing it)."""
    if C.INIT_ROW not in store.group:
        return None
    stored = store.group[C.INIT_ROW]
    if stored.nchunks_initialized != stored.nchunks:
        return None
    return torch.from_numpy(stored[:])


def _gpus_per_actor(cfg: Config) -> float:
    """GPUs a fitting actor (or task) asks for: from the config (scaling.use_gpu, fit.gpus_per_actor),
    never from the cluster at launch, whose GPU nodes may autoscale from 0. Without a GPU to be had
    the work waits (stages.py says why), it never falls back to the CPU."""
    return cfg.fit_gpus


def _run_shards(store: RowStore, inp: Any, pending: list[int], cfg: Config, plan: C.Plan) -> dict[int, str]:
    """Fit the pending shards under the fault policy of `runtime.finish_shards`; returns {shard: error}
    for those still pending at the end. Plots the mean loss curve of the shapes fitted."""
    base = plan["train-base"].path if "train-base" in plan else ""
    curve = np.zeros((2, curve_length(cfg)))  # summed loss curves, counts
    errors = finish_shards(
        pending, lambda shards, skip: _shard_pass(store, inp, shards, cfg, base, skip, curve), store.pending_shards,
        lambda shards: _find_crashing_rows(store, inp, shards, cfg, plan_field(cfg, plan)),
        worker="fitting actor", shape=("shape", "shapes"))
    _plot_loss_curve(cfg, plan, *curve)
    return errors


def _shard_pass(store: RowStore, inp: Any, shards: list[int], cfg: Config, base: str, skip: dict[int, str],
                curve: np.ndarray) -> dict[int, str]:
    """One Ray Data pass of the actor pool over `shards` (adds the fitted shapes' loss curves to
    `curve`); returns {shard: error} of the shards whose actor raised."""
    import ray

    ranges = [(store.shard_rows(k).start, store.shard_rows(k).stop) for k in shards]
    ds = inp.dataset(ranges)
    gpus = _gpus_per_actor(cfg)
    # One block is one shard (batch_size=None), and Ray refuses num_gpus with whole-block batches: the
    # GPUs go through ray_remote_args_fn (an integer batch size could merge a short last shard with
    # another block, which FitActor refuses).
    with ray_remote_args():
        ds = ds.map_batches(
            FitActor, batch_size=None, num_cpus=cfg.fit.cpus_per_actor,
            ray_remote_args_fn=(lambda: {"num_gpus": gpus}) if gpus else None,
            compute=ray.data.ActorPoolStrategy(size=cfg.fit.actors),
            max_restarts=ACTOR_RESTARTS, max_task_retries=TASK_RETRIES,  # no named parameters in Ray
            fn_constructor_kwargs={"path": store.path, "cfg": cfg, "base": base, "skip": skip})
    ds.context.max_errored_blocks = len(ranges)  # dead actors' blocks: probed by the caller (see ingest)
    errors = {}
    with Progress("fit", total=sum(b - a for a, b in ranges), unit="shapes") as progress:
        for row in ds.iter_rows():
            if row["error"]:
                errors[int(row["shard"])] = str(row["error"])
                log.warning("shard %d failed: %s", row["shard"], row["error"])
                continue
            progress.update(int(row["done"]) + int(row["failed"]), failed=int(row["failed"]))
            log.debug("shard %d: %d done, %d failed in %.1fs (%.0f shape-steps/s)", row["shard"], row["done"],
                      row["failed"], row["seconds"], row["shape_steps"] / max(row["seconds"], 1e-9))
            if len(row["curve_sum"]) == curve.shape[1]:  # a shard committed earlier reports no curve
                curve += np.stack([row["curve_sum"], row["curve_count"]])
    return errors


def _find_crashing_rows(store: RowStore, inp: Any, shards: list[int], cfg: Config, field: Field) -> dict[int, str]:
    """The rows of `shards` whose shape kills the process fitting it, alone, every time: {row: reason}.
    (A row without samples raises StoreError in its probe: a Python error, so it is not blamed; fit_block
    then fails it with ingest's reason.)"""
    shared = shared_row(store)
    calls = {}
    for k in shards:
        rows = store.shard_rows(k)
        meta = store.row_meta(rows)
        for row, shape_id, uri in zip(range(rows.start, rows.stop), meta[C.SHAPE_ID], meta[C.SOURCE]):
            shape_id = str(shape_id)
            start = init_row(field, cfg.fit.init, cfg.seed, shape_id, shared)
            calls[row] = (field, cfg, inp.samples_path, row, shape_id, str(uri), start)
    verdicts = isolate_crashes(probe_fit, calls, attempts=PROBE_ATTEMPTS, num_cpus=cfg.fit.cpus_per_actor,
                               num_gpus=_gpus_per_actor(cfg) or None)
    for row, why in verdicts.items():
        log.warning("row %d (%s): %s while fitting it", row, calls[row][4], why)
    return {row: f"{why} while fitting this shape, alone, {PROBE_ATTEMPTS} times" for row, why in verdicts.items()}


def _plot_loss_curve(cfg: Config, plan: C.Plan, curve_sum: np.ndarray, curve_count: np.ndarray) -> None:
    """fit_loss_curve.png beside the weight store: the mean training loss over the shapes still
    fitting at each check, of the shapes fitted this time."""
    if not curve_count.any():
        return
    steps = (np.arange(len(curve_sum)) + 1) * cfg.fit.check_every
    mean = np.where(curve_count > 0, curve_sum / np.maximum(curve_count, 1), np.nan)
    path = plan["fit"].join(C.FIT_CURVE)
    figures.plot_curves({f"mean {cfg.fit.loss} loss (shapes fitted this time)": (steps.tolist(), mean.tolist())},
                        path, xlabel="step", ylabel=f"{cfg.fit.loss} loss", title="fitting")
    tracking.log_figure(path)
    for step, value in zip(steps, mean):
        if np.isfinite(value):
            tracking.log_metrics({"fit_loss_mean": float(value)}, step=int(step))


class FitActor:
    """A fitting actor: holds the field and a BatchedFitter (its buffers and compiled step) for its
    whole life, and fits one weight shard per call."""

    def __init__(self, path: str, cfg: Config, base: str, skip: dict[int, str] | None = None):
        torch.set_num_threads(cfg.fit.cpus_per_actor)  # Ray sets OMP_NUM_THREADS; say it explicitly
        self.store = RowStore.open(path, mode="r+", kind="weights")
        self.cfg = cfg
        self.field = field_from_config(cfg, base=base)
        self.fitter = BatchedFitter(self.field, cfg.fit, cfg.fit.device)
        self.shared = shared_row(self.store)  # written by the driver before the actors start
        self.skip = skip or {}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        rows = batch["row"]
        k = int(rows[0]) // self.store.shard_size
        try:
            expected = self.store.shard_rows(k)
            if list(rows) != list(range(expected.start, expected.stop)):  # the datasource's contract
                raise RuntimeError(f"fit: a block of rows {rows[0]}..{rows[-1]} is not exactly shard {k}")
            if self.store.shard_done(k):  # a retried block may find its shard already committed
                return _shard_summary(k, self.store.shard_status(k), t0)
            _maybe_crash(k)
            arrays, status, reason, stats = fit_block(self.fitter, self.field, self.cfg, batch, self.shared, self.skip)
            self.store.write_shard(k, arrays, status, reason)
        except Exception as e:  # noqa: BLE001 - not a shape's fault (fit_block records those): the driver stops the job
            return _shard_summary(k, np.zeros(0, "int8"), t0, error=f"{type(e).__name__}: {e}")
        return _shard_summary(k, status, t0, **stats)


def _maybe_crash(k: int) -> None:
    """Fault injection for the actor-crash test: kill this actor's process the first time it fits
    shard $RAYWSL_CRASH_FIT_SHARD (the marker file $RAYWSL_CRASH_MARKER records that it did)."""
    marker = os.environ.get("RAYWSL_CRASH_MARKER", "")
    if os.environ.get("RAYWSL_CRASH_FIT_SHARD") == str(k) and marker and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(139)


def _maybe_crash_on(shape_ids: list[str]) -> None:
    """Fault injection for the crash-isolation test: shape $RAYWSL_CRASH_FIT_SHAPE kills the process
    fitting it, every time (as a segfault in a native kernel would)."""
    if os.environ.get("RAYWSL_CRASH_FIT_SHAPE", "\0") in shape_ids:
        os._exit(139)


def fit_block(fitter: BatchedFitter, field: Field, cfg: Config, batch: dict[str, np.ndarray],
              shared: torch.Tensor | None, skip: dict[int, str] | None = None
              ) -> tuple[dict[str, np.ndarray], np.ndarray, list[str], dict[str, Any]]:
    """Fit the rows of one block of samples: (arrays, status, reason) ready for `write_shard`, and
    stats (shape-steps taken; the loss curves summed over the shapes, per check, with their counts).
    Rows without samples (ingest failed) fail with ingest's reason; rows in `skip` with theirs."""
    n, first = len(batch["row"]), int(batch["row"][0])
    status = np.full(n, FAILED, dtype="int8")
    reason = [""] * n
    shapes = []
    skip = skip or {}
    for i in range(n):
        shape_id = str(batch[C.SHAPE_ID][i])
        if first + i in skip:
            reason[i] = skip[first + i]
            continue
        if batch[C.STATUS][i] != DONE:
            why = str(batch[C.REASON][i]) or "ingest did not finish it"
            reason[i] = f"no samples to fit: {why}"
            continue
        shapes.append(ShapeData(first + i, shape_id, batch[C.POINTS][i], batch[C.SDF][i],
                                init_row(field, cfg.fit.init, cfg.seed, shape_id, shared)))
    arrays = {C.ROW_WEIGHTS: np.zeros((n, field.layout.size), np.float32),
              C.FIT_LOSS: np.full(n, np.nan, np.float32),
              C.FIT_STEPS: np.zeros(n, np.int32), C.FIT_RESTARTS: np.zeros(n, np.int32)}
    checks = curve_length(cfg)
    stats = {"shape_steps": 0, "curve_sum": np.zeros(checks), "curve_count": np.zeros(checks)}
    _maybe_crash_on([s.shape_id for s in shapes])
    for r in fitter.fit(shapes):
        i = r.key - first
        arrays[C.FIT_LOSS][i], arrays[C.FIT_STEPS][i], arrays[C.FIT_RESTARTS][i] = r.loss, r.steps, r.restarts
        stats["shape_steps"] += r.steps
        if r.ok:
            arrays[C.ROW_WEIGHTS][i], status[i] = r.row, DONE
            curve = np.asarray(r.curve[:checks])
            stats["curve_sum"][: len(curve)] += curve
            stats["curve_count"][: len(curve)] += 1
        else:
            reason[i] = r.reason
    return arrays, status, reason, stats


def curve_length(cfg: Config) -> int:
    """Checks in a full fit: the length of a loss curve."""
    return -(-cfg.fit.steps // cfg.fit.check_every)


def _shard_summary(k: int, status: np.ndarray, t0: float, shape_steps: int = 0,
                   curve_sum: np.ndarray | None = None, curve_count: np.ndarray | None = None,
                   error: str = "") -> dict[str, np.ndarray]:
    """One output row per shard: counts, timing, the shard's summed loss curves, and the error that
    stopped it ("" when it was written)."""
    empty = np.zeros(1)
    return {"shard": np.array([k]), "done": np.array([int((status == DONE).sum())]),
            "failed": np.array([int((status == FAILED).sum())]), "shape_steps": np.array([shape_steps]),
            "seconds": np.array([time.perf_counter() - t0]),
            "curve_sum": (curve_sum if curve_sum is not None else empty)[None],
            "curve_count": (curve_count if curve_count is not None else empty)[None],
            "error": np.array([error])}
