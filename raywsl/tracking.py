"""MLflow: one MLflow run per run folder, and helpers that log to it.

`run_context(cfg, verb, plan)` (used by the CLI around every stage verb) starts the run folder's MLflow
run, or resumes it: its id is kept in the run folder (`contract.MLFLOW_RUN`), so ingest, fit, eval
and later stages of one run folder with one config all land in one MLflow run, with every stage's
fingerprint, reused flag and artifact as tags (`stage.<name>.*`). The store is
`mlflow.tracking_uri`, by default a sqlite file next to the run folders (`runs/mlflow.db` for
`runs/<name>`), so `mlflow ui --backend-store-uri sqlite:///runs/mlflow.db` compares runs.

Every helper logs to `mlflow.active_run()` and is a no-op (with a debug line) when there is none,
so library code can call them unconditionally: a bare library call or a test needs no server.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import mlflow
import numpy as np

from raywsl import cache
from raywsl.cache import jsonable
from raywsl.progress import route_library_logs

route_library_logs()  # MLflow's own handlers print to the terminal

log = logging.getLogger("raywsl.tracking")

# MLflow accepts alphanumerics, "_", "-", ".", " " and "/" in metric names (and ":" off Windows).
_INVALID_NAME = re.compile(r"[^\w\-. /]")


def tracking_uri(cfg: Any) -> str:
    """The MLflow store of a run: mlflow.tracking_uri, else sqlite beside a local run folder. A run
    folder at a URL has no local place for one: that is an error, not a run recorded nowhere."""
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    if not cache.is_local(cfg.run_dir):
        from raywsl.config import ConfigError

        raise ConfigError(f"run.dir is {cfg.run_dir}, a URL: set mlflow.tracking_uri to the MLflow store the "
                          f"runs go to (on a cluster, its tracking server: http://<head>:5000), or set "
                          f"mlflow.enabled=false")
    return default_tracking_uri(cfg.run_dir)


def default_tracking_uri(run_dir: str) -> str:
    """sqlite next to the run folders: runs/<name> -> sqlite:///<abs>/runs/mlflow.db."""
    parent = os.path.dirname(os.path.abspath(run_dir.rstrip("/")))
    return f"sqlite:///{os.path.join(parent, 'mlflow.db')}"


@contextmanager
def tracking_server(folder: str, timeout: float = 90.0) -> Iterator[str]:
    """A local MLflow tracking server for many concurrent writers (sweep trials), on 127.0.0.1 and a
    free port, storing runs in <folder>/mlflow.db and artifacts in <folder>/mlartifacts (served
    through it); yields its http:// URI and stops it on exit. One server process serialises the
    writes that many processes on one sqlite file would fight over. Its log: <folder>/mlflow-server.log."""
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    folder = os.path.abspath(folder)
    os.makedirs(folder, exist_ok=True)
    with socket.socket() as s:  # a free port (another process could take it before the server: rare, and reported)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    log_path = os.path.join(folder, "mlflow-server.log")
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{os.path.join(folder, 'mlflow.db')}",
           "--artifacts-destination", os.path.join(folder, "mlartifacts")]
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=folder, start_new_session=True,
                                preexec_fn=_stop_with_parent)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = Path(log_path).read_text(errors="replace")[-2000:]
                why = f"exited with {proc.returncode}" if proc.poll() is not None else f"not up after {timeout:g} s"
                raise RuntimeError(f"the MLflow tracking server ({' '.join(cmd)}) {why}; {log_path}:\n{tail}")
            time.sleep(0.5)
        log.info("MLflow tracking server at %s (runs in %s)", uri, folder)
        yield uri
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its worker processes
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _stop_with_parent() -> None:
    """In the server's process, before it starts: SIGTERM when raywsl dies (a killed sweep leaves no
    server behind). Linux only; elsewhere the server outlives a killed sweep."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def local_artifacts(store_uri: str) -> str:
    """The artifact location of experiments in a local sqlite store: mlartifacts/ beside the file (not
    ./mlruns of whatever folder a command ran in), as a file URI any process on this machine writes to."""
    return Path(os.path.join(os.path.dirname(store_uri[len("sqlite:///"):]), "mlartifacts")).as_uri()


@contextmanager
def run_context(cfg: Any, verb: str, plan: Any, restart: bool = False) -> Iterator[None]:
    """Start or resume the run folder's MLflow run for one verb. The run folder keeps its run (its id
    in contract.MLFLOW_RUN) while the config stays the same; a command with other settings starts a new
    MLflow run (tagged with the previous one), so params always say what produced the run's results.
    An error ends the MLflow run as FAILED."""
    from raywsl.config import to_dict

    mc = cfg.mlflow
    logging.getLogger("alembic").setLevel(logging.WARNING)  # sqlite schema migrations are chatty
    if not mc.enabled or mlflow.active_run() is not None:
        yield  # disabled, or already inside a run (a job, a sweep)
        return
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    params = flatten_config(to_dict(cfg))
    id_file = plan.run.mlflow_run
    previous = cache.read_bytes(id_file).decode().strip() if cache.exists(id_file) and not restart else None
    # Two commands starting at once on one sqlite file race to create its tables: one at a time.
    db_lock = f"{uri[len('sqlite:///'):]}.lock" if uri.startswith("sqlite:///") else ""
    with cache.file_lock(db_lock) if db_lock else contextlib.nullcontext():
        if mlflow.get_experiment_by_name(mc.experiment) is None and uri.startswith("sqlite:///"):
            mlflow.create_experiment(mc.experiment, artifact_location=local_artifacts(uri))
        mlflow.set_experiment(mc.experiment)
        run = None
        if previous:
            try:
                existing = mlflow.get_run(previous)
                same = all(existing.data.params.get(k, v) == v for k, v in params.items()
                           if not k.startswith("mlflow."))  # where runs are recorded is not a setting
                run = mlflow.start_run(run_id=previous) if same else None
            except mlflow.exceptions.MlflowException:  # an id of another store (a copied folder)
                previous = None
        if run is None:
            tags = {"raywsl.previous_run_id": previous} if previous else {}
            if mc.parent_run:  # a sweep's trial: MLflow shows it under the sweep's run
                tags["mlflow.parentRunId"] = mc.parent_run
            run = mlflow.start_run(run_name=cfg.run.name, tags=tags or None)
    cache.write_text(id_file, run.info.run_id)
    status = "FAILED"
    try:
        mlflow.set_tags({f"raywsl.{verb}": "started", "raywsl.run_dir": str(plan.run.root),
                         "raywsl.cache": str(plan.cache)})
        mlflow.log_params({k: v for k, v in params.items() if k not in run.data.params})
        yield
        mlflow.set_tag(f"raywsl.{verb}", "finished")
        status = "FINISHED"
    finally:
        if status == "FAILED":
            mlflow.set_tag(f"raywsl.{verb}", "failed")
        mlflow.end_run(status=status)


def flatten_config(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:6000]
    return out


def _active() -> bool:
    if mlflow.active_run() is None:
        log.debug("no active MLflow run: not logging")
        return False
    return True


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "", finite_only: bool = True) -> dict[str, float]:
    """Nested dicts flattened to "a.b" names, keeping the numbers (bools as 0/1, numpy scalars and 0-d
    arrays included); arrays, strings and None are left out, and so are NaN and inf unless
    `finite_only` is False."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = _INVALID_NAME.sub("_", f"{prefix}{key}")
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, f"{name}.", finite_only))
        elif isinstance(value, (bool, int, float, np.number, np.bool_)) or (
                isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "biuf"):
            number = float(value)
            if math.isfinite(number) or not finite_only:
                flat[name] = number
    return flat


ALARM_TAG = "alarm.nonfinite"  # the run's tag listing every metric that was ever NaN or inf
NONFINITE_METRIC = "nonfinite_metrics"  # how many metric names that tag lists
_TAG_LIMIT = 5000  # characters of a tag value MLflow stores everywhere


def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> dict[str, float]:
    """Log the numbers in `metrics` (see `flatten_metrics`); returns the finite ones (what was, or with
    no active run would have been, logged besides the alarms).

    A NaN or inf (a diverged loss, an undefined score) is never dropped silently: it gets a warning,
    is logged as MLflow records it (NaN as NaN, +-inf clamped to +-1.8e308 by MLflow's store), its
    name joins the run's `alarm.nonfinite` tag (comma-separated, every such name of the run so far)
    and `nonfinite_metrics` counts the names that tag lists."""
    everything = flatten_metrics(metrics, finite_only=False)
    flat = {k: v for k, v in everything.items() if math.isfinite(v)}
    bad = sorted(k for k in everything if k not in flat)
    for name in bad:
        log.warning("metric %s is %s at step %s: a non-finite value (diverged or undefined); logged as is and "
                    "listed in the MLflow run's tag %s", name, everything[name], step, ALARM_TAG)
    if not everything or not _active():
        return flat
    if bad:
        tags = mlflow.get_run(mlflow.active_run().info.run_id).data.tags
        names = sorted({*filter(None, tags.get(ALARM_TAG, "").split(",")), *bad})
        value = ",".join(names)
        mlflow.set_tag(ALARM_TAG, value if len(value) <= _TAG_LIMIT else value[:_TAG_LIMIT - 3] + "...")
        everything[NONFINITE_METRIC] = float(len(names))
    mlflow.log_metrics(everything, step=step)
    return flat


def log_figure(path, artifact_dir: str = "figures") -> None:
    """Upload an image file (a PNG from raywsl.geometry.figures, local or at a URL) as an artifact,
    if it exists."""
    path = os.fspath(path)
    if not _active() or not cache.exists(path):
        return
    if cache.is_local(path):
        mlflow.log_artifact(cache.local_path(path), artifact_path=artifact_dir)
        return
    with tempfile.TemporaryDirectory() as tmp:  # MLflow uploads local files
        local = os.path.join(tmp, path.rstrip("/").rsplit("/", 1)[-1])
        with open(local, "wb") as f:
            f.write(cache.read_bytes(path))
        mlflow.log_artifact(local, artifact_path=artifact_dir)


def set_tags(tags: Mapping[str, str]) -> None:
    if _active():
        mlflow.set_tags(dict(tags))


def log_meshes(paths: Iterable, artifact_dir: str = "meshes") -> None:
    """Upload mesh files (PLY/OBJ/GLB...) as artifacts; MLflow's UI previews some of them."""
    if _active():
        for path in paths:
            mlflow.log_artifact(str(path), artifact_path=artifact_dir)


def log_json(obj: Any, name: str) -> None:
    """Store `obj` as the JSON artifact `name` (e.g. "eval/metrics.json"); numpy arrays and
    scalars are converted, NaN / inf are written as Python's json writes them (NaN, Infinity)."""
    if _active():
        mlflow.log_text(json.dumps(obj, default=jsonable, indent=2), name)


class StepGuard:
    """The non-finite step rule of the training loops (train-base, train): a step whose loss or
    gradient norm is NaN or inf is skipped (no update), counted and warned about; `max_bad` such
    steps in a row abort the run, since a model that diverged would otherwise keep "training" on
    nothing and report success.

        guard = StepGuard("train", "train.max_bad_steps", cfg.train.max_bad_steps)
        if guard.healthy(step, loss, grad_norm):
            opt.step()
    """

    def __init__(self, stage: str, option: str, max_bad: int, skipped: int = 0):
        self.stage, self.option, self.max_bad = stage, option, max_bad
        self.skipped = skipped  # steps skipped so far (restored from a checkpoint by the caller)
        self.in_a_row = 0

    def healthy(self, step: int, loss: float, grad_norm: float, bad_anywhere: bool = False) -> bool:
        """True: take step `step`. False: skip it (counted and warned). `bad_anywhere`: some worker's
        loss was not finite (in a distributed run every worker must skip the same steps). Raises
        RuntimeError when this is the `max_bad`-th skipped step in a row."""
        if math.isfinite(loss) and math.isfinite(grad_norm) and not bad_anywhere:
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        what = f"loss {loss:.4g}, gradient norm {grad_norm:.4g}"
        if math.isfinite(loss) and bad_anywhere:
            what += ", another worker's loss not finite"
        if self.in_a_row >= self.max_bad:
            raise RuntimeError(f"{self.stage}: diverged: {self.in_a_row} steps in a row with a non-finite loss or "
                               f"gradient, the last at step {step} ({what}); {self.option} = {self.max_bad} aborts "
                               f"there. Lower the learning rate, clip gradients harder, or look for NaN in the "
                               f"training data")
        log.warning("%s: step %d skipped (no update): non-finite loss or gradient (%s); %d skipped so far, %d in "
                    "a row (%s = %d aborts)", self.stage, step, what, self.skipped, self.in_a_row, self.option,
                    self.max_bad)
        return False
