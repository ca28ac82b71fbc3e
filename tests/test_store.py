import json
import multiprocessing as mp
from collections import Counter

import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore, WrapperStore

from raywsl import contract as C
from raywsl.store.rows import (CODECS, DEFAULT_CODEC, DONE, FAILED, FORMAT, MARKER_READS, META_CHUNK_ROWS,
                               META_CHUNKS_PER_OBJECT, PENDING, REASON_BYTES, ArraySpec, RowStore, StoreError,
                               meta_chunking)

X_ROW = (400, 3)  # 4.8 kB a row: sharded, one inner chunk per row, compressed (the samples default)
ARRAYS = [ArraySpec("x", X_ROW), ArraySpec("y", ())]


def make(path, n=10, shard=4, fp="fp1", **kw):
    ids = [f"s{i}" for i in range(n)]
    return RowStore.create(str(path), kind="samples", fingerprint=fp, ids=ids,
                           sources=[f"/m/{i}.ply" for i in ids], categories=["c"] * n,
                           shard_size=shard, arrays=kw.pop("arrays", ARRAYS), **kw)


def shard_data(store, k):
    rows = store.shard_rows(k)
    n = rows.stop - rows.start
    x = np.arange(rows.start, rows.stop, dtype="float32")[:, None, None] + np.zeros((n, *X_ROW), "float32")
    return {"x": x, "y": x[:, 0, 0] * 2}


def commit(store, k, status=DONE, reason=""):
    n = len(range(*store.shard_rows(k).indices(store.n_rows)))
    store.write_shard(k, shard_data(store, k), [status] * n, [reason] * n)


def test_layout_and_shards(tmp_path):
    store = make(tmp_path / "s.zarr")
    assert (store.n_rows, store.n_shards, store.shard_size) == (10, 3, 4)
    assert store.shard_rows(2) == slice(8, 10)
    assert store.pending_shards() == [0, 1, 2]
    assert store.row_meta()[C.SHAPE_ID].tolist() == [f"s{i}" for i in range(10)]
    s = store.summary()
    assert (s["rows"], s["done"], s["failed"], s["pending"]) == (10, 0, 0, 10)
    assert s["format"] == FORMAT == "raywsl-rowstore/2"
    assert s["arrays"]["x"] == {"shape": [10, *X_ROW], "dtype": "float32"}
    for name in (C.SHAPE_ID, C.SOURCE, C.CATEGORY, C.REASON):
        assert s["arrays"][name] == {"shape": [10], "dtype": "str"}


def test_write_shard_commits_with_marker(tmp_path):
    store = make(tmp_path / "s.zarr")
    # Data and status written without the marker (a worker killed before committing): still pending.
    store.group["x"][0:4] = shard_data(store, 0)["x"]
    store.group[C.STATUS][0:4] = DONE
    assert (store.status() == PENDING).all() and (store.shard_status(0) == PENDING).all()
    store.write_shard(1, shard_data(store, 1), [DONE, FAILED, DONE, DONE], ["", "bad mesh", "", ""])
    status = store.status()
    assert status[4:8].tolist() == [DONE, FAILED, DONE, DONE] and (status[:4] == PENDING).all()
    assert store.pending_shards() == [0, 2]
    assert store.shard_status(1).tolist() == [DONE, FAILED, DONE, DONE]
    back = store.read_shard(1, ["x", "y"])
    np.testing.assert_array_equal(back["x"], shard_data(store, 1)["x"])
    s = store.summary()
    assert s["failures"] == [{"row": 5, "shape_id": "s5", "source": "/m/s5.ply", "reason": "bad mesh"}]
    assert s["shards"] == {"size": 4, "total": 3, "done": 1}
    with pytest.raises(ValueError, match="shard 0 has 4 rows; got 3 status"):
        store.write_shard(0, shard_data(store, 0), [DONE] * 3, [""] * 3)


def test_pending_shards_status_and_shard_done_after_partial_commits(tmp_path):
    store = make(tmp_path / "s.zarr", n=41, shard=2)  # 21 shards, the last one of a single row
    committed = {0, 3, 4, 5, 17, 20}
    for k in sorted(committed):
        commit(store, k, FAILED if k == 4 else DONE, "broken" if k == 4 else "")
    assert store.pending_shards() == sorted(set(range(21)) - committed)
    assert store.pending_shards([20, 3, 6, 19, 6]) == [6, 19]
    assert store.pending_shards([]) == []
    assert [k for k in range(21) if store.shard_done(k)] == sorted(committed)
    expected = np.zeros(41, "int8")
    for k in committed:
        expected[2 * k:2 * k + 2] = FAILED if k == 4 else DONE
    np.testing.assert_array_equal(store.status(), expected)  # all shards: one listing of the markers
    assert MARKER_READS < 21
    for rows in (range(5, 12), slice(7, 8), range(39, 41), range(0, 41), slice(None), range(30, 30)):
        np.testing.assert_array_equal(store.status(rows), expected[rows if isinstance(rows, slice)
                                                                     else slice(rows.start, rows.stop)])
    for k in range(21):
        np.testing.assert_array_equal(store.shard_status(k), expected[store.shard_rows(k)])
    s = store.rows_summary(range(6, 14))  # shards 3 (done), 4 (failed), 5 (done), 6 (pending)
    assert (s["rows"], s["done"], s["failed"], s["pending"]) == (8, 4, 2, 2)
    assert [f["row"] for f in s["failures"]] == [8, 9] and s["failures"][0]["reason"] == "broken"
    with pytest.raises(IndexError, match="shard 21 out of range"):
        store.pending_shards([21])
    with pytest.raises(IndexError, match="shard -1 out of range"):
        store.shard_done(-1)


def test_rows_summary_counts_a_range(tmp_path):
    store = make(tmp_path / "s.zarr")
    store.write_shard(1, shard_data(store, 1), [DONE, FAILED, DONE, DONE], ["", "bad mesh", "", ""])
    s = store.rows_summary(range(3, 7))
    assert (s["rows"], s["done"], s["failed"], s["pending"]) == (4, 2, 1, 1)
    assert s["failures"] == [{"row": 5, "shape_id": "s5", "source": "/m/s5.ply", "reason": "bad mesh"}]
    assert store.rows_summary(range(8, 10))["pending"] == 2


class CountingStore(WrapperStore):
    """Records every storage operation: (method, key)."""

    def __init__(self, store):
        super().__init__(store)
        self.calls = []

    def _with_store(self, store):  # zarr re-wraps a store to open it read-only: keep counting here
        return self

    async def get(self, key, prototype, byte_range=None):
        self.calls.append(("get", key))
        return await self._store.get(key, prototype, byte_range)

    async def exists(self, key):
        self.calls.append(("exists", key))
        return await self._store.exists(key)

    async def set(self, key, value):
        self.calls.append(("set", key))
        return await self._store.set(key, value)

    async def delete(self, key):
        self.calls.append(("delete", key))
        return await self._store.delete(key)

    async def list_dir(self, prefix):
        self.calls.append(("list_dir", prefix))
        async for key in self._store.list_dir(prefix):
            yield key

    async def list_prefix(self, prefix):
        self.calls.append(("list_prefix", prefix))
        async for key in self._store.list_prefix(prefix):
            yield key

    def count(self, f):
        """{method: calls} of running f()."""
        self.calls.clear()
        f()
        return dict(Counter(method for method, _ in self.calls))


def test_store_operations_per_shard_do_not_grow_with_the_store(tmp_path):
    """Every per-shard operation costs the same storage operations on a store of 300 shards and on one
    of 3000 (the same 8 shards committed): reading all markers or all status chunks per shard would
    make the stages quadratic."""
    from raywsl.store.datasource import _read_range

    counts = {}
    for n_shards in (300, 3000):
        path = str(tmp_path / f"s{n_shards}.zarr")
        make(path, n=2 * n_shards, shard=2)
        counting = CountingStore(LocalStore(path))
        store = RowStore(zarr.open_group(counting, mode="r+", zarr_format=3), path)
        for k in range(0, 16, 2):
            commit(store, k, FAILED if k == 4 else DONE, "broken")
        for name in ("x", "y", C.STATUS, C.REASON, C.SHARD_DONE, C.SHAPE_ID, C.SOURCE, C.CATEGORY):
            store.array(name)  # each array's metadata, read once per RowStore
        k = 4  # a committed shard, with failures
        ops = {
            "open": lambda: RowStore.open(counting),
            "shard_done": lambda: store.shard_done(k),
            "shard_done (pending)": lambda: store.shard_done(k + 1),
            "shard_status": lambda: store.shard_status(k),
            "status(shard rows)": lambda: store.status(store.shard_rows(k)),
            "read_shard": lambda: store.read_shard(k, ["x", "y", C.REASON]),
            "row_meta": lambda: store.row_meta(store.shard_rows(k)),
            "rows_summary": lambda: store.rows_summary(range(2 * k, 2 * k + 2)),
            "write_shard": lambda: commit(store, k + 1),
            "pending_shards": lambda: store.pending_shards(),
            "read task": lambda: list(_read_range(counting, ["x", "y"], 2 * k, 2 * k + 2)),
            "summary, 1 failed shard": lambda: store.summary(),
        }
        counts[n_shards] = {name: counting.count(op) for name, op in ops.items()}
        summary_keys = {key.split("/")[0] for method, key in counting.calls
                        if method == "get" and not key.endswith("zarr.json")}
        assert summary_keys == {C.STATUS, C.SHAPE_ID, C.SOURCE, C.REASON}  # failures only: no data read
    small, big = counts[300], counts[3000]
    assert small == big
    assert small["open"] == {"get": 1}  # the group's zarr.json
    assert small["shard_done"] == small["shard_done (pending)"] == {"exists": 1}
    assert small["shard_status"] == small["status(shard rows)"] == {"exists": 1, "get": 1}
    assert small["pending_shards"] == {"list_dir": 1}
    assert small["read_shard"] == {"get": 3}
    assert small["row_meta"] == {"get": 6}  # per array: the object's index, then one inner chunk
    assert small["write_shard"]["set"] == 4  # x, y, status, the marker (an empty reason chunk is deleted)
    # A read task opens the store and each array it reads (8 metadata objects), then reads the range.
    assert small["read task"] == {"exists": 1, "get": 8 + 8}
    # summary lists the group's arrays (zarr reads their 8 zarr.json) and the markers, reads the status
    # chunks of the committed shards only (9 after write_shard), and the shape ids, sources and
    # reasons of the failed rows (index + inner chunk, index + inner chunk, one chunk).
    assert small["summary, 1 failed shard"] == {"list_dir": 2, "get": 8 + 9 + 2 + 2 + 1}


def test_strings_round_trip_and_long_reasons_are_cut(tmp_path):
    ids = ["stuhl-ü", "椅子-7", "chair 🪑", "plain"]
    sources = [f"s3://bucket/meshes/{i}.obj" for i in ids]
    store = RowStore.create(str(tmp_path / "s.zarr"), kind="samples", fingerprint="f", ids=ids, sources=sources,
                            categories=["Sessel", "椅子", "🪑", ""], shard_size=4, arrays=[ArraySpec("y", ())])
    meta = store.row_meta()
    assert meta[C.SHAPE_ID].tolist() == ids and meta[C.SOURCE].tolist() == sources
    assert meta[C.CATEGORY].tolist() == ["Sessel", "椅子", "🪑", ""]
    assert all(type(v) is str for v in meta[C.SHAPE_ID])
    exact = "é" * (REASON_BYTES // 2)  # exactly REASON_BYTES bytes: kept whole
    long = "x" + "椅" * 400  # 1201 bytes, 3 per character: the cut falls inside a character
    store.write_shard(0, {"y": np.zeros(4, "float32")}, [FAILED] * 4, [exact, long, "ok ✓", ""])
    reason = store.read_shard(0, [C.REASON])[C.REASON].tolist()
    assert reason[0] == exact and reason[2:] == ["ok ✓", ""]
    cut = reason[1]
    assert cut.endswith("...") and long.startswith(cut[:-3]) and len(cut.encode()) <= REASON_BYTES
    assert len(cut.encode()) > REASON_BYTES - 6  # no more than the partial character and "..." lost
    # Stored as a core v3 data type: uint8 bytes, the width in the array's attributes.
    meta_json = json.loads((tmp_path / "s.zarr" / C.REASON / "zarr.json").read_text())
    assert meta_json["data_type"] == "uint8" and meta_json["shape"] == [4, REASON_BYTES]
    assert meta_json["attributes"]["text"] == {"encoding": "utf-8", "width": REASON_BYTES}
    assert json.loads((tmp_path / "s.zarr" / C.SHAPE_ID / "zarr.json").read_text())["data_type"] == "uint8"


def test_reasons_given_at_creation_wait_for_the_worker(tmp_path):
    reasons = ["", "", "invalid shape id 'a/b'", "", "", ""]
    store = make(tmp_path / "s.zarr", n=6, shard=2, reasons=reasons)
    assert store.read_shard(1, [C.REASON])[C.REASON].tolist() == ["invalid shape id 'a/b'", ""]
    assert (store.status() == PENDING).all() and store.summary()["failures"] == []
    assert not (tmp_path / "s.zarr" / C.REASON / "c" / "0").exists()  # only the shard with a reason is written
    commit(store, 1, FAILED, "invalid shape id 'a/b'")
    assert [f["row"] for f in store.summary()["failures"]] == [2, 3]
    with pytest.raises(StoreError, match="2 reasons for 6 shape ids"):
        make(tmp_path / "t.zarr", n=6, shard=2, reasons=["", ""])


def test_duplicate_ids_are_named(tmp_path):
    ids = [f"s{i}" for i in range(20)] + ["s3", "s1", "s3", "s7", "s9", "s11", "s12"]
    with pytest.raises(StoreError, match=r"6 repeat, e.g. \['s1', 's3', 's7', 's9', 's11'\]"):
        RowStore.create(str(tmp_path / "s.zarr"), kind="samples", fingerprint="f", ids=ids, sources=ids,
                        categories=ids, shard_size=4, arrays=ARRAYS)


def test_default_codecs_are_in_the_array_metadata(tmp_path):
    make(tmp_path / "s.zarr", arrays=[ArraySpec("big", (300, 3)), ArraySpec("y", ()),
                                      ArraySpec("z", (50,), codec="zstd-3")])
    w = RowStore.create(str(tmp_path / "w.zarr"), kind="weights", fingerprint="f", ids=["a"], sources=["a"],
                        categories=["a"], shard_size=1, arrays=[ArraySpec("weights", (300,))])

    def essentials(codec: dict) -> dict:  # what names the compression (typesize comes from the dtype)
        config = codec.get("configuration", {})
        return {"name": codec["name"], **{k: config[k] for k in ("cname", "clevel", "shuffle", "level") if k in config}}

    def stored(path):
        codecs = json.loads((path / "zarr.json").read_text())["codecs"]
        if codecs[0]["name"] == "sharding_indexed":  # compressors of the inner chunks
            codecs = codecs[0]["configuration"]["codecs"]
        return [essentials(c) for c in codecs if c["name"] != "bytes"]

    def preset(name):
        return [essentials(c.to_dict()) for c in CODECS[name]]

    s = tmp_path / "s.zarr"
    assert stored(s / "big") == preset(DEFAULT_CODEC["samples"])
    assert stored(s / "y") == stored(s / C.STATUS) == preset(DEFAULT_CODEC["small"])
    assert stored(s / "z") == [{"name": "zstd", "level": 3}]
    for name in (C.SHAPE_ID, C.REASON):
        assert stored(s / name) == preset(DEFAULT_CODEC["text"])
    assert stored(tmp_path / "w.zarr" / "weights") == preset(DEFAULT_CODEC["weights"])
    # The picks of benchmarks/store/bench_codecs.py: change them with a new measurement.
    assert DEFAULT_CODEC == {"samples": "blosc-lz4-bitshuffle", "weights": "blosc-zstd-bitshuffle",
                             "small": "none", "text": "zstd-1"}
    assert stored(s / "big")[0] == {"name": "blosc", "cname": "lz4", "clevel": 5, "shuffle": "bitshuffle"}
    assert w.summary()["arrays"]["weights"] == {"shape": [1, 300], "dtype": "float32"}
    with pytest.raises(StoreError, match="unknown codec 'lzma'"):
        make(tmp_path / "bad.zarr", arrays=[ArraySpec("x", (3,), codec="lzma")])


def test_metadata_of_many_shards_is_few_objects(tmp_path):
    """The driver writes shape ids, sources and categories in objects of many store shards."""
    chunk, per_object = meta_chunking(10**6, 8)
    assert (chunk, per_object) == (256, 65536)  # a 10^6-row store: 16 objects per metadata array
    n = 2 * META_CHUNK_ROWS * META_CHUNKS_PER_OBJECT + 5  # shards of one row: 3 objects, not 131077
    store = make(tmp_path / "s.zarr", n=n, shard=1, arrays=[ArraySpec("y", ())])
    for name in (C.SHAPE_ID, C.SOURCE, C.CATEGORY):
        assert len([p for p in (tmp_path / "s.zarr" / name).rglob("*") if p.is_file()]) == 3 + 1  # + zarr.json
    assert not list((tmp_path / "s.zarr" / C.STATUS).rglob("c/*"))  # nothing written for pending rows
    assert store.read(C.SHAPE_ID, [0, 70000, n - 1]).tolist() == ["s0", "s70000", f"s{n - 1}"]
    assert store.row_meta(store.shard_rows(n - 1))[C.SOURCE].tolist() == [f"/m/s{n - 1}.ply"]


def test_interrupted_creation_is_not_a_store(tmp_path):
    path = tmp_path / "s.zarr"
    store = make(path)
    del store.group.attrs["fingerprint"]  # as if killed before creation finished
    with pytest.raises(StoreError, match="not a complete"):
        RowStore.open(str(path))


def test_old_format_is_refused_with_the_way_out(tmp_path):
    art = tmp_path / "art"
    path = art / "samples.zarr"
    make(path)
    zarr.open_group(str(path), mode="r+").attrs[C.Attr.FORMAT] = "raywsl-rowstore/1"
    with pytest.raises(StoreError, match=r"format 'raywsl-rowstore/1'.*rerun with --restart"):
        RowStore.open(str(path))
    (art / C.ARTIFACT_INFO).write_text("{}")  # published: refused, never rebuilt over
    with pytest.raises(StoreError, match=r"cannot be opened: .*raywsl-rowstore/1.*rerun with --restart"):
        RowStore.open_published(str(path), "samples", str(art))


def _write_shard_in_process(path, k):
    store = RowStore.open(path, mode="r+")
    commit(store, k)


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
