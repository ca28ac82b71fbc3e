"""Where fitting gets its SDF samples (`fit.samples`): the sample store, or ingest's sampler on the fly.

    store   the sample store of the plan (samples.zarr), written by `raywsl ingest`, read by the
            RowStore Datasource
    stream  the meshes of `data.source` sampled inside the fit job (Ray Data tasks on CPUs feeding
            the fitting actors), never stored: a million-shape run need not keep terabytes of
            samples. The samples are the ones ingest would store (same sampler, same per-shape seeds).

Both give the fit job the same things: the shapes (ids, sources, categories) in the stores' row
order with the number held out (store/split.py), a Ray Dataset with exactly one block per weight
shard (columns `row`, `shape_id`, `category`, `status`, `reason`, `points`, `sdf`, as
`store.datasource`), one shape's samples in a Ray task (`shape_samples`: the warm-start anchor, crash
probes), and the ground truth of a few shapes for the reconstructions.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from raywsl import contract as C
from raywsl.config import Config
from raywsl.geometry.sampling import sample_mesh
from raywsl.runtime import ray_remote_args
from raywsl.store.rows import DONE, FAILED, PENDING, RowStore, StoreError
from raywsl.store.split import held_out_count, shards_of, store_order, training_range

TRUTH = (C.POINTS, C.SDF, C.SURFACE, C.CENTER, C.SCALE)  # what the reconstructions compare against
SAMPLE_RETRIES = 2  # retries of a sampling task whose worker died


class StoreInput:
    def __init__(self, cfg: Config, plan: C.Plan):
        self.cfg = cfg
        path = plan.samples
        try:
            self.samples = RowStore.open(path, kind="samples")
        except StoreError as e:
            raise StoreError(f"{e}: the samples of this config are not ingested; run `raywsl ingest` with "
                             f"this config first (or set fit.samples=stream)") from e
        self.held_out = int(self.samples.attrs[C.Attr.HELD_OUT])
        shards = shards_of(self.samples, training_range(self.samples, cfg.data.shapes), cfg.fit.shard_size)
        status = self.samples.status()
        unsampled = sum(int((status[k * cfg.fit.shard_size:(k + 1) * cfg.fit.shard_size] == PENDING).sum())
                        for k in shards)
        if unsampled:  # fitting them now would commit them as failed rows that no rerun would refit
            raise StoreError(f"{path}: {unsampled} of the shapes in the weight shards this run fits are not "
                             f"ingested yet: run `raywsl ingest` with this config to finish them, then fit")
        meta = self.samples.row_meta()
        self.ids = [str(i) for i in meta[C.SHAPE_ID]]
        self.sources = [str(s) for s in meta[C.SOURCE]]
        self.categories = [str(c) for c in meta[C.CATEGORY]]
        self.where = path
        self.samples_path = path  # where `shape_samples` reads one shape

    def usable(self) -> np.ndarray:
        """Rows known to have samples (for choosing the warm-start anchor)."""
        return self.samples.status() == DONE


    def dataset(self, ranges: list[tuple[int, int]]):
        from raywsl.store.datasource import read_rows

        return read_rows(self.samples.path, [C.POINTS, C.SDF], row_ranges=ranges)

    def truth(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return {name: self.samples.group[name].get_orthogonal_selection(
            (rows, *[slice(None)] * (self.samples.group[name].ndim - 1))) for name in TRUTH}


class StreamInput:
    def __init__(self, cfg: Config, plan: C.Plan):
        from raywsl.data.sources import resolve_source

        self.cfg = cfg
        refs = resolve_source(plan.source)
        refs = [refs[k] for k in store_order([r.shape_id for r in refs], cfg.seed)]
        self.ids = [r.shape_id for r in refs]
        self.sources = [r.uri for r in refs]
        self.categories = [r.category for r in refs]
        self.problems = [r.problem for r in refs]  # ids rejected up front (data/sources.py)
        self.held_out = held_out_count(self.ids, cfg.seed, cfg.ingest.test_fraction)
        self.where = plan.source
        self.samples_path = ""  # `shape_samples` samples the mesh

    def usable(self) -> np.ndarray:
        return np.ones(len(self.ids), dtype=bool)  # unknown until sampled: the anchor may still fail


    def dataset(self, ranges: list[tuple[int, int]]):
        import ray

        # Each item carries its own rows' ids and sources: the lists of all N shapes passed to every
        # task would cost O(N) per shard.
        items = [{"start": a, "ids": self.ids[a:b], "sources": self.sources[a:b],
                  "categories": self.categories[a:b], "problems": self.problems[a:b]} for a, b in ranges]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds.context.target_max_block_size = None  # one shard = one block, however big (see datasource.py)
        with ray_remote_args():
            return ds.map_batches(sample_block, batch_size=1, num_cpus=1, max_retries=SAMPLE_RETRIES,
                                  fn_kwargs={"cfg": self.cfg})

    def truth(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, list] = {name: [] for name in TRUTH}
        for k in rows:
            values, _ = _sample(self.ids[k], self.sources[k], self.cfg)
            for name in TRUTH:
                out[name].append(values[name])
        return {name: np.stack(v) for name, v in out.items()}


INPUTS: dict[str, type] = {"store": StoreInput, "stream": StreamInput}


def shape_samples(cfg: Config, samples_path: str, row: int, shape_id: str, uri: str) -> tuple[np.ndarray, np.ndarray]:
    """One shape's (points, sdf), for fitting it alone (the warm-start anchor, a crash probe), in the
    process that calls it, a Ray task (never the driver: sampling a mesh can crash or take memory):
    row `row` of the sample store at `samples_path` (fit.samples=store), or, with samples_path "",
    the mesh at `uri` sampled now (stream). StoreError if it has no samples."""
    if samples_path:
        store = RowStore.open(samples_path)
        if store.status(slice(row, row + 1))[0] != DONE:
            raise StoreError(f"{samples_path}: shape {shape_id} (row {row}) has no samples")
        arrays = store.group
        return arrays[C.POINTS][row], arrays[C.SDF][row]
    values, reason = _sample(shape_id, uri, cfg)
    if values is None:
        raise StoreError(f"shape {shape_id} cannot be sampled ({reason})")
    return values[C.POINTS], values[C.SDF]


def _sample(shape_id: str, uri: str, cfg: Config) -> tuple[dict[str, np.ndarray] | None, str]:
    os.environ.setdefault("IGL_NUM_THREADS", "1")  # one SDF thread per task, as in ingest
    return sample_mesh(shape_id, uri, cfg.ingest, cfg.seed)


def sample_block(batch: dict[str, np.ndarray], cfg: Config) -> dict[str, Any]:
    """Ray Data task: sample the meshes of one item (rows start.. of its `ids`, `sources`,
    `categories`) into one block with the columns of `store.datasource`; a mesh that fails is a row
    with status FAILED and ingest's reason."""
    start = int(batch["start"][0])
    ids, sources, categories, problems = ([str(v) for v in batch[key][0]]
                                          for key in ("ids", "sources", "categories", "problems"))
    n, m = len(ids), cfg.ingest.points
    points, sdf = np.zeros((n, m, 3), np.float32), np.zeros((n, m), np.float32)
    status, reason = np.full(n, FAILED, np.int8), [""] * n
    for i in range(n):
        if problems[i]:
            reason[i] = C.REJECTED + problems[i]
            continue
        values, reason[i] = _sample(ids[i], sources[i], cfg)
        if values is not None:
            points[i], sdf[i], status[i] = values[C.POINTS], values[C.SDF], DONE
    return {"row": np.arange(start, start + n), C.SHAPE_ID: np.array(ids, dtype=object),
            C.CATEGORY: np.array(categories, dtype=object), C.STATUS: status,
            C.REASON: np.array(reason, dtype=object), C.POINTS: points, C.SDF: sdf}
