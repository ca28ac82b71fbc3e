"""Reading a weight store (`weights.zarr`, written by `raywsl fit`) back as fields and tensors.

    store = open_weights("runs/quickstart/weights.zarr")
    field = field_of(store)                      # the field type and size the rows were fitted with
    shard = shard_tensors(store, 0)              # {"weights": (n, P), "loss", "steps", "status"} tensors
    sdf = field.bind(shard["weights"])(points)   # points (n, M, 3) -> (n, M)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from raywsl import layout as L
from raywsl.fit.fields import FIELDS, Field, FieldError, Layout
from raywsl.store.rows import DONE, RowStore


def open_weights(path: str) -> RowStore:
    return RowStore.open(path, kind="weights")


def field_of(store: RowStore) -> Field:
    """The field the store's rows belong to, rebuilt from its attributes (and checked against the
    stored layout, so a changed field definition cannot silently misread old rows)."""
    attrs = store.attrs
    field = FIELDS[attrs["field_type"]](**attrs["field_config"])
    if field.layout != Layout.from_json(attrs["layout"]) or field.frozen_fingerprint() != attrs["frozen_fingerprint"]:
        raise FieldError(f"{store.path}: the {attrs['field_type']} field of this raywsl version has another "
                         f"layout or other frozen parts than the one the store was fitted with")
    return field


def shard_tensors(store: RowStore, k: int, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Shard k as torch tensors (weights, loss, steps, status) plus its shape ids."""
    arrays = store.read_shard(k, [L.ROW_WEIGHTS, L.FIT_LOSS, L.FIT_STEPS, L.STATUS, L.SHAPE_ID])
    if not store.shards_done()[k]:
        arrays[L.STATUS] = np.zeros_like(arrays[L.STATUS])  # uncommitted: pending, whatever is there
    out: dict[str, Any] = {name: torch.from_numpy(np.asarray(arrays[name])).to(device)
                           for name in (L.ROW_WEIGHTS, L.FIT_LOSS, L.FIT_STEPS, L.STATUS)}
    out[L.SHAPE_ID] = [str(s) for s in arrays[L.SHAPE_ID]]
    return out


def weights_summary(store: RowStore) -> dict[str, Any]:
    """The weight-specific part of `raywsl inspect`: field, init and the fitted losses."""
    attrs = store.attrs
    done = store.status() == DONE
    loss = store.group[L.FIT_LOSS][:][done]
    steps = store.group[L.FIT_STEPS][:][done]
    return {"field_type": attrs["field_type"], "field_preset": attrs["field_preset"], "params": attrs["params"],
            "init": attrs["init"], "warm_shape": attrs.get("warm_shape", ""),
            "loss": attrs["fit"]["loss"],
            "loss_median": float(np.median(loss)) if len(loss) else None,
            "loss_p95": float(np.quantile(loss, 0.95)) if len(loss) else None,
            "steps_mean": float(steps.mean()) if len(steps) else None}
