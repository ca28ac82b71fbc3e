"""Reading a weight store (`weights.zarr`, written by `raywsl fit`) back as fields and tensors.

    store = open_weights("runs/quickstart/weights.zarr")
    shard = shard_tensors(store, 0)              # {"weights": (n, P), "loss", "steps", "status"} tensors
    field = raywsl.models.fields.field_of(store) # the field the rows were fitted with (a layer above)
    sdf = field.bind(shard["weights"])(points)   # points (n, M, 3) -> (n, M)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from raywsl import contract as C
from raywsl.store.rows import DONE, RowStore, StoreError
from raywsl.store.split import training_rows
from raywsl.store.standardize import Standardizer


def open_weights(path: str) -> RowStore:
    return RowStore.open(path, kind="weights")


def fitted_training_rows(path: str, shapes: int, need: int, purpose: str) -> tuple[RowStore, np.ndarray]:
    """The weight store at `path` and the fitted rows of its first `shapes` training shapes
    (store/split.py; 0: all); refused (StoreError naming the command to run) when the store is
    missing or holds fewer than `need` of them (`purpose` says who needs them)."""
    try:
        store = open_weights(path)
    except StoreError as e:
        raise StoreError(f"{e}: the weights of this config are not fitted; run `raywsl fit` with this "
                         f"config first") from e
    rows = training_rows(store, shapes)
    if len(rows) < need:
        raise StoreError(f"{store.path}: {len(rows)} fitted training rows for data.shapes={shapes}; {purpose} "
                         f"need at least {need}: run `raywsl fit` with this config first")
    return store, rows


def shard_tensors(store: RowStore, k: int, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Shard k as torch tensors (weights, loss, steps, status) plus its shape ids."""
    arrays = store.read_shard(k, [C.ROW_WEIGHTS, C.FIT_LOSS, C.FIT_STEPS, C.SHAPE_ID])
    arrays[C.STATUS] = store.shard_status(k)  # uncommitted: pending, whatever is there
    out: dict[str, Any] = {name: torch.from_numpy(np.asarray(arrays[name])).to(device)
                           for name in (C.ROW_WEIGHTS, C.FIT_LOSS, C.FIT_STEPS, C.STATUS)}
    out[C.SHAPE_ID] = [str(s) for s in arrays[C.SHAPE_ID]]
    return out


def weights_summary(store: RowStore) -> dict[str, Any]:
    """The weight-specific part of `raywsl inspect`: field, init and the fitted losses."""
    attrs = store.attrs
    done = store.status() == DONE
    loss = store.read(C.FIT_LOSS)[done]
    steps = store.read(C.FIT_STEPS)[done]
    A = C.Attr
    return {"field_type": attrs[A.FIELD_TYPE], "field_preset": attrs[A.FIELD_PRESET], "params": attrs[A.PARAMS],
            "init": attrs[A.INIT], "warm_shape": attrs.get(A.WARM_SHAPE, ""),
            "loss": attrs[A.FIT]["loss"],
            "loss_median": float(np.median(loss)) if len(loss) else None,
            "loss_p95": float(np.quantile(loss, 0.95)) if len(loss) else None,
            "steps_mean": float(steps.mean()) if len(steps) else None}


def standardizer_of(store: RowStore, rows: np.ndarray) -> Standardizer:
    """Per-parameter mean / std over `rows` (row indices) of a weight store, read a shard at a time (never
    the whole store at once): what diffusion and the point-cloud encoder standardise their rows with."""
    rows = np.asarray(rows, dtype=np.int64)

    def shards():
        for k in range(store.n_shards):
            span = store.shard_rows(k)
            mine = rows[(rows >= span.start) & (rows < span.stop)]
            if len(mine):
                yield store.group[C.ROW_WEIGHTS].get_orthogonal_selection((np.sort(mine), slice(None)))

    return Standardizer.fit(shards())
