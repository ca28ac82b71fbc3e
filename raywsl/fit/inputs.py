"""Where fitting gets its SDF samples (`fit.samples`): the sample store, or ingest's sampler on the fly.

    store   <run.dir>/samples.zarr, written by `raywsl ingest`, read by the RowStore Datasource
    stream  the meshes of `data.source` sampled inside the fit job (Ray Data tasks on CPUs feeding
            the fitting actors), never stored: a million-shape run need not keep terabytes of
            samples. The samples are the ones ingest would store (same sampler, same per-shape seeds).

Both give the fit job the same things: the shapes (ids, sources, categories), a fingerprint of the
samples (stream: the one ingest would give the same config), the anchor shape's samples for warm
start, a Ray Dataset with exactly one block per weight shard (columns `row`, `shape_id`,
`category`, `status`, `reason`, `points`, `sdf`, as `store.datasource`), and the ground truth of a
few shapes for the reconstructions.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from raywsl import layout as L
from raywsl.config import Config
from raywsl.store.rows import DONE, FAILED, PENDING, RowStore, StoreError

TRUTH = (L.POINTS, L.SDF, L.SURFACE, L.CENTER, L.SCALE)  # what the reconstructions compare against
SAMPLE_RETRIES = 2  # retries of a sampling task whose worker died


class StoreInput:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        path = L.RunLayout(cfg.run_dir).samples
        try:
            self.samples = RowStore.open(path, kind="samples")
        except StoreError as e:
            raise StoreError(f"{e}: run `raywsl ingest` with this run.dir first (or set fit.samples=stream)") from e
        unsampled = int((self.samples.status() == PENDING).sum())
        if unsampled:  # fitting them now would commit them as failed rows that no rerun would refit
            raise StoreError(f"{path}: {unsampled} shapes are not ingested yet (ingest was interrupted): "
                             f"rerun `raywsl ingest` with this run.dir to finish it, then fit")
        meta = self.samples.row_meta()
        self.ids = [str(i) for i in meta[L.SHAPE_ID]]
        self.sources = [str(s) for s in meta[L.SOURCE]]
        self.categories = [str(c) for c in meta[L.CATEGORY]]
        self.fingerprint = self.samples.fingerprint
        self.where = path

    def usable(self) -> np.ndarray:
        """Rows known to have samples (for choosing the warm-start anchor)."""
        return self.samples.status() == DONE

    def anchor(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.samples.group[L.POINTS][k], self.samples.group[L.SDF][k]

    def dataset(self, ranges: list[tuple[int, int]]):
        from raywsl.store.datasource import read_rows

        return read_rows(self.samples.path, [L.POINTS, L.SDF], row_ranges=ranges)

    def truth(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return {name: self.samples.group[name].get_orthogonal_selection(
            (rows, *[slice(None)] * (self.samples.group[name].ndim - 1))) for name in TRUTH}


class StreamInput:
    def __init__(self, cfg: Config):
        from raywsl.data.sources import resolve_source
        from raywsl.ingest.pipeline import samples_fingerprint

        self.cfg = cfg
        self.refs = resolve_source(cfg.data.source)
        self.ids = [r.shape_id for r in self.refs]
        self.sources = [r.uri for r in self.refs]
        self.categories = [r.category for r in self.refs]
        self.fingerprint = samples_fingerprint(cfg, self.refs)
        self.where = cfg.data.source

    def usable(self) -> np.ndarray:
        return np.ones(len(self.ids), dtype=bool)  # unknown until sampled: the anchor may still fail

    def anchor(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        values, reason = _sample(self.ids[k], self.sources[k], self.cfg)
        if values is None:
            raise StoreError(f"fit.init=warm: the anchor shape {self.ids[k]} cannot be sampled ({reason}); "
                             f"pick another with fit.warm_shape")
        return values[L.POINTS], values[L.SDF]

    def dataset(self, ranges: list[tuple[int, int]]):
        import ray

        items = [{"start": a, "stop": b} for a, b in ranges]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds.context.target_max_block_size = None  # one shard = one block, however big (see datasource.py)
        return ds.map_batches(sample_block, batch_size=1, num_cpus=1, max_retries=SAMPLE_RETRIES,
                              fn_kwargs={"ids": self.ids, "sources": self.sources,
                                         "categories": self.categories, "cfg": self.cfg})

    def truth(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, list] = {name: [] for name in TRUTH}
        for k in rows:
            values, _ = _sample(self.ids[k], self.sources[k], self.cfg)
            for name in TRUTH:
                out[name].append(values[name])
        return {name: np.stack(v) for name, v in out.items()}


INPUTS: dict[str, type] = {"store": StoreInput, "stream": StreamInput}


def _sample(shape_id: str, uri: str, cfg: Config) -> tuple[dict[str, np.ndarray] | None, str]:
    from raywsl.ingest.pipeline import sample_row

    os.environ.setdefault("IGL_NUM_THREADS", "1")  # one SDF thread per task, as in ingest
    return sample_row(shape_id, uri, cfg)


def sample_block(batch: dict[str, np.ndarray], ids: list[str], sources: list[str], categories: list[str],
                 cfg: Config) -> dict[str, Any]:
    """Ray Data task: sample the meshes of rows [start, stop) into one block with the columns of
    `store.datasource`; a mesh that fails is a row with status FAILED and ingest's reason."""
    start, stop = int(batch["start"][0]), int(batch["stop"][0])
    n, m = stop - start, cfg.ingest.points
    points, sdf = np.zeros((n, m, 3), np.float32), np.zeros((n, m), np.float32)
    status, reason = np.full(n, FAILED, np.int8), [""] * n
    for i, k in enumerate(range(start, stop)):
        values, reason[i] = _sample(ids[k], sources[k], cfg)
        if values is not None:
            points[i], sdf[i], status[i] = values[L.POINTS], values[L.SDF], DONE
    return {"row": np.arange(start, stop), L.SHAPE_ID: np.array(ids[start:stop], dtype=object),
            L.CATEGORY: np.array(categories[start:stop], dtype=object), L.STATUS: status,
            L.REASON: np.array(reason, dtype=object), L.POINTS: points, L.SDF: sdf}
