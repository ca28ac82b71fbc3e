"""RowStoreDatasource: every row comes back as written, one block per row range, never split."""

import re

import numpy as np
import pytest

from raywsl import contract as C
from raywsl.store.datasource import RowStoreDatasource, read_rows
from raywsl.store.rows import DONE, FAILED, PENDING, REASON_BYTES, ArraySpec, RowStore, StoreError

pytestmark = [pytest.mark.ray, pytest.mark.timeout(60)]

N, SHARD, M = 10, 4, 16  # shards [0,4) [4,8) [8,10): the last one is short
NAMES = [C.POINTS, C.SDF, C.SCALE]
LONG_REASON = "bad mesh ✗ " * 100  # 1,200 bytes: stored cut to REASON_BYTES, ending in "..."


def expected(n=N):
    rng = np.random.default_rng(0)
    return {C.POINTS: rng.normal(size=(n, M, 3)).astype("float32"),
            C.SDF: rng.normal(size=(n, M)).astype("float32"),
            C.SCALE: rng.uniform(0.5, 2, size=n).astype("float32")}


@pytest.fixture
def store_path(tmp_path):
    """Shards 0 and 2 committed (row 1 failed); shard 1 written but without its marker."""
    path = str(tmp_path / "samples.zarr")
    ids = [f"s{i}" for i in range(N)]
    store = RowStore.create(path, kind="samples", ids=ids, sources=[f"/m/{i}.ply" for i in ids],
                            categories=["chair" if i % 2 else "tàble 桌" for i in range(N)],
                            shard_size=SHARD, fingerprint="fp",
                            arrays=[ArraySpec(C.POINTS, (M, 3)), ArraySpec(C.SDF, (M,)),
                                    ArraySpec(C.SCALE, ())])
    data = expected()
    for k in (0, 1, 2):
        rows = store.shard_rows(k)
        status = [FAILED if i == 1 else DONE for i in range(rows.start, rows.stop)]
        reason = [LONG_REASON if i == 1 else "" for i in range(rows.start, rows.stop)]
        store.write_shard(k, {name: v[rows] for name, v in data.items()}, status, reason)
    store.group[C.SHARD_DONE][1] = 0  # deletes the marker: shard 1's data and status written, never committed
    assert store.pending_shards() == [1]
    return path


def blocks(ds):
    """One numpy batch per block (batch_size=None never merges or splits blocks), by first row."""
    return sorted(ds.iter_batches(batch_size=None, batch_format="numpy"), key=lambda b: b["row"][0])


def test_reads_every_row_as_written(ray_local, store_path):
    ds = read_rows(store_path, NAMES)
    got = blocks(ds)
    assert [b["row"].tolist() for b in got] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # one per shard
    cols = {k: np.concatenate([b[k] for b in got]) for k in got[0]}
    assert set(cols) == {"row", C.SHAPE_ID, C.CATEGORY, C.STATUS, C.REASON, *NAMES}
    data = expected()
    for name in NAMES:
        assert cols[name].shape == data[name].shape and cols[name].dtype == np.float32
        np.testing.assert_array_equal(cols[name], data[name])
    assert cols[C.POINTS].shape[1:] == (M, 3)
    assert cols[C.SHAPE_ID].tolist() == [f"s{i}" for i in range(N)]
    assert cols[C.CATEGORY].tolist()[:2] == ["tàble 桌", "chair"]
    for name in (C.SHAPE_ID, C.CATEGORY, C.REASON):  # python str objects (arrow strings), not bytes
        assert all(type(v) is str for v in cols[name])
    assert cols["row"].dtype == np.int64 and cols[C.STATUS].dtype == np.int8
    # Shard 1 has no marker: pending whatever was written there (and no stale reason).
    assert cols[C.STATUS].tolist() == [DONE, FAILED, DONE, DONE] + [PENDING] * 4 + [DONE, DONE]
    reason = cols[C.REASON].tolist()
    assert reason[0] == "" and reason[2:] == [""] * 8
    assert reason[1].endswith("...") and LONG_REASON.startswith(reason[1][:-3])
    assert REASON_BYTES - 6 < len(reason[1].encode()) <= REASON_BYTES


def test_custom_ranges_are_one_block_each(ray_local, store_path):
    ranges = [(2, 6), (6, 10), (0, 1)]  # the first two span two shards each
    ds = read_rows(store_path, [C.SDF], row_ranges=ranges)
    assert ds.materialize().num_blocks() == 3
    got = blocks(ds)
    assert [b["row"].tolist() for b in got] == [[0], [2, 3, 4, 5], [6, 7, 8, 9]]
    data = expected()
    for b in got:
        np.testing.assert_array_equal(b[C.SDF], data[C.SDF][b["row"]])
        assert C.POINTS not in b


def test_big_range_is_not_split(ray_local, store_path):
    import ray.data

    ctx = ray.data.DataContext.get_current()
    old = ctx.target_max_block_size
    ctx.target_max_block_size = 256  # a 4-row block of points + sdf is ~1 KB, 4x this
    try:
        # Control: a plain read_datasource with this target does slice each range's block.
        plain = ray.data.read_datasource(RowStoreDatasource(store_path, NAMES), override_num_blocks=3)
        assert plain.materialize().num_blocks() > 3
        ds = read_rows(store_path, NAMES, row_ranges=[(0, 10)])
        mat = ds.materialize()
        assert mat.num_blocks() == 1
        assert [b["row"].tolist() for b in blocks(mat)] == [list(range(N))]
        # What the fit stage does next: a map over the blocks still sees whole ranges.
        sizes = ds.map_batches(lambda b: {"n": np.array([len(b["row"])])}, batch_size=None)
        assert sizes.take_all() == [{"n": N}]
    finally:
        ctx.target_max_block_size = old


def test_plans_with_sizes(ray_local, store_path):
    source = RowStoreDatasource(store_path, NAMES)
    tasks = source.get_read_tasks(parallelism=1)
    assert [t.metadata.num_rows for t in tasks] == [4, 4, 2]
    assert sum(t.metadata.size_bytes for t in tasks) == source.estimate_inmemory_data_size()
    assert source.estimate_inmemory_data_size() >= N * (M * 3 + M + 1) * 4


@pytest.mark.parametrize("ranges", [[(0, 11)], [(-1, 2)], [(3, 3)], [(5, 4)], []])
def test_bad_ranges_are_refused(store_path, ranges):
    with pytest.raises(ValueError, match=rf"{re.escape(store_path)}.*(bad row range|no row ranges)"):
        read_rows(store_path, NAMES, row_ranges=ranges)


def test_bad_names_and_missing_store(store_path, tmp_path):
    with pytest.raises(ValueError, match=rf"{re.escape(store_path)}.*'weights'"):
        RowStoreDatasource(store_path, [C.POINTS, "weights"])
    with pytest.raises(ValueError, match="always read"):
        RowStoreDatasource(store_path, [C.STATUS])
    with pytest.raises(StoreError, match="no store here"):
        read_rows(str(tmp_path / "nowhere.zarr"), NAMES)


def test_a_read_task_reads_text_arrays_as_python_strings(store_path):
    """Any string array can be asked for by name (here the sources); no Ray needed to run a task."""
    from ray.data.block import BlockAccessor

    from raywsl.store.datasource import _read_range

    [block] = list(_read_range(store_path, [C.SOURCE], 2, 6))  # spans committed shard 0 and pending shard 1
    batch = BlockAccessor.for_block(block).to_batch_format("numpy")
    assert batch[C.SOURCE].tolist() == [f"/m/s{i}.ply" for i in range(2, 6)]
    assert all(type(v) is str for v in batch[C.SOURCE])
    assert batch[C.STATUS].tolist() == [DONE, DONE, PENDING, PENDING]
