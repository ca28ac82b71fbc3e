"""The split and the training order: which shapes are held out, and which N shapes a run trains on.

Every shape of a source gets u = a hash of (seed, shape id), uniform in [0, 1). The row stores keep
their rows sorted by u, so one order serves two purposes:

- held out: the shapes with u < ingest.test_fraction, i.e. rows [0, H) of every store. The choice
  depends on the shape alone, never on N or on which other shapes are in the set, and the fraction
  is fixed when samples.zarr is created (its `held_out` and `test_fraction` attributes). They are the
  reference set of the generation metrics: ingested, never fitted.
- training: rows [H, H + N) for data.shapes = N (0: all the rest). Subsets are nested (N = 20 is
  part of N = 50) and a random sample of the source, whatever order the source lists its meshes in,
  so a run with more shapes extends the stores a smaller run filled instead of starting over.
"""

from __future__ import annotations

import csv
import hashlib
from typing import Sequence

import fsspec
import numpy as np

from raywsl import contract as C
from raywsl.store.rows import DONE, RowStore


def u_of(shape_id: str, seed: int) -> float:
    """Uniform in [0, 1) from the first 8 bytes of a SHA-256 of (seed, shape id)."""
    digest = hashlib.sha256(f"{seed}/split/{shape_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def held_out(ids: Sequence[str], seed: int, fraction: float) -> np.ndarray:
    """(N,) bool: True for the shapes of the held-out split."""
    return np.array([u_of(str(i), seed) < fraction for i in ids], dtype=bool)


def store_order(ids: Sequence[str], seed: int) -> np.ndarray:
    """The row order of the stores: indices into `ids` sorted by u (ties, which need a hash
    collision, by shape id)."""
    keys = [(u_of(str(i), seed), str(i)) for i in ids]
    return np.array(sorted(range(len(ids)), key=keys.__getitem__), dtype=np.int64)


def held_out_count(ids: Sequence[str], seed: int, fraction: float) -> int:
    return int(held_out(ids, seed, fraction).sum())


def training_range(store: RowStore, shapes: int) -> range:
    """Rows [H, H + shapes) of a store (all rows after the held-out ones when shapes is 0)."""
    h = int(store.attrs[C.Attr.HELD_OUT])
    return range(h, store.n_rows if not shapes else min(store.n_rows, h + shapes))


def held_out_range(store: RowStore) -> range:
    return range(int(store.attrs[C.Attr.HELD_OUT]))


def shards_of(store: RowStore, rows: range, shard_size: int | None = None) -> list[int]:
    """The shards holding any of `rows` (of `shard_size` rows: the store's own by default)."""
    size = shard_size or store.shard_size
    if not len(rows):
        return []
    return list(range(rows.start // size, (rows.stop - 1) // size + 1))


def training_rows(store: RowStore, shapes: int) -> np.ndarray:
    """Indices of the rows a run with data.shapes = `shapes` trains on: in its training range, and
    done (fitted, or ingested for a sample store)."""
    rows = training_range(store, shapes)
    return np.flatnonzero(store.status(rows) == DONE) + rows.start


def write_split_manifests(samples: RowStore, folder: str, shapes: int) -> dict[str, str]:
    """Manifests (id, path, category) of the ingested shapes of each split, from a sample store:
    {"reference": <folder>/reference.csv (held out), "training": <folder>/training.csv (the run's
    training shapes)}."""
    held = held_out_range(samples)
    rows = {"reference": (np.flatnonzero(samples.status(held) == DONE) + held.start).tolist(),
            "training": training_rows(samples, shapes).tolist()}
    fs, root = fsspec.core.url_to_fs(folder)
    fs.makedirs(root, exist_ok=True)
    out = {}
    for name, file in (("reference", C.REFERENCE_SET), ("training", C.TRAINING_SET)):
        path = C.join(folder, file)
        with fsspec.open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "path", "category"])
            w.writerows(zip(*(samples.read(column, rows[name]).tolist()  # only the rows listed
                              for column in (C.SHAPE_ID, C.SOURCE, C.CATEGORY))))
        out[name] = path
    return out
