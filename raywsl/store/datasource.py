"""Read a RowStore into Ray Data, one block per row range.

`ray.data.read_zarr` only knows zarr 2, so this small Datasource reads our zarr-3 row stores.
It is how fit (and anything else that works shard by shard) gets its input:

    ds = read_rows(run.samples, [C.POINTS, C.SDF], row_ranges=None)  # one range per store shard

Contract: one ReadTask per [start, stop) range, and each task yields exactly ONE block holding
every row of its range, in order. Consumers rely on it: the fit actor writes whole shards, so a
shard's rows must never arrive split across blocks. Columns: `row` (int64 global index),
`shape_id`, `category`, `status` (int8; PENDING for shards without their commit marker), `reason`
(strings: python str, arrow strings), then one column per requested array (per-row arrays of any
shape, as tensor columns). A read task reads only the objects of its range's shards (RowStore.status,
RowStore.read), so planning and reading cost the same per shard whatever the size of the store
(benchmarks/store/bench_bookkeeping.py).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import ray.data
from ray.data.block import Block, BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from raywsl import contract as C
from raywsl.store.rows import PENDING, TEXT_ATTR, RowStore

# Always in a block; the rest of the store's arrays can be asked for by name.
META_COLUMNS = ("row", C.SHAPE_ID, C.CATEGORY, C.STATUS, C.REASON)
_STRING_BYTES_PER_ROW = 64  # a guess for shape_id + category + reason, for size estimates only


class RowStoreDatasource(Datasource):
    def __init__(self, path: str, names: Sequence[str],
                 row_ranges: Sequence[tuple[int, int]] | None = None):
        super().__init__()
        store = RowStore.open(path)  # StoreError if there is no complete store at `path`
        self.path, self.names = path, list(names)
        arrays = {name: arr for name, arr in store.group.arrays() if name != C.SHARD_DONE}
        for name in self.names:
            if name in META_COLUMNS:
                raise ValueError(f"{path}: {name!r} is always read; do not ask for it in names")
            if name not in arrays:
                raise ValueError(f"{path}: no per-row array {name!r} in this store "
                                 f"(it has {sorted(set(arrays) - set(META_COLUMNS))})")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"{path}: names repeat an array: {self.names}")
        if row_ranges is None:
            row_ranges = [(s.start, s.stop) for s in map(store.shard_rows, range(store.n_shards))]
        self.row_ranges = [(int(a), int(b)) for a, b in row_ranges]
        if not self.row_ranges:
            raise ValueError(f"{path}: no row ranges to read")
        for a, b in self.row_ranges:
            if not 0 <= a < b <= store.n_rows:
                raise ValueError(f"{path}: bad row range [{a}, {b}): need 0 <= start < stop <= "
                                 f"{store.n_rows} (the store's row count)")
        # Bytes per row in memory, for Ray's planning: row + status, strings (a guess), arrays.
        self._row_bytes = 9 + _STRING_BYTES_PER_ROW + sum(_row_nbytes(arrays[n]) for n in self.names)

    def estimate_inmemory_data_size(self) -> int:
        return sum(b - a for a, b in self.row_ranges) * self._row_bytes

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        # `parallelism` is ignored on purpose: the ranges are the unit of work (read_rows asks for
        # exactly that many blocks, so Ray adds no SplitBlocks step of its own).
        path, names = self.path, self.names  # the closures capture these, not self
        return [ReadTask(lambda a=a, b=b: _read_range(path, names, a, b),
                         BlockMetadata(num_rows=b - a, size_bytes=(b - a) * self._row_bytes,
                                       input_files=None, exec_stats=None),
                         per_task_row_limit=per_task_row_limit)
                for a, b in self.row_ranges]


def _row_nbytes(arr) -> int:
    if TEXT_ATTR in arr.attrs:  # strings: python objects in the block, no fixed size
        return _STRING_BYTES_PER_ROW
    return arr.dtype.itemsize * int(np.prod(arr.shape[1:]))


def _read_range(path: str, names: list[str], start: int, stop: int) -> Iterator[Block]:
    """Runs in the read task: open the store there and yield rows [start, stop) as one block. Reads
    only the objects of the shards overlapping the range (their markers, status, strings, arrays) and
    the metadata of the arrays it reads: the same few objects whatever the size of the store."""
    store = RowStore.open(path)
    rows = range(start, stop)
    status = store.status(rows)  # RowStore's rule: a shard without its marker is pending
    reason = _objects(store.read(C.REASON, rows))
    reason[status == PENDING] = ""  # nothing of an uncommitted shard is meaningful
    batch = {"row": np.arange(start, stop, dtype="int64"), C.SHAPE_ID: _objects(store.read(C.SHAPE_ID, rows)),
             C.CATEGORY: _objects(store.read(C.CATEGORY, rows)), C.STATUS: status, C.REASON: reason}
    for name in names:
        values = store.read(name, rows)
        batch[name] = _objects(values) if store.is_text(name) else values
    yield BlockAccessor.batch_to_block(batch)  # ndim > 1 arrays become tensor columns


def _objects(strings: np.ndarray) -> np.ndarray:
    # RowStore decodes strings to numpy StringDType, which pyarrow cannot take (nor cast to '<U'):
    # object arrays of python str become arrow strings.
    return strings.astype(object)


def read_rows(path: str, names: Sequence[str], row_ranges: Sequence[tuple[int, int]] | None = None,
              **read_kwargs) -> ray.data.Dataset:
    """ray.data.read_datasource(RowStoreDatasource(...)) with override_num_blocks = number of
    ranges, so each range is exactly one block. `read_kwargs` go to read_datasource
    (ray_remote_args, concurrency, ...).

    What Ray 2.60 does with a read task's output (ray/data/_internal/planner/plan_read_op.py,
    _internal/output_buffer.py, _internal/logical/rules/set_read_parallelism.py):
    - every block the read_fn yields goes through a BlockOutputBuffer built from
      `DataContext.target_max_block_size` (default 128 MiB): a block of at least 1.5x that size
      is sliced into target-sized pieces. There is no per-read switch; the plan's DataContext
      decides, and `target_max_block_size=None` ("infinite") disables the slicing. So the
      returned Dataset's own context (a copy, not the global one) gets None. Operators chained
      on this Dataset inherit it: they do not re-slice by size either (call .repartition() to
      get smaller blocks). Only a downstream operator carrying its own block-size override
      would bring slicing back: Ray propagates such overrides upstream to the read.
    - if a read gives fewer tasks than the requested parallelism, Ray adds a SplitBlocks(k)
      step; override_num_blocks = number of ranges = number of tasks keeps k at 1.
    """
    source = RowStoreDatasource(path, names, row_ranges)
    ds = ray.data.read_datasource(source, override_num_blocks=len(source.row_ranges), **read_kwargs)
    ds.context.target_max_block_size = None
    return ds


# ------------------------------------------------------------------------------------ in Ray Train workers

def cache_shard(shard, columns: Sequence[str], limit: int) -> dict[str, np.ndarray] | None:
    """A Ray Train worker's whole dataset shard ({column: array}, rows in the store's order), read once,
    if its `columns` fit in `limit` bytes; else None (then stream it with `stream_shard`). Training
    steps then sample from memory instead of paying a Ray Data epoch per step on small sets. Blocks
    arrive in whatever order Ray Data's workers finish them: sorting by row makes "row k of the cache"
    the same on every run, so a seeded step draws the same rows after a resume."""
    names = list(dict.fromkeys(["row", *columns]))
    parts: dict[str, list[np.ndarray]] = {c: [] for c in names}
    size = 0
    for batch in shard.iter_batches(batch_size=256, batch_format="numpy"):
        size += sum(batch[c].nbytes for c in columns)
        if size > limit:
            return None
        for c in names:
            parts[c].append(batch[c])
    if not parts["row"]:
        raise RuntimeError("a Ray Train worker got no rows: use fewer workers than rows")
    order = np.argsort(np.concatenate(parts["row"]), kind="stable")
    return {c: np.concatenate(parts[c])[order] for c in columns}


def stream_shard(shard, columns: Sequence[str], rows: int) -> Iterator[dict[str, np.ndarray]]:
    """Batches of `rows` rows ({column: array}) of a worker's shard, epoch after epoch, forever."""
    while True:
        for batch in shard.iter_batches(batch_size=rows, batch_format="numpy"):
            yield {c: batch[c] for c in columns}

