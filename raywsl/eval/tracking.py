"""Logging evaluation results to the active MLflow run.

Every helper logs to `mlflow.active_run()` and is a no-op (with a debug line) when there is none,
so evaluation code can call them unconditionally: a run started by the CLI or a job gets the
metrics, a bare library call or a test does not need a tracking server.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import mlflow
import numpy as np

log = logging.getLogger("raywsl.eval.tracking")

# MLflow accepts alphanumerics, "_", "-", ".", " " and "/" in metric names (and ":" off Windows).
_INVALID_NAME = re.compile(r"[^\w\-. /]")


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
