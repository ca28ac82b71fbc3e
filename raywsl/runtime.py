"""Starting and stopping Ray: the embedded local default, or a cluster.

One place decides how raywsl talks to Ray, so the CLI, the jobs and the tests start it the same way.
Ray's own output (its workers' stdout / stderr, Ray Data's progress dumps, Ray Train's controller)
goes to the run's log file, not the terminal, unless raywsl runs with -v (progress.py). The local Ray
starts its dashboard: Ray Train's placement-group cleaner polls actor states through the State API,
which the dashboard serves (without it every poll logs "Failed to query Ray Train Controller actor
state").
"""

from __future__ import annotations

import io
import logging
import os
from contextlib import contextmanager
from typing import Iterator

from raywsl import cache
from raywsl import contract as C
from raywsl.progress import is_verbose, route_library_logs

log = logging.getLogger(__name__)

# On a 2-core laptop an actor pool or a Train worker can take every CPU and starve Ray Data's read
# tasks: a silent hang. Declaring more logical CPUs than cores (oversubscription) keeps a free slot.
LOCAL_CPU_OVERSUBSCRIPTION = 2
LOCAL_OBJECT_STORE_BYTES = 512 * 1024**2
OOM_RETRIES = 2  # retries of a task killed for memory (each bounded by its `memory` reservation)
PROBE_ATTEMPTS = 2  # a shape is blamed for a crash only if it kills its own process this many times in a row

_started_local = False


def local_num_cpus() -> int:
    return max(4, LOCAL_CPU_OVERSUBSCRIPTION * (os.cpu_count() or 1))


@contextmanager
def ray_session(address: str = "", num_cpus: int | None = None) -> Iterator[None]:
    """Use the running Ray if there is one; else connect to `address` / $RAY_ADDRESS; else start a
    local Ray sized for this machine. Shuts down only what it started."""
    import ray

    route_library_logs()  # Ray's loggers print to the terminal by their own handlers
    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    verbose = is_verbose()
    global _started_local
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        # Token authentication stays as Ray sets it: on by default for a local cluster (Ray creates
        # ~/.ray/auth_token if missing; a command joining this cluster, a subprocess or `ray job
        # submit`, reads the same token), or what RAY_AUTH_MODE says.
        ray.init(
            address="local",
            _node_ip_address="127.0.0.1",  # the embedded cluster listens on loopback only
            num_cpus=num_cpus or local_num_cpus(),
            include_dashboard=True,
            dashboard_port=_free_port(),  # two local runs at once must not fight over 8265
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            log_to_driver=True,
            # A task killed by Ray's memory monitor is retried without limit by default: one mesh too
            # big for memory would never let the job end. (On a cluster: RAY_task_oom_retries.)
            _system_config={"task_oom_retries": OOM_RETRIES},
        )
        _started_local = True
    import ray.data

    route_library_logs()  # ray.data and ray.train configure theirs on import
    if not verbose:
        _workers_output_to_log()

    ray.data.DataContext.get_current().enable_progress_bars = verbose
    if _held:  # started inside held_session: it stays up until the held session ends
        _held[-1] = True
        yield
        return
    try:
        yield
    finally:
        _started_local = False
        ray.shutdown()


_held: list[bool] = []  # open held_session blocks: whether Ray was started inside the innermost


@contextmanager
def held_session() -> Iterator[None]:
    """Ray starts only when something inside first needs it (a stage that computes, not one that is
    reused), and then stays up until the block ends: a chain of stages pays one start, a rerun that
    reuses everything none."""
    import ray

    global _started_local
    _held.append(False)
    try:
        yield
    finally:
        if _held.pop() and ray.is_initialized():
            _started_local = False
            ray.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workers_output_to_log() -> None:
    """Send the lines Ray relays from its workers (and its controller actors) to raywsl's log file
    instead of the terminal. Uses Ray's internal stream dispatcher; if that moved, Ray prints them."""
    try:
        from ray._private import worker as ray_worker

        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        dispatcher.remove_handler("ray_print_logs")
        relay = logging.getLogger("ray.workers")

        def to_log(data: dict) -> None:
            if data.get("pid") == "autoscaler":  # its status table every 5 s: in Ray's own session logs
                return
            who = data.get("actor_name") or data.get("task_name") or "worker"
            for line in data.get("lines", []):
                relay.info("(%s pid=%s) %s", who, data.get("pid"), line)

        dispatcher.add_handler("ray_print_logs", to_log)
    except (ImportError, AttributeError, KeyError, ValueError) as e:
        log.debug("Ray workers' output stays on the terminal: %s", e)


@contextmanager
def ray_remote_args() -> Iterator[None]:
    """Around a `map_batches` call that passes retry / restart limits (max_retries, max_restarts,
    max_task_retries) or per-worker GPUs with whole-block batches (`ray_remote_args_fn`): Ray (up to
    2.63, pyproject's ceiling) has no named parameters for them and deprecates the only way to pass
    them. Exactly those two warnings are silenced; every other deprecation stays visible."""
    import warnings

    with warnings.catch_warnings():
        for name in ("ray_remote_args", "ray_remote_args_fn"):
            warnings.filterwarnings("ignore", message=f"`{name}` is deprecated", category=DeprecationWarning)
        yield


def remote(fn, **options):
    """`ray.remote(**options)(fn)` scheduled outside any placement group: inside a Ray Tune trial (a
    sweep) a task would otherwise be captured by the trial's placement group, whose one bundle is the
    trial's own fraction of a CPU, and be refused. (Ray Data and Ray Train place their own work.)"""
    import ray

    return ray.remote(scheduling_strategy="DEFAULT", **options)(fn)


class ShardsUnfinished(RuntimeError):
    """Shards of a Ray Data job that did not finish for a reason no single shape explains (an error
    of the job itself, a full disk, a lost node): their rows stay pending, and a rerun retries them."""


def unfinished_message(stage: str, store, errors: dict[int, str]) -> str:
    """What a stage says when shards of `store` (a RowStore) stay pending ({shard: error}): how many,
    with how many rows, the distinct errors with a shard of each, and how to resume."""
    rows = sum(store.shard_rows(k).stop - store.shard_rows(k).start for k in errors)
    first: dict[str, int] = {}
    for k, e in errors.items():
        first.setdefault(e, k)
    shown = "; ".join(f"{e} (shard {k})" for e, k in list(first.items())[:3])
    more = f"; and {len(first) - 3} other errors" if len(first) > 3 else ""
    return (f"{stage}: {len(errors)} shard(s) ({rows} rows) of {store.path} did not finish, for reasons no "
            f"single shape explains: {shown}{more}. Finished shards are kept: fix the cause and rerun the same "
            f"command to do the rest")


def finish_shards(pending: list[int], run_pass, still_pending, find_culprits, worker: str,
                  shape: tuple[str, str]) -> dict[int, str]:
    """The fault policy of a sharded stage (ingest, fit); returns {shard: error} for the shards still
    pending at the end. `run_pass(shards, skip)` runs the shards once, skipping the rows of `skip`
    ({row: reason}, failed with it), and returns {shard: error} of those whose task raised;
    `still_pending(shards)` lists the shards not committed; `find_culprits(shards)` is
    `isolate_crashes` over the shards' rows ({row: reason}). `worker` names what runs a shard
    ("worker process", "fitting actor"), `shape` the singular and plural of what a row is.

    A shard can fail in two ways. Its task raises (an error of the job or its environment: a full
    disk, a permission error, a bug): it is retried once, and if it fails again it stays pending.
    Or its worker dies (after Ray's retries): then each of its rows runs alone, the rows that kill
    their own process every time are failed with that reason, and the shard runs again without
    them. A lost node or any other fault never blames a shape: the shard stays pending."""
    errors = run_pass(pending, {})
    lost = [k for k in still_pending(pending) if k not in errors]
    if not errors and not lost:
        return {}
    skip = {}
    if lost:
        log.warning("%d shard(s) lost their %s; running their %s one by one", len(lost), worker, shape[1])
        skip = find_culprits(lost)
    retry = sorted({*errors, *lost})
    errors = run_pass(retry, skip)
    lost = [k for k in still_pending(retry) if k not in errors]
    errors.update({k: f"its {worker} died again, and no single {shape[0]} kills it alone" for k in lost})
    return errors


def crash_verdict(error: BaseException) -> str:
    """What a failed task that handled ONE shape says about that shape: why its own process died
    (a native crash, a kill for memory), or "" when the failure says nothing about the shape (a
    Python exception is a bug or an environment error; a lost node or object is the cluster's)."""
    import ray.exceptions as rx

    if isinstance(error, rx.OutOfMemoryError):
        return "its worker process was killed for using too much memory"
    if isinstance(error, rx.WorkerCrashedError):
        return "its worker process died (a crash in native code, or killed)"
    return ""


def isolate_crashes(fn, calls: dict, attempts: int = PROBE_ATTEMPTS, **options) -> dict:
    """Run `fn(*args)` for each {key: args} of `calls`, each in a task of its own without retries,
    `attempts` rounds: a call whose own process dies every time (`crash_verdict`) is a culprit.
    Returns {key: why} for the culprits only; what fn returns is dropped (keep it small: a verdict,
    not the data). Everything else, a clean return, a Python error, a lost node, clears the call:
    a probe never blames a shape for the cluster's faults."""
    import ray

    task = remote(fn, max_retries=0, **options)
    suspects = dict(calls)
    verdicts: dict = {}
    for _ in range(attempts):
        refs = {key: task.remote(*args) for key, args in suspects.items()}
        verdicts = {}
        for key, ref in refs.items():
            try:
                ray.get(ref)
            except ray.exceptions.RayError as e:
                if why := crash_verdict(e):
                    verdicts[key] = why
        suspects = {key: calls[key] for key in verdicts}
        if not suspects:
            break
    return verdicts


def task_concurrency() -> int | None:
    """How many CPU tasks a Ray Data stage may run at once: the real core count on the embedded
    local Ray (its logical CPUs are oversubscribed on purpose), unbounded on a cluster."""
    return (os.cpu_count() or 1) if _started_local else None


def fit_torch_trainer(loop, config: dict, *, dataset, storage: str, workers: int, use_gpu: bool,
                      cpus_per_worker: int = 1, progress: tuple[str, int] | None = None):
    """Run `loop` under Ray Train (DDP; gloo on CPU, nccl on GPU) with `dataset` as its "train" shard
    source. The run lives in storage/run: calling again with the same storage resumes from its latest
    checkpoint (the last two are kept; a crashed worker group is restarted twice). Each worker holds
    `cpus_per_worker` CPUs (the loop sets its torch threads to match). `progress` (name,
    total steps): show the steps rank 0 reports with `report_progress` to config["progress"]. Raises
    the training error, else returns Ray Train's Result."""
    import threading

    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        loop, train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cpus_per_worker}),
        run_config=ray.train.RunConfig(name=C.TRAIN_RUN, **train_storage(storage),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                                       failure_config=ray.train.FailureConfig(max_failures=2),
                                       callbacks=_tune_callbacks()),
        datasets={"train": dataset})
    stop = threading.Event()
    watcher = None
    if progress:
        watcher = threading.Thread(target=_watch_progress, args=(config["progress"], *progress, stop), daemon=True)
        watcher.start()
    try:
        result = trainer.fit()
    finally:
        stop.set()
        if watcher:
            watcher.join()
    if result.error:
        raise result.error
    return result


def train_storage(storage: str) -> dict:
    """Ray Train's storage arguments for a local folder or an fsspec URL. A URL goes through the same
    fsspec file system raywsl's stores use (its credentials, its endpoint), wrapped for pyarrow, so
    Ray Train and the stores can never disagree about where s3://... is."""
    if cache.is_local(storage):
        return {"storage_path": os.path.abspath(cache.local_path(storage))}
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = fsspec.core.url_to_fs(storage)
    return {"storage_path": path, "storage_filesystem": PyFileSystem(FSSpecHandler(fs))}


def _tune_callbacks() -> list:
    """Inside a Ray Tune trial (a sweep), what the training loop reports also reaches Tune, whose
    scheduler (ASHA) may stop the trial early: the pattern Ray 2.60 documents for Train inside Tune."""
    try:
        from ray.tune.integration.ray_train import TuneReportCallback
        from ray.tune.trainable.trainable_fn_utils import _in_tune_session  # what the callback itself checks
    except ImportError:
        return []
    return [TuneReportCallback()] if _in_tune_session() else []


def report_progress(path: str, step: int, total: int, loss: float) -> None:
    """From a training loop (rank 0, on any node): the step it reached, for the driver's progress bar.
    `path` is in the stage's work folder, a local path or a URL both reach."""
    cache.write_json(path, {"step": step, "total": total, "loss": loss})


def _watch_progress(path: str, name: str, total: int, stop) -> None:
    from raywsl.progress import Progress

    def step() -> int | None:
        try:
            return int(cache.read_json(path, {})["step"])
        except (OSError, ValueError, KeyError):
            return None

    progress = None
    while not stop.wait(1.0):
        now = step()
        if now is None:
            continue
        if progress is None:  # the first report: where a resumed run starts from
            progress = Progress(name, total=total, unit="steps", start=now)
        progress.set(now)
    if progress is not None:
        progress.set(step() or progress.count)
        progress.close()


def save_checkpoint(folder: str, state: dict, info: dict) -> None:
    """A checkpoint folder (local): state.pt (tensors and numbers, torch.save; written to a temporary name
    first, so a kill mid-write keeps the old one) and info.json. What Ray Train's workers report."""
    import torch

    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, C.CHECKPOINT_STATE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, os.path.join(folder, C.CHECKPOINT_STATE))
    cache.write_json(os.path.join(folder, C.CHECKPOINT_INFO),
                     {**info, "format": "torch.save of tensors and numbers; load with weights_only=True"})


def load_checkpoint(folder: str, missing: str = "") -> tuple[dict, dict]:
    """(state, info) of a checkpoint or artifact folder (local or a URL); no pickled code is ever loaded.
    FileNotFoundError, followed by `missing` (what to run), when it has no state."""
    import torch

    path = C.join(folder, C.CHECKPOINT_STATE)
    if not cache.exists(path):
        raise FileNotFoundError(f"no {C.CHECKPOINT_STATE} at {folder}" + (f": {missing}" if missing else ""))
    info = cache.read_json(C.join(folder, C.CHECKPOINT_INFO))
    return torch.load(io.BytesIO(cache.read_bytes(path)), weights_only=True), info


def copy_checkpoint(result, folder: str) -> None:
    """Copy the last checkpoint of a Ray Train result into `folder` (a stage's artifact being
    written, local or at a URL: cache.publishing moves it into place once complete)."""
    with result.checkpoint.as_directory() as src:
        cache.put_folder(src, folder)



# ------------------------------------------------------------------------------------ GPUs from the config

GPU_NOTICE_GRACE_S = 5.0  # work that starts within this long never hears of the notice
GPU_NOTICE_EVERY_S = 60.0  # the notice again this often while the cluster still lacks the GPUs
GPU_POLL_S = 5.0  # how often the cluster's GPUs are looked up


@contextmanager
def gpu_wait_notice(stage: str, gpus_needed: float, what: str, *, grace_s: float = GPU_NOTICE_GRACE_S,
                    every_s: float = GPU_NOTICE_EVERY_S) -> Iterator[None]:
    """While the block runs, say why `stage` waits when the cluster has fewer GPUs than
    `gpus_needed` (the GPUs it must have before any of the work can start): once after `grace_s`,
    then every `every_s`, e.g. "fit: waiting for 4 fitting actors x 1 GPU; the cluster has 0 GPUs
    now (...)"; `what` names the request. Ray keeps work that asks for GPUs the cluster lacks pending
    (its autoscaler may add GPU nodes); raywsl never falls back to the CPU, it says why it waits.
    Nothing happens when `gpus_needed` is 0; before Ray is up nothing is looked up."""
    if gpus_needed <= 0:
        yield
        return
    import threading

    stop = threading.Event()
    watcher = threading.Thread(target=_gpu_notices, args=(stage, gpus_needed, what, grace_s, every_s, stop),
                               name=f"raywsl-gpu-notice-{stage}", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join(timeout=2 * GPU_POLL_S)


def cluster_gpus() -> float | None:
    """The GPUs the connected Ray cluster has now (None when Ray is not up or does not answer)."""
    import ray

    if not ray.is_initialized():
        return None
    try:
        return float(ray.cluster_resources().get("GPU", 0))
    except Exception:  # noqa: BLE001 - Ray shutting down under us: nothing to say
        return None


def _gpu_notices(stage: str, needed: float, what: str, grace_s: float, every_s: float, stop) -> None:
    import time

    from raywsl.progress import console

    if stop.wait(grace_s):
        return
    last = None  # when the notice was last given
    while True:
        have = cluster_gpus()
        now = time.monotonic()
        if have is not None and have < needed and (last is None or now - last >= every_s):
            log.warning("%s: waiting for %s; the cluster has %g GPUs now (its autoscaler may add GPU nodes; with "
                        "none to add this waits forever: set scaling.use_gpu=false to run on CPUs)", stage, what, have)
            last = now
        elif have is not None and have >= needed and last is not None:
            console.info("%s: the cluster has %g GPUs now, the work goes on", stage, have)
            last = None
        if stop.wait(min(GPU_POLL_S, every_s)):
            return


def run_task(fn, *args, **options):
    """`fn(*args)` as one Ray task with `options` (num_gpus, num_cpus, ...), outside any placement
    group (`remote`); returns what it returns. Its log lines reach this process through Ray's log
    relay (the log file; the terminal with -v). A raywsl error it raises (StoreError, EvalError, ...)
    is raised here as itself, so the CLI reports it as it would from this process."""
    import ray

    task = remote(_logged_call, **options)
    try:
        return ray.get(task.remote(fn, *args))
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, Exception) and type(e.cause).__module__.startswith("raywsl"):
            log.debug("%s", e)  # the task's traceback, for the log file
            raise e.cause from None
        raise


def _logged_call(fn, *args):
    """In a task: raywsl's INFO lines (progress, results) to stderr, which Ray relays to the driver."""
    import sys

    logger = logging.getLogger("raywsl")
    if not any(getattr(h, "raywsl_task", False) for h in logger.handlers):  # a reused worker has it already
        handler = logging.StreamHandler(sys.stderr)
        handler.raywsl_task = True
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    return fn(*args)
