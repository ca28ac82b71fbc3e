import multiprocessing as mp

import numpy as np
import pytest

from raywsl import contract as C
from raywsl.store.rows import DONE, FAILED, PENDING, ArraySpec, RowStore, StoreError

ARRAYS = [ArraySpec("x", (50, 3)), ArraySpec("y", ())]


def make(path, n=10, shard=4, fp="fp1", **kw):
    ids = [f"s{i}" for i in range(n)]
    return RowStore.create(str(path), kind="samples", fingerprint=fp, ids=ids,
                           sources=[f"/m/{i}.ply" for i in ids], categories=["c"] * n,
                           shard_size=shard, arrays=ARRAYS, **kw)


def shard_data(store, k):
    rows = store.shard_rows(k)
    n = rows.stop - rows.start
    x = np.arange(rows.start, rows.stop, dtype="float32")[:, None, None] + np.zeros((n, 50, 3), "float32")
    return {"x": x, "y": x[:, 0, 0] * 2}


def test_layout_and_shards(tmp_path):
    store = make(tmp_path / "s.zarr")
    assert (store.n_rows, store.n_shards, store.shard_size) == (10, 3, 4)
    assert store.shard_rows(2) == slice(8, 10)
    assert store.pending_shards() == [0, 1, 2]
    assert store.row_meta()[C.SHAPE_ID].tolist() == [f"s{i}" for i in range(10)]
    s = store.summary()
    assert (s["rows"], s["done"], s["failed"], s["pending"]) == (10, 0, 0, 10)
    assert s["arrays"]["x"] == {"shape": [10, 50, 3], "dtype": "float32"}
    assert s["arrays"][C.SHAPE_ID] == {"shape": [10], "dtype": "str"}


def test_write_shard_commits_with_marker(tmp_path):
    store = make(tmp_path / "s.zarr")
    # Data and status written without the marker (a worker killed before committing): still pending.
    store.group["x"][0:4] = shard_data(store, 0)["x"]
    store.group[C.STATUS][0:4] = DONE
    assert (store.status() == PENDING).all()
    store.write_shard(1, shard_data(store, 1), [DONE, FAILED, DONE, DONE], ["", "bad mesh", "", ""])
    status = store.status()
    assert status[4:8].tolist() == [DONE, FAILED, DONE, DONE] and (status[:4] == PENDING).all()
    assert store.pending_shards() == [0, 2]
    back = store.read_shard(1, ["x", "y"])
    np.testing.assert_array_equal(back["x"], shard_data(store, 1)["x"])
    s = store.summary()
    assert s["failures"] == [{"row": 5, "shape_id": "s5", "source": "/m/s5.ply", "reason": "bad mesh"}]


def test_rows_summary_counts_a_range(tmp_path):
    store = make(tmp_path / "s.zarr")
    store.write_shard(1, shard_data(store, 1), [DONE, FAILED, DONE, DONE], ["", "bad mesh", "", ""])
    s = store.rows_summary(range(3, 7))
    assert (s["rows"], s["done"], s["failed"], s["pending"]) == (4, 2, 1, 1)
    assert s["failures"] == [{"row": 5, "shape_id": "s5", "source": "/m/s5.ply", "reason": "bad mesh"}]
    assert store.rows_summary(range(8, 10))["pending"] == 2


def test_interrupted_creation_is_not_a_store(tmp_path):
    path = tmp_path / "s.zarr"
    store = make(path)
    del store.group.attrs["fingerprint"]  # as if killed before creation finished
    with pytest.raises(StoreError, match="not a complete"):
        RowStore.open(str(path))


def _write_shard_in_process(path, k):
    store = RowStore.open(path, mode="r+")
    rows = store.shard_rows(k)
    store.write_shard(k, shard_data(store, k), [DONE] * (rows.stop - rows.start), [""] * (rows.stop - rows.start))


def test_parallel_writers_of_neighbouring_shards_lose_nothing(tmp_path):
    path = str(tmp_path / "s.zarr")
    store = make(path, n=64, shard=2)
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        pool.starmap(_write_shard_in_process, [(path, k) for k in range(store.n_shards)])
    store = RowStore.open(path)
    assert store.pending_shards() == []
    x = store.group["x"][:]
    np.testing.assert_array_equal(x[:, 0, 0], np.arange(64, dtype="float32"))
    np.testing.assert_array_equal(store.group["y"][:], np.arange(64, dtype="float32") * 2)


def test_open_errors(tmp_path):
    with pytest.raises(StoreError, match="no store here"):
        RowStore.open(str(tmp_path / "nothing.zarr"))
    make(tmp_path / "s.zarr")
    with pytest.raises(StoreError, match="a samples store, expected weights"):
        RowStore.open(str(tmp_path / "s.zarr"), kind="weights")
