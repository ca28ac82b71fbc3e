"""What both probes share: the run's fitted training shapes, decoding rows to meshes and their
topology, intervals over seeds, and writing a probe's tables, figures and MLflow records."""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import trimesh

from raywsl import cache, tracking
from raywsl import contract as C
from raywsl.config import Config
from raywsl.eval.probe import ProbeError  # noqa: F401  (the probes' error, as `raywsl probe`'s)
from raywsl.fit.inputs import INPUTS, StoreInput
from raywsl.geometry.extract import decode_rows
from raywsl.geometry.topology import topology
from raywsl.models.fields import Field, field_of
from raywsl.store.weights import fitted_training_rows

log = logging.getLogger(__name__)

# Topology columns of every decoded shape, in table order.
TOPOLOGY_COLUMNS = ("ok", "components", "major_components", "euler", "genus", "watertight")


@dataclass
class Training:
    """The run's fitted training shapes: store rows, ids, categories and the field they belong to."""

    cfg: Config
    plan: C.Plan
    store: Any  # the weight store (RowStore)
    field: Field
    rows: np.ndarray  # weight-store row indices (the sample store's rows are the same shapes)
    ids: np.ndarray  # (n,) shape ids
    categories: np.ndarray  # (n,) categories

    @property
    def label(self) -> str:
        """The parameterisation, for titles: the field type, "-asym" with asymmetric masks."""
        return self.field.type_name + ("-asym" if self.field.asym else "")

    @classmethod
    def load(cls, cfg: Config, plan: C.Plan, need: int, purpose: str) -> "Training":
        store, rows = fitted_training_rows(plan.weights, cfg.data.shapes, need, purpose)
        ids, categories = (np.array([str(v) for v in store.read(key, rows)], dtype=str)
                           for key in (C.SHAPE_ID, C.CATEGORY))  # these rows' only
        return cls(cfg, plan, store, field_of(store), rows, ids, categories)

    def select(self, category: str | None) -> np.ndarray:
        """Positions (into rows) of the shapes of `category` (all for None); refused if there are none."""
        if category is None:
            return np.arange(len(self.rows))
        picked = np.flatnonzero(self.categories == category)
        if not len(picked):
            have = ", ".join(f"{c} ({n})" for c, n in zip(*np.unique(self.categories, return_counts=True)))
            raise ProbeError(f"no fitted training shape of category {category!r}; the run has: {have}")
        return picked

    def find(self, key: str) -> int:
        """The position of shape id `key`, or of the first shape of category `key`."""
        hit = np.flatnonzero(self.ids == key)
        return int(hit[0]) if len(hit) else int(self.select(key)[0])

    def weights(self, positions: Sequence[int]) -> np.ndarray:
        """(k, P) float32 rows of the shapes at `positions`."""
        return self.store.read(C.ROW_WEIGHTS, self.rows[np.asarray(positions, dtype=np.int64)])

    def surfaces(self, positions: Sequence[int]) -> np.ndarray:
        """(k, S, 3) float32 ingested surface points (normalised frame) of the shapes at `positions`."""
        rows = self.rows[np.asarray(positions, dtype=np.int64)]
        source = INPUTS[self.cfg.fit.samples](self.cfg, self.plan)
        if isinstance(source, StoreInput):  # the surface alone, not the SDF samples
            return source.samples.read(C.SURFACE, rows)
        return source.truth(rows)[C.SURFACE].astype(np.float32)


def decode(field: Field, rows: np.ndarray | torch.Tensor, resolution: int, device: str
           ) -> tuple[list[dict[str, Any]], list[trimesh.Trimesh | None]]:
    """Decode rows (n, P) of `field` at `resolution`: per row its topology (TOPOLOGY_COLUMNS, plus the
    reason when there is no mesh) and its mesh (None when there is none)."""
    rows = torch.as_tensor(np.asarray(rows, dtype=np.float32))
    extracted = decode_rows(field.bind, rows, resolution, device)
    out = []
    for ex in extracted:
        t = topology(ex.mesh)
        out.append({"ok": ex.ok, **{k: t[k] for k in TOPOLOGY_COLUMNS[1:]}, "reason": ex.reason})
    return out, [ex.mesh for ex in extracted]


def interval(values: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """{mean, lo, hi, n}: Student's t interval of the mean of the finite values (lo = hi = mean for
    one value; NaN for none)."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if not len(v):
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    mean = float(v.mean())
    if len(v) == 1:
        return {"mean": mean, "lo": mean, "hi": mean, "n": 1}
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": len(v)}


def csv_text(rows: Sequence[dict[str, Any]]) -> str:
    """A CSV table of dict rows (columns: the first row's keys, then any new ones in order)."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _cell(r.get(k)) for k in columns})
    return buf.getvalue()


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else value


def publish(out: str, name: str, summary: dict[str, Any], tables: dict[str, Sequence[dict[str, Any]]],
            figures: Sequence[str], scalars: dict[str, float]) -> None:
    """Write a probe's summary.json and CSV tables into `out`, log its finite scalars (as <name>.<key>), its
    figures and its summary (under probe/<folder>/) to the active MLflow run."""
    folder = out.rstrip("/").rsplit("/", 1)[-1]
    for file, rows in tables.items():
        cache.write_text(C.join(out, file), csv_text(rows))
    cache.write_json(C.join(out, C.PROBE_SUMMARY), summary)
    # NaN here means "none" (no transition, no valid sample), not a diverged value: summary.json keeps it,
    # MLflow gets the defined figures only (tracking would raise its non-finite alarm).
    tracking.log_metrics({name: {k: v for k, v in scalars.items() if math.isfinite(v)}})
    for path in figures:
        tracking.log_figure(path, f"{C.PROBE}/{folder}")
    tracking.log_json(summary, f"{C.PROBE}/{folder}/{C.PROBE_SUMMARY}")
    log.info("probe %s: %s", name, ", ".join(f"{k} {v:.4g}" for k, v in scalars.items()
                                             if isinstance(v, (int, float)) and math.isfinite(v)))
