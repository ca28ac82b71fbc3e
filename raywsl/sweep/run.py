"""`raywsl sweep -c configs/sweeps/NAME.yaml`: every trial of a sweep as a run, on Ray Tune, then the
phase diagram.

    sweep = load_sweep(path)                      # the trials, each config validated (space.py)
    run_sweep(sweep)                              # Tune runs them; report/report.html at the end

Each trial is a whole `raywsl run` (corpus .. report) in its own run folder, runs/sweeps/<name>/trials/
<trial>, sharing one artifact cache with every other trial and run: trials that differ only in
diffusion settings share one weight store, a larger N fits only the shapes a smaller one lacked, and
two trials asking for the same fit at once wait on one lock (cache.py) instead of fitting twice.

Ray Tune runs one function per trial (`_trial`, the pattern Ray 2.60 documents for Ray Train inside
Tune: the function's stages start their own Ray Data and `TorchTrainer` work, whose reports reach Tune
through `TuneReportCallback`, runtime.py). A trial's own process asks for a fraction of a CPU
(`trial_resources`) so the workers its stages start find free CPUs; `max_concurrent_trials` bounds the
rest. `asha` stops trials early on the denoiser's training loss.

MLflow: a tracking server (tracking.tracking_server, 127.0.0.1) serves the sweep's store in
runs/sweeps/<name>/mlflow while it runs, so concurrent trials write through one process instead of
locking one sqlite file; a base config whose mlflow.tracking_uri is an http(s) server (a cluster's)
uses that instead. One parent run per sweep (its params, the phase-diagram figures and onsets), one
child run per trial (its config, metrics, figures and stage fingerprints).

Resuming: an interrupted sweep run again restores Tune's experiment (`Tuner.restore`), which does not
start finished trials again; a trial whose trial.json says finished with the same stage fingerprints
returns its recorded metrics at once, so even a changed sweep (a new Tune experiment) reruns nothing
that is done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from contextlib import ExitStack, contextmanager, redirect_stdout
from dataclasses import dataclass
from typing import Any, Iterator

from ray import tune

from raywsl import cache
from raywsl import contract as C
from raywsl import tracking
from raywsl.config import Config, ConfigError, load_config
from raywsl.progress import console, native_output_to, open_log_file, setup_logging
from raywsl.sweep.report import write_sweep_report
from raywsl.sweep.space import Sweep, Trial

log = logging.getLogger(__name__)

FINISHED, RUNNING, FAILED, STOPPED = C.TRIAL_FINISHED, C.TRIAL_RUNNING, C.TRIAL_FAILED, C.TRIAL_STOPPED
# What a trial reports to Tune and prints when it ends (the metrics the phase diagram reads).
SHOWN = ("train_loss", "1nna_cd", "cov_cd", "memorisation_rate", "weights_attractor_share", "valid_share")


@dataclass(frozen=True)
class SweepOutcome:
    folder: str
    counts: dict[str, int]  # trials by status
    report: str  # report/report.html
    parent_run_id: str | None


def sweep_folder(sweep: Sweep) -> str:
    """runs/sweeps/<name>, beside the base config's run folders (absolute: trials run elsewhere)."""
    run_dir = cache.absolute(sweep.trials[0].config.run_dir).rstrip("/")
    return C.join(run_dir.rsplit("/", 1)[0], C.SWEEPS, sweep.name)


def trial_dir(folder: str, name: str) -> str:
    """The run folder of trial `name` in sweep folder `folder`."""
    return C.join(folder, C.SWEEP_TRIALS, name)


def trial_overrides(sweep: Sweep, trial: Trial, folder: str) -> list[str]:
    """A trial's config: its sweep overrides, its own run folder, the base config's cache (shared with
    every run and trial), the sweep's MLflow experiment."""
    cache_dir = cache.absolute(trial.config.cache_dir)
    return [*trial.overrides, f"run.name={json.dumps(trial.name)}",
            f"run.dir={json.dumps(trial_dir(folder, trial.name))}",
            f"cache.dir={json.dumps(cache_dir)}", f"mlflow.experiment={json.dumps(sweep.name)}"]


def run_sweep(sweep: Sweep, folder: str | None = None, restart: bool = False) -> SweepOutcome:
    """Run every trial of `sweep` not finished yet (Ray Tune), then write the phase-diagram report and
    log it to the sweep's parent MLflow run. `restart`: a new Tune experiment (finished trials whose
    artifacts are cached still return at once)."""
    folder = cache.absolute(folder or sweep_folder(sweep))
    base = sweep.trials[0].config
    specs = {t.name: (sweep.base, trial_overrides(sweep, t, folder), t.params) for t in sweep.trials}
    meta_path = C.join(folder, C.SWEEP_JSON)
    previous = cache.read_json(meta_path, {})
    log_path = C.join(folder, C.LOGS, "sweep.log")
    with ExitStack() as stack:
        # A sweep folder at a URL gets its log when the sweep ends (written locally until then).
        local_log = stack.enter_context(cache.local_file(log_path))
        open_log_file(local_log)
        console.info("raywsl sweep %s: %d trials -> %s", sweep.name, len(sweep.trials), folder)
        stack.enter_context(native_output_to(local_log))
        # Tune's tables and MLflow's links print to stdout: into the log (raywsl's lines go to stderr)
        stack.enter_context(redirect_stdout(stack.enter_context(open(local_log, "a", buffering=1))))
        uri, store = _tracking_store(stack, base, folder)
        parent = _parent_run(sweep, uri, store, previous.get("mlflow", {}).get("parent_run_id"), base.mlflow.enabled)
        meta = _describe(sweep, folder, specs, {"tracking_uri": store, "experiment": sweep.name,
                                                "parent_run_id": parent})
        cache.write_json(meta_path, meta, sort_keys=False)
        t0 = time.perf_counter()
        status = "FAILED"
        try:
            results = _tune(sweep, folder, specs, uri, parent, base, restart)
            counts = _settle(folder, specs, results)
            report = write_sweep_report(folder)
            if parent:
                _log_parent(parent, report, counts, time.perf_counter() - t0)
            status = "FINISHED"
        finally:
            if parent:
                import mlflow

                mlflow.end_run(status=status)
    console.info("trials: %s; report: %s", ", ".join(f"{n} {k}" for k, n in counts.items()), report.path)
    if parent:
        console.info("MLflow: mlflow ui --backend-store-uri %s  (experiment %s)", store, sweep.name)
    return SweepOutcome(folder, counts, report.path, parent)


# ------------------------------------------------------------------------------------ MLflow

def _tracking_store(stack: ExitStack, base: Config, folder: str) -> tuple[str, str]:
    """(the URI trials write to, the store a user opens afterwards): a cluster's server when the base
    config names one, else a local server over the sweep's own sqlite store."""
    given = base.mlflow.tracking_uri
    if not base.mlflow.enabled:
        return "", ""
    if given.startswith(("http://", "https://", "databricks")):
        return given, given
    if not cache.is_local(folder):
        raise ConfigError(f"the sweep folder is {folder}, a URL: set mlflow.tracking_uri in the base config to "
                          f"a tracking server every trial reaches (on a cluster, http://<head>:5000), or set "
                          f"mlflow.enabled=false")
    store = C.join(folder, C.SWEEP_MLFLOW)
    uri = stack.enter_context(tracking.tracking_server(store))
    return uri, f"sqlite:///{os.path.join(store, 'mlflow.db')}"


def _parent_run(sweep: Sweep, uri: str, store: str, previous: str | None, enabled: bool) -> str | None:
    """Start (or, for a resumed sweep, reopen) the sweep's parent run; returns its id."""
    if not enabled:
        return None
    import mlflow

    mlflow.set_tracking_uri(uri)
    if store.startswith("sqlite:///") and mlflow.get_experiment_by_name(sweep.name) is None:
        # artifacts written straight into the store's folder (not through the server, which stops with the
        # sweep), so `mlflow ui --backend-store-uri sqlite:///...` shows them afterwards
        mlflow.create_experiment(sweep.name, artifact_location=tracking.local_artifacts(store))
    mlflow.set_experiment(sweep.name)
    if previous:
        try:
            return mlflow.start_run(run_id=previous).info.run_id
        except mlflow.exceptions.MlflowException:  # a store that no longer has it
            log.info("the sweep's previous parent run %s is not in %s: a new one", previous, uri)
    run = mlflow.start_run(run_name=sweep.name, tags={"raywsl.sweep": sweep.name})
    mlflow.log_params({"sweep.base": sweep.base, "sweep.trials": len(sweep.trials),
                       "sweep.scale": json.dumps(list(sweep.scale)), "sweep.variants": ",".join(sweep.variants),
                       "sweep.seeds": json.dumps(list(sweep.seeds)),
                       **{f"sweep.space.{a.key}": json.dumps({a.kind: list(a.values)}) for a in sweep.axes},
                       "sweep.overrides": " ".join(sweep.overrides)[:6000]})
    return run.info.run_id


def _log_parent(parent: str, report, counts: dict[str, int], seconds: float) -> None:
    """The phase diagram in the parent run: figures, the page, the onset per variant as metrics."""
    onsets = {f"onset.{key}": {"N": est.get("onset"), "low": est.get("low"), "high": est.get("high"),
                               "found_share": est.get("found_share")} for key, est in report.onset.items()}
    tracking.log_metrics({**{f"trials_{k.replace(' ', '_')}": v for k, v in counts.items()},
                          "sweep_seconds": seconds, **onsets})  # one call; no onset (None) is left out
    for path in report.figures:
        tracking.log_figure(path, artifact_dir="phase_diagram")
    tracking.log_figure(report.path, artifact_dir="phase_diagram")
    tracking.log_figure(report.table, artifact_dir="phase_diagram")


# ------------------------------------------------------------------------------------ Tune

def _tune(sweep: Sweep, folder: str, specs: dict, uri: str, parent: str | None, base: Config, restart: bool):
    """Run the trials on Ray Tune (restoring an interrupted experiment of the same trials); returns the
    ResultGrid."""
    from raywsl.runtime import ray_session, train_storage

    storage = train_storage(C.join(folder, C.SWEEP_TUNE))  # the sweep folder's file system, also at a URL
    # One Tune experiment per list of trials: the same sweep resumes it, a changed one starts another.
    experiment = "trials-" + hashlib.sha256(json.dumps(sorted(specs.items())).encode()).hexdigest()[:12]
    path = C.join(storage["storage_path"], experiment)
    fs = storage.get("storage_filesystem")
    trainable = tune.with_resources(
        tune.with_parameters(_trial, specs=specs, cwd=os.getcwd(), tracking_uri=uri, parent=parent or ""),
        {"cpu": sweep.trial_resources["cpu"], "gpu": sweep.trial_resources["gpu"]})
    with ray_session(base.ray.address, base.ray.num_cpus or None):
        if restart:
            cache.remove(C.join(folder, C.SWEEP_TUNE, experiment))
        if tune.Tuner.can_restore(path, storage_filesystem=fs):
            console.info("resuming %s (finished trials are not run again)", path)
            tuner = tune.Tuner.restore(path, trainable=trainable, restart_errored=True, storage_filesystem=fs)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={"trial": tune.grid_search([t.name for t in sweep.trials])},
                tune_config=tune.TuneConfig(max_concurrent_trials=sweep.max_concurrent_trials,
                                            scheduler=_scheduler(sweep), trial_name_creator=_trial_name,
                                            trial_dirname_creator=_trial_dirname),
                run_config=tune.RunConfig(name=experiment, **storage, verbose=0,
                                          callbacks=[_Progress(len(sweep.trials))],
                                          failure_config=tune.FailureConfig(max_failures=0)))
        return tuner.fit()


def _trial_name(trial) -> str:
    return trial.config["trial"]


def _trial_dirname(trial) -> str:  # short: trial names can be long
    return trial.trial_id


def _scheduler(sweep: Sweep):
    if not sweep.asha:
        return None
    from ray.tune.schedulers import ASHAScheduler

    a = sweep.asha
    return ASHAScheduler(time_attr="step", metric=a["metric"], mode=a["mode"], grace_period=a["grace_period"],
                         reduction_factor=a["reduction_factor"],
                         max_t=max(t.config.train.steps for t in sweep.trials))


def _settle(folder: str, specs: dict, results) -> dict[str, int]:
    """Every trial's final status in its trial.json (Tune knows which ones ASHA stopped or failed);
    returns the counts by status."""
    errors = {r.config.get("trial"): r.error for r in results if r.config}
    counts: dict[str, int] = {}
    for name in specs:
        path = C.join(trial_dir(folder, name), C.TRIAL_JSON)
        info = cache.read_json(path, {})
        status = info.get("status")
        if status != FINISHED and name in errors:
            status = FAILED if errors[name] is not None else STOPPED
            cache.write_json(path, {**info, "status": status, "error": str(errors[name] or "")[-2000:]})
            _end_child_run(C.join(trial_dir(folder, name), C.MLFLOW_RUN))
        counts[status or C.TRIAL_PENDING] = counts.get(status or C.TRIAL_PENDING, 0) + 1
    return counts


def _end_child_run(id_file: str) -> None:
    """A trial killed mid-run (ASHA, an error in a worker) left its MLflow run RUNNING: mark it KILLED."""
    import mlflow

    try:
        run_id = cache.read_bytes(id_file).decode().strip()
    except OSError:
        return
    if run_id:
        try:
            if mlflow.get_run(run_id).info.status == "RUNNING":
                mlflow.MlflowClient().set_terminated(run_id, "KILLED")
        except mlflow.exceptions.MlflowException as e:
            log.debug("could not end the MLflow run %s: %s", run_id, e)


class _Progress(tune.Callback):
    """One terminal line per trial that ends (Tune's own output goes to the log)."""

    def __init__(self, total: int):
        self.total, self.ended = total, 0

    def _line(self, trial, what: str, result: dict | None) -> None:
        self.ended += 1
        shown = ", ".join(f"{k} {result[k]:.3g}" for k in SHOWN if isinstance((result or {}).get(k), (int, float)))
        console.info("  trial %d/%d %-40s %s%s", self.ended, self.total, trial.config.get("trial"), what,
                     f"  {shown}" if shown else "")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._line(trial, "done", trial.last_result)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trial, "FAILED (see its logs/run.log)", None)


# ------------------------------------------------------------------------------------ one trial

def _trial(config: dict, specs: dict, cwd: str, tracking_uri: str, parent: str) -> None:
    """Tune's function for one trial: the trial's whole run, in its run folder, recorded in trial.json
    and in an MLflow child run of the sweep's; reports its metrics to Tune."""
    from raywsl.models.registry import check_config
    from raywsl.run import run_all
    from raywsl.stages import open_run, plan_for

    if os.path.isdir(cwd):  # relative paths of the base config (data.source, ...) mean the sweep's folder
        os.chdir(cwd)
    setup_logging()  # as the CLI does: stage lines to the trial's log (and, relayed by Ray, the sweep's)
    logging.getLogger("raywsl").setLevel(logging.DEBUG)
    name = config["trial"]
    base, overrides, params = specs[name]
    mlflow_keys = [f"mlflow.tracking_uri={tracking_uri}", f"mlflow.parent_run={parent}"] if tracking_uri else \
        ["mlflow.enabled=false"]
    cfg = check_config(load_config(base, [*overrides, *mlflow_keys]))
    plan = plan_for(cfg)
    fingerprints = {s: plan[s].fingerprint for s in plan.stages}
    path = C.join(plan.run.root, C.TRIAL_JSON)
    info = cache.read_json(path, {})
    if info.get("status") == FINISHED and info.get("fingerprints") == fingerprints:
        metrics = cache.read_json(plan.run.metrics, {})  # done before this sweep was interrupted
        tune.report(_reported(metrics))
        return
    attempts = int(info.get("attempts", 0)) + 1
    started = time.time()
    with _recorded(path, {"name": name, "attempts": attempts, "fingerprints": fingerprints}) as record:
        with open_run(cfg, plan, "run"):
            tracking.set_tags({"raywsl.sweep": cfg.mlflow.experiment, "raywsl.trial": name,
                               **{f"sweep.{k}": str(v) for k, v in params.items()}})
            result = run_all(cfg, plan)
        record["seconds"] = round(time.time() - started, 1)
    tune.report(_reported(result["metrics"]))


@contextmanager
def _recorded(path: str, entry: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """trial.json says running while the block runs, then finished or failed (with the error)."""
    record = {**entry, "status": RUNNING, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    cache.write_json(path, record)
    try:
        yield record
    except BaseException as e:
        cache.write_json(path, {**record, "status": FAILED, "error": f"{type(e).__name__}: {e}"[-2000:]})
        raise
    cache.write_json(path, {**record, "status": FINISHED})


def _reported(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of a trial's metrics, as Tune gets them; `step` and `loss` as the denoiser's
    training reports them (what ASHA compares)."""
    flat = tracking.flatten_metrics({k: v for k, v in metrics.items() if not isinstance(v, dict)})
    for ours, tunes in (("train_step", "step"), ("train_loss", "loss")):
        if ours in flat:
            flat[tunes] = flat[ours]
    return flat


def _describe(sweep: Sweep, folder: str, specs: dict, mlflow_info: dict[str, Any]) -> dict[str, Any]:
    """sweep.json: what the report and a later resume read."""
    return {"name": sweep.name, "base": sweep.base, "dir": folder, "scale": list(sweep.scale),
            "variants": sweep.variants, "seeds": list(sweep.seeds),
            "axes": [{"key": a.key, "kind": a.kind, "values": list(a.values)} for a in sweep.axes],
            "overrides": list(sweep.overrides), "mlflow": mlflow_info,
            "trials": [{"name": t.name, "params": t.params, "run_dir": trial_dir(folder, t.name)}
                       for t in sweep.trials]}
