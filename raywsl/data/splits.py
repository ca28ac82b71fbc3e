"""Train / test split: which shapes are held out as the reference set of the generation metrics.

A shape is held out when a hash of (seed, shape id) falls below ingest.test_fraction. The choice
depends on the shape alone, never on which other shapes are in the set, so a growing dataset keeps
every earlier shape's split, and every stage (diffusion training on the training rows, evaluation
against the held-out meshes) agrees without storing a list. The fraction is fixed when samples.zarr
is created (its `test_fraction` attribute), so later config edits cannot move shapes between splits.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from raywsl.layout import SHAPE_ID

DEFAULT_TEST_FRACTION = 0.2  # for sample stores written before the split existed


def held_out(ids: Sequence[str], seed: int, fraction: float) -> np.ndarray:
    """(N,) bool: True for the shapes of the test split."""
    def u(shape_id: str) -> float:  # uniform in [0, 1) from the first 8 bytes of a SHA-256
        digest = hashlib.sha256(f"{seed}/split/{shape_id}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2.0**64

    return np.array([u(str(i)) < fraction for i in ids], dtype=bool)


def store_split(samples) -> np.ndarray:
    """The test split of a sample store (a RowStore), from its seed and fixed test fraction."""
    attrs = samples.attrs
    ids = samples.row_meta()[SHAPE_ID]
    return held_out(ids, int(attrs.get("seed", 0)), float(attrs.get("test_fraction", DEFAULT_TEST_FRACTION)))


def write_split_manifests(samples, folder: str) -> dict[str, str]:
    """Manifests (id, path, category) of the ingested shapes of each split, from a sample store:
    {"reference": <folder>/reference.csv (held out), "training": <folder>/training.csv}."""
    import csv

    import fsspec

    from raywsl.layout import CATEGORY, SOURCE, join
    from raywsl.store.rows import DONE

    meta = samples.row_meta()
    test, done = store_split(samples), samples.status() == DONE
    fs, root = fsspec.core.url_to_fs(folder)
    fs.makedirs(root, exist_ok=True)
    out = {}
    for name, rows in (("reference", done & test), ("training", done & ~test)):
        path = join(folder, f"{name}.csv")
        with fsspec.open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "path", "category"])
            for k in np.flatnonzero(rows):
                w.writerow([meta[SHAPE_ID][k], meta[SOURCE][k], meta[CATEGORY][k]])
        out[name] = path
    return out

