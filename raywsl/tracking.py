"""MLflow: one MLflow run per run folder, and helpers that log to it.

`run_context(cfg, verb)` (used by the CLI around every stage verb) starts the run folder's MLflow
run, or resumes it: its id is kept in the run folder (`layout.MLFLOW_RUN`), so ingest, fit, eval
and later stages of one run folder all land in one MLflow run. The store is
`mlflow.tracking_uri`, by default a sqlite file next to the run folders (`runs/mlflow.db` for
`runs/<name>`), so `mlflow ui --backend-store-uri sqlite:///runs/mlflow.db` compares runs.

Every helper logs to `mlflow.active_run()` and is a no-op (with a debug line) when there is none,
so library code can call them unconditionally: a bare library call or a test needs no server.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import mlflow
import numpy as np

log = logging.getLogger("raywsl.tracking")

# MLflow accepts alphanumerics, "_", "-", ".", " " and "/" in metric names (and ":" off Windows).
_INVALID_NAME = re.compile(r"[^\w\-. /]")


def default_tracking_uri(run_dir: str) -> str:
    """sqlite next to the run folders: runs/<name> -> sqlite:///<abs>/runs/mlflow.db."""
    parent = os.path.dirname(os.path.abspath(run_dir.rstrip("/")))
    return f"sqlite:///{os.path.join(parent, 'mlflow.db')}"


@contextmanager
def run_context(cfg: Any, verb: str, restart: bool = False) -> Iterator[None]:
    """Start or resume the run folder's MLflow run for one verb; log the config as params."""
    from raywsl import layout as L
    from raywsl.config import to_dict

    mc = cfg.mlflow
    remote_dir = "://" in cfg.run_dir
    if not mc.enabled or mlflow.active_run() is not None or (remote_dir and not mc.tracking_uri):
        yield  # disabled, already inside a run (a job, a sweep), or no local place for the store
        return
    logging.getLogger("alembic").setLevel(logging.WARNING)  # sqlite schema migrations are chatty
    uri = mc.tracking_uri or default_tracking_uri(cfg.run_dir)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(mc.experiment) is None and uri.startswith("sqlite:///"):
        # artifacts beside the sqlite file, not in ./mlruns of whatever folder the command ran in
        artifacts = os.path.join(os.path.dirname(uri[len("sqlite:///"):]), "mlartifacts")
        mlflow.create_experiment(mc.experiment, artifact_location=Path(artifacts).as_uri())
    mlflow.set_experiment(mc.experiment)
    id_file = Path(L.RunLayout(cfg.run_dir).mlflow_run)
    run_id = id_file.read_text().strip() if id_file.exists() and not restart else None
    try:
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else cfg.run.name)
    except mlflow.exceptions.MlflowException:  # the id is from another store (a copied folder): start afresh
        run = mlflow.start_run(run_name=cfg.run.name)
    id_file.write_text(run.info.run_id)
    try:
        mlflow.set_tag(f"raywsl.{verb}", "started")
        _log_params(flatten_config(to_dict(cfg)))
        yield
        mlflow.set_tag(f"raywsl.{verb}", "finished")
    finally:
        mlflow.end_run()


def flatten_config(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:6000]
    return out


def _log_params(params: dict[str, str]) -> None:
    """Params are write-once in MLflow: a later verb with another value of a key (an eval-only
    override, say) is recorded as a tag instead of failing."""
    existing = mlflow.active_run().data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in existing})
    changed = {k: v for k, v in params.items() if k in existing and existing[k] != v}
    if changed:
        mlflow.set_tags({f"param_changed.{k}": v for k, v in changed.items()})


def _active() -> bool:
    if mlflow.active_run() is None:
        log.debug("no active MLflow run: not logging")
        return False
    return True


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested dicts flattened to "a.b" names, keeping only finite numbers (bools as 0/1, numpy
    scalars and 0-d arrays included); arrays, strings, None, NaN and inf are left out."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = _INVALID_NAME.sub("_", f"{prefix}{key}")
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, f"{name}."))
        elif isinstance(value, (bool, int, float, np.number, np.bool_)) or (
                isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "biuf"):
            number = float(value)
            if math.isfinite(number):
                flat[name] = number
    return flat


def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> dict[str, float]:
    """Log the finite numbers in `metrics` (see `flatten_metrics`); returns what was (or, with no
    active run, would have been) logged."""
    flat = flatten_metrics(metrics)
    if flat and _active():
        mlflow.log_metrics(flat, step=step)
    return flat


def log_figure(path, artifact_dir: str = "figures") -> None:
    """Upload an image file (a PNG from raywsl.eval.figures) as an artifact."""
    if _active():
        mlflow.log_artifact(str(path), artifact_path=artifact_dir)


def log_meshes(paths: Iterable, artifact_dir: str = "meshes") -> None:
    """Upload mesh files (PLY/OBJ/GLB...) as artifacts; MLflow's UI previews some of them."""
    if _active():
        for path in paths:
            mlflow.log_artifact(str(path), artifact_path=artifact_dir)


def jsonable(value: Any) -> Any:
    """json.dumps fallback for numpy values and paths."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def log_json(obj: Any, name: str) -> None:
    """Store `obj` as the JSON artifact `name` (e.g. "eval/metrics.json"); numpy arrays and
    scalars are converted, NaN / inf are written as Python's json writes them (NaN, Infinity)."""
    if _active():
        mlflow.log_text(json.dumps(obj, default=jsonable, indent=2), name)
