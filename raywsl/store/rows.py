"""A Zarr group of per-shape rows, written a whole shard at a time, resumable and exactly-once.

The sample store (ingest) and the weight store (fit) are both row stores: N rows, one per shape,
cut into shards of `shard_size` consecutive rows. A shard is the unit of work and of writing:

- Every array a worker writes is chunked so that one shard of rows is one storage object (Zarr
  sharding with one row per inner chunk for the big per-row arrays, one plain chunk per shard for
  the small ones). Two workers never write to the same object, so parallel writers cannot lose each
  other's data (Zarr rewrites an object as a whole).
- A worker writes all arrays of its shard, then the shard's marker: the object `shard_done/c/<k>`.
  That object's existence is the commit: a shard without it is pending, whatever else was written,
  so a killed worker never leaves rows that look done. Rewriting a pending shard overwrites exactly
  its own objects, and the content of a shard is deterministic, so a retry gives the same bytes.
- Bookkeeping costs O(1) storage operations per shard: `shard_done(k)` tests one object,
  `pending_shards()` is one listing of the marker folder, `status(rows)` reads the markers and the
  status chunks of the shards overlapping `rows` only (pending shards need no status read).
- The driver alone creates the group and writes attributes (Zarr rewrites zarr.json on every
  attribute change). The `fingerprint` attribute is written last; the stages create a store in a
  temporary folder of the cache and rename it into place (cache.py), so a store is whole or absent.

Per-row metadata (shape id, source, category, and reasons of rows refused up front) is written by the
driver at creation; the status and reason of the other rows by the shard's worker. The driver-written
metadata uses Zarr sharding (inner chunks of META_CHUNK_ROWS rows, META_CHUNKS_PER_OBJECT of them
per storage object) so that a store of 10^6 rows is 16 objects per metadata array, not one per shard,
and is created in seconds (zarr's cost is per inner chunk: ~0.2 ms each, so one inner chunk per
store shard would take 10^6 / 8 x 3 x 0.2 ms = 75 s). Reading one shard's metadata reads the object's
index and one inner chunk: constant work, whatever the size of the store.

Strings are UTF-8 bytes in a core Zarr v3 data type: a (N, width) uint8 array, zero-padded, with
the array attribute {"text": {"encoding": "utf-8", "width": width}}. Reasons are cut to REASON_BYTES
(on a character boundary, ending in "..."). Reading decodes them to numpy string arrays (elements
are python str).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import zarr
from numpy.dtypes import StringDType
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.core.sync import sync

from raywsl import __version__
from raywsl import contract as C
from raywsl.cache import is_complete

FORMAT = "raywsl-rowstore/2"

PENDING, DONE, FAILED = 0, 1, 2
STATUS_NAMES = {PENDING: "pending", DONE: "done", FAILED: "failed"}

REASON_BYTES = 512  # a reason longer than this (UTF-8) is cut, ending in "..."
TEXT_ATTR = "text"  # array attribute marking a uint8 (N, width) array as zero-padded UTF-8 strings
META_CHUNK_ROWS = 256  # rows per inner chunk of the driver-written metadata (rounded up to whole shards)
META_CHUNKS_PER_OBJECT = 256  # inner chunks per storage object of the metadata arrays
SMALL_ROW_BYTES = 1024  # arrays with smaller rows are one plain chunk per shard (no per-row inner chunks)
MARKER_READS = 8  # status() over more shards than this lists the markers once instead of testing each

# Compression presets (the compressors of an array's chunks; inner chunks for sharded arrays).
# benchmarks/store/bench_codecs.py measures them side by side; DEFAULT_CODEC holds its picks.
CODECS: dict[str, tuple] = {
    "none": (),
    "zstd-1": (ZstdCodec(level=1),),
    "zstd-3": (ZstdCodec(level=3),),
    "blosc-zstd-shuffle": (BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),),
    "blosc-zstd-bitshuffle": (BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),),
    "blosc-lz4-shuffle": (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),),
    "blosc-lz4-bitshuffle": (BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),),
}
# Per array kind: "samples"/"weights" for the big per-row arrays of those stores, "small" for arrays
# with rows under SMALL_ROW_BYTES (status, loss, scale, ...), "text" for the string arrays. Picked by
# benchmarks/store/bench_codecs.py (the smallest among codecs that write and read >= 100 MB/s per core;
# RESULTS.md): float samples and weights have random mantissas, only their sign/exponent bytes compress
# (bitshuffle: samples 1.18x with lz4, 200k-point synthetic and real stores alike; weights 1.12x with
# zstd); zero-padded text compresses ~29x; chunks of a few bytes only grow with any codec.
DEFAULT_CODEC = {"samples": "blosc-lz4-bitshuffle", "weights": "blosc-zstd-bitshuffle", "small": "none",
                 "text": "zstd-1"}


class StoreError(RuntimeError):
    """A store is missing, of the wrong kind, or was made by a different config."""


@dataclass(frozen=True)
class ArraySpec:
    """A per-row array: `row_shape` is the shape of one row (without the leading N); `codec` one of
    CODECS (None: the default for the store's kind and the row size, DEFAULT_CODEC)."""

    name: str
    row_shape: tuple[int, ...]
    dtype: str = "float32"
    codec: str | None = None


# ------------------------------------------------------------------------------------ strings

def truncate_utf8(text: str, width: int) -> bytes:
    """`text` as UTF-8 of at most `width` bytes: longer ones are cut on a character boundary and end
    in "..."."""
    raw = text.encode("utf-8")
    if len(raw) <= width:
        return raw
    return raw[: width - 3].decode("utf-8", "ignore").encode("utf-8") + b"..."


def encode_strings(values: Sequence[str], width: int, truncate: bool = False) -> np.ndarray:
    """(n, width) uint8, each string's UTF-8 bytes zero-padded. Without `truncate` a longer string
    is an error (ids and sources must round-trip exactly)."""
    raw = [truncate_utf8(str(v), width) if truncate else str(v).encode("utf-8") for v in values]
    too_long = next((r for r in raw if len(r) > width), None)
    if too_long is not None:
        raise ValueError(f"string of {len(too_long)} bytes does not fit a {width}-byte column: {too_long[:80]!r}")
    return _pack(raw, width)


def _pack(raw: list[bytes], width: int) -> np.ndarray:
    """UTF-8 byte strings of at most `width` bytes -> (n, width) uint8, zero-padded."""
    return np.array(raw, dtype=f"S{width}").view(np.uint8).reshape(len(raw), width)


def decode_strings(raw: np.ndarray) -> np.ndarray:
    """(..., width) uint8 -> (...) numpy strings (StringDType; elements are python str)."""
    width = raw.shape[-1]
    as_bytes = np.ascontiguousarray(raw).view(f"S{width}").reshape(raw.shape[:-1])
    # A python loop decodes 10x faster than np.strings.decode, which goes through fixed-width '<U'.
    decoded = [b.decode("utf-8") for b in as_bytes.ravel().tolist()]  # 'S' drops the zero padding
    return np.array(decoded, dtype=StringDType()).reshape(as_bytes.shape)


# ------------------------------------------------------------------------------------ the store

class RowStore:
    def __init__(self, group: zarr.Group, path: str):
        self.group = group
        self.path = path
        attrs = group.attrs
        self.kind: str = attrs[C.Attr.KIND]
        self.n_rows: int = int(attrs[C.Attr.N_ROWS])
        self.shard_size: int = int(attrs[C.Attr.SHARD_SIZE])
        self.n_shards: int = -(-self.n_rows // self.shard_size)
        self._arrays: dict[str, zarr.Array] = {}  # opened once: array metadata never changes after creation

    # ---------------------------------------------------------------- creating and opening

    @classmethod
    def create(cls, path: str, *, kind: str, ids: list[str], sources: list[str], categories: list[str],
               shard_size: int, arrays: Iterable[ArraySpec], fingerprint: str,
               attrs: dict[str, Any] | None = None, reasons: list[str] | None = None) -> "RowStore":
        """A new store of len(ids) pending rows. `reasons`: per-row reasons ("" for none) of rows refused
        up front (an invalid shape id, ...): written now, their status stays pending; the shard's worker
        reads them (read_shard(k, [C.REASON])) and records those rows failed with them."""
        n = len(ids)
        if n == 0:
            raise StoreError(f"{path}: cannot create a {kind} store with no rows")
        for name, values in (("sources", sources), ("categories", categories), ("reasons", reasons)):
            if values is not None and len(values) != n:
                raise StoreError(f"{path}: {len(values)} {name} for {n} shape ids")
        repeated = [i for i, count in Counter(ids).items() if count > 1]
        if repeated:
            raise StoreError(f"{path}: shape ids must be unique; {len(repeated)} repeat, e.g. {repeated[:5]}")
        specs = list(arrays)
        unknown = [s.codec for s in specs if s.codec is not None and s.codec not in CODECS]
        if unknown:
            raise StoreError(f"{path}: unknown codec {unknown[0]!r}; choose one of {sorted(CODECS)}")
        group = zarr.open_group(path, mode="w", zarr_format=3)
        s = min(shard_size, n)
        for spec in specs:
            group.create_array(**data_array_layout(spec, n, s, kind))
        chunk, per_object = meta_chunking(n, s)
        for name, values in ((C.SHAPE_ID, ids), (C.SOURCE, sources), (C.CATEGORY, categories)):
            raw = [str(v).encode("utf-8") for v in values]
            width = max(1, max(map(len, raw)))  # the column is as wide as its longest value: nothing is cut
            arr = group.create_array(**text_array_layout(name, n, width, chunk=chunk, shard=per_object))
            for a in range(0, n, per_object):  # one storage object at a time
                arr[a:a + per_object] = _pack(raw[a:a + per_object], width)
        group.create_array(C.STATUS, shape=(n,), dtype="int8", chunks=(s,), fill_value=PENDING,
                           compressors=CODECS[DEFAULT_CODEC["small"]])
        reason = group.create_array(**text_array_layout(C.REASON, n, REASON_BYTES, chunk=s))
        for k in sorted({i // s for i, r in enumerate(reasons or []) if r}):  # only shards with a reason
            rows = slice(k * s, min(n, (k + 1) * s))
            reason[rows] = encode_strings(reasons[rows], REASON_BYTES, truncate=True)
        # The markers: one object per shard, its existence is the commit (see the module docstring).
        group.create_array(C.SHARD_DONE, shape=(-(-n // s),), dtype="uint8", chunks=(1,), fill_value=0,
                           compressors=None, chunk_key_encoding={"name": "default", "separator": "/"})
        group.attrs.update({C.Attr.FORMAT: FORMAT, C.Attr.KIND: kind, C.Attr.N_ROWS: n, C.Attr.SHARD_SIZE: s,
                            C.Attr.VERSION: __version__, C.Attr.CREATED: time.strftime("%Y-%m-%dT%H:%M:%S"),
                            **(attrs or {})})
        group.attrs[C.Attr.FINGERPRINT] = fingerprint  # last: marks the creation complete
        return cls(group, path)

    @classmethod
    def open(cls, path: str, mode: str = "r", kind: str | None = None) -> "RowStore":
        try:
            group = zarr.open_group(path, mode=mode, zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
            raise StoreError(f"{path}: no store here") from e
        except (ValueError, KeyError, TypeError) as e:  # unreadable metadata (zarr.json damaged)
            raise StoreError(f"{path}: not a readable store ({type(e).__name__}: {e})") from e
        found = group.attrs.get(C.Attr.FORMAT)
        if found is not None and found != FORMAT:
            raise StoreError(f"{path}: a store of format {found!r}; this raywsl reads format {FORMAT!r} (the "
                             f"store layout changed): rerun with --restart to delete it and compute it again")
        if found is None or C.Attr.FINGERPRINT not in group.attrs:
            raise StoreError(f"{path}: not a complete raywsl store (format {found!r}, "
                             f"fingerprint {'present' if C.Attr.FINGERPRINT in group.attrs else 'missing'})")
        if kind and group.attrs[C.Attr.KIND] != kind:
            raise StoreError(f"{path}: a {group.attrs[C.Attr.KIND]} store, expected {kind}")
        return cls(group, path)

    @classmethod
    def open_published(cls, path: str, kind: str, artifact: str) -> "RowStore | None":
        """The store at `path` inside the cache artifact folder `artifact`, open for writing its
        shards; None when the artifact is not there yet. A store whose artifact is published but that
        cannot be opened is refused, never rebuilt over: --restart deletes it."""
        try:
            return cls.open(path, mode="r+", kind=kind)
        except StoreError as e:
            if is_complete(artifact):
                why = str(e).removeprefix(f"{path}: ")
                if "--restart" not in why:
                    why += " (damaged?): rerun with --restart to delete it and compute it again"
                raise StoreError(f"{path} cannot be opened: {why}") from None
        return None

    # ---------------------------------------------------------------- arrays

    @property
    def fingerprint(self) -> str:
        return self.group.attrs[C.Attr.FINGERPRINT]

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    def array(self, name: str) -> zarr.Array:
        """The zarr array `name` (opened once per RowStore: one metadata read)."""
        if name not in self._arrays:
            try:
                self._arrays[name] = self.group[name]
            except KeyError:
                raise KeyError(f"{self.path}: no array {name!r} in this store") from None
        return self._arrays[name]

    def is_text(self, name: str) -> bool:
        """Whether array `name` holds strings (uint8 UTF-8 rows; `read` decodes them)."""
        return TEXT_ATTR in self.array(name).attrs

    def read(self, name: str, rows: slice | range | Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Rows of array `name` (all if None; a slice, range or integer indices), strings decoded.
        Reads only the storage objects holding those rows."""
        arr = self.array(name)
        if rows is None:
            values = arr[:]
        elif isinstance(rows, (slice, range)):
            r = _as_range(rows, self.n_rows)
            values = arr[r.start:r.stop]
        else:
            values = arr.get_orthogonal_selection((np.asarray(rows, dtype=np.int64),))
        return decode_strings(values) if self.is_text(name) else values

    # ---------------------------------------------------------------- shards

    def shard_rows(self, k: int) -> slice:
        if not 0 <= k < self.n_shards:
            raise IndexError(f"{self.path}: shard {k} out of range 0..{self.n_shards - 1}")
        return slice(k * self.shard_size, min((k + 1) * self.shard_size, self.n_rows))

    def shard_done(self, k: int) -> bool:
        """Whether shard k is committed: one existence test of its marker object."""
        self.shard_rows(k)  # range check
        return sync(self._marker_store.exists(self._marker_key(k)))

    def pending_shards(self, shards: Iterable[int] | None = None) -> list[int]:
        """The shards (of `shards`, or all) without a marker, sorted: one listing of the markers."""
        if shards is None:
            wanted: Iterable[int] = range(self.n_shards)
        else:
            wanted = sorted({int(k) for k in shards})
            for k in wanted:
                self.shard_rows(k)  # range check
        done = self._committed()
        return [k for k in wanted if k not in done]

    def write_shard(self, k: int, arrays: dict[str, np.ndarray], status: np.ndarray,
                    reason: list[str]) -> None:
        """Write every array of shard k, then its marker. Rows that failed keep zeros. Reasons longer
        than REASON_BYTES are cut (ending in "...")."""
        rows = self.shard_rows(k)
        n = rows.stop - rows.start
        if len(status) != n or len(reason) != n:
            raise ValueError(f"{self.path}: shard {k} has {n} rows; got {len(status)} status, {len(reason)} reasons")
        for name, values in arrays.items():
            self.array(name)[rows] = values
        self.array(C.STATUS)[rows] = np.asarray(status, dtype="int8")
        self.array(C.REASON)[rows] = encode_strings(reason, REASON_BYTES, truncate=True)
        self.array(C.SHARD_DONE)[k] = 1  # the commit

    def read_shard(self, k: int, names: Iterable[str]) -> dict[str, np.ndarray]:
        """Shard k's rows of each array in `names`, as written (status too: see shard_status)."""
        rows = self.shard_rows(k)
        return {name: self.read(name, rows) for name in names}

    def row_meta(self, rows: slice | range | None = None) -> dict[str, np.ndarray]:
        """Shape ids, sources and categories of `rows` (all if None), as numpy strings."""
        return {name: self.read(name, rows) for name in (C.SHAPE_ID, C.SOURCE, C.CATEGORY)}

    def status(self, rows: slice | range | None = None) -> np.ndarray:
        """Per-row status of `rows` (all if None); rows of shards without a marker are pending,
        whatever was written. Reads the markers and status chunks of the overlapping shards only."""
        return self._status(_as_range(rows, self.n_rows))[0]

    def shard_status(self, k: int) -> np.ndarray:
        """Status of shard k's rows: its marker, then (committed) its status chunk."""
        return self.status(self.shard_rows(k))

    def _status(self, rows: range) -> tuple[np.ndarray, list[int]]:
        """(status of `rows`, the committed shards among those overlapping them)."""
        out = np.full(len(rows), PENDING, dtype="int8")
        if not len(rows):
            return out, []
        s = self.shard_size
        overlap = range(rows.start // s, (rows.stop - 1) // s + 1)
        if len(overlap) <= MARKER_READS:
            done = [k for k in overlap if self.shard_done(k)]
        else:
            committed = self._committed()
            done = [k for k in overlap if k in committed]
        arr = self.array(C.STATUS)
        for first, last in _runs(done):  # one read per run of committed shards (zarr fetches its chunks at once)
            a, b = max(first * s, rows.start), min((last + 1) * s, rows.stop)
            out[a - rows.start:b - rows.start] = arr[a:b]
        return out, done

    @property
    def _marker_store(self):
        return self.array(C.SHARD_DONE).store_path.store

    def _marker_key(self, k: int) -> str:
        arr = self.array(C.SHARD_DONE)
        return f"{arr.store_path.path}/{arr.metadata.encode_chunk_key((k,))}"

    def _committed(self) -> set[int]:
        """The committed shards: one listing of the marker objects (shard_done/c/<k>)."""
        folder = self._marker_key(0).rsplit("/", 1)[0]
        return {int(name) for name in sync(_list_dir(self._marker_store, folder)) if name.isdigit()}

    # ---------------------------------------------------------------- summaries

    def failures(self, rows: np.ndarray) -> list[dict[str, Any]]:
        """{row, shape_id, source, reason} of `rows` (indices): reads only the objects holding them."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return []
        ids, sources, reasons = (self.read(name, rows) for name in (C.SHAPE_ID, C.SOURCE, C.REASON))
        return [{"row": int(k), "shape_id": str(i), "source": str(src), "reason": str(why)}
                for k, i, src, why in zip(rows.tolist(), ids, sources, reasons)]

    def rows_summary(self, rows: range) -> dict[str, Any]:
        """Counts of `rows` (done, failed, pending) and their failures: what a stage that filled
        those rows reports."""
        rows = _as_range(rows, self.n_rows)
        status = self.status(rows)
        failed = np.flatnonzero(status == FAILED) + rows.start
        return {"rows": len(rows), "done": int((status == DONE).sum()), "failed": len(failed),
                "pending": int((status == PENDING).sum()), "path": self.path, "failures": self.failures(failed)}

    def summary(self, max_failures: int | None = None) -> dict[str, Any]:
        """The stable summary `raywsl inspect --json` prints for a store (see README)."""
        status, done = self._status(range(self.n_rows))
        failed = np.flatnonzero(status == FAILED)
        if max_failures is not None:
            failed = failed[:max_failures]
        arrays = {}
        for name in sorted(self.group.array_keys()):
            arr = self.array(name)
            text = TEXT_ATTR in arr.attrs
            arrays[name] = {"shape": list(arr.shape[:1] if text else arr.shape),
                            "dtype": "str" if text else str(arr.dtype)}
        return {
            "kind": self.kind,
            "path": self.path,
            "format": FORMAT,
            "rows": self.n_rows,
            **{name: int((status == code).sum()) for code, name in STATUS_NAMES.items()},
            "shards": {"size": self.shard_size, "total": self.n_shards, "done": len(done)},
            "fingerprint": self.fingerprint,
            "arrays": arrays,
            "failures": self.failures(failed),
        }


# ------------------------------------------------------------------------------------ helpers

def data_array_layout(spec: ArraySpec, n: int, s: int, kind: str) -> dict[str, Any]:
    """`group.create_array` arguments of a worker-written per-row array of a `kind` store with shards
    of `s` rows: one storage object per shard. Big rows get one inner chunk per row (a single row
    can be read alone); small ones one plain chunk per shard."""
    row_bytes = np.dtype(spec.dtype).itemsize * int(np.prod(spec.row_shape, dtype=np.int64))
    small = row_bytes < SMALL_ROW_BYTES
    codec = spec.codec or DEFAULT_CODEC["small" if small else ("weights" if kind == "weights" else "samples")]
    layout = ({"chunks": (s, *spec.row_shape)} if small
              else {"chunks": (1, *spec.row_shape), "shards": (s, *spec.row_shape)})
    return {"name": spec.name, "shape": (n, *spec.row_shape), "dtype": spec.dtype, "fill_value": 0,
            "compressors": CODECS[codec], **layout}


def text_array_layout(name: str, n: int, width: int, chunk: int, shard: int | None = None) -> dict[str, Any]:
    """`group.create_array` arguments of a string column: (n, width) uint8, zero-padded UTF-8, chunks
    of `chunk` rows (in storage objects of `shard` rows when given)."""
    return {"name": name, "shape": (n, width), "dtype": "uint8", "chunks": (chunk, width),
            "shards": (shard, width) if shard else None, "fill_value": 0,
            "compressors": CODECS[DEFAULT_CODEC["text"]],
            "attributes": {TEXT_ATTR: {"encoding": "utf-8", "width": width}}}


def meta_chunking(n: int, s: int) -> tuple[int, int]:
    """(rows per inner chunk, rows per storage object) of the metadata arrays of n rows in shards of s."""
    chunk = s * -(-META_CHUNK_ROWS // s)
    return chunk, chunk * min(META_CHUNKS_PER_OBJECT, -(-n // chunk))


def _as_range(rows: slice | range | None, n: int) -> range:
    """`rows` (None: all) as a step-1 range within [0, n)."""
    if rows is None:
        return range(n)
    r = range(n)[rows] if isinstance(rows, slice) else rows
    if r.step != 1 or (len(r) and not (0 <= r.start and r.stop <= n)):
        raise IndexError(f"rows {rows} are not consecutive rows of 0..{n - 1}")
    return r


def _runs(ks: list[int]) -> list[tuple[int, int]]:
    """Sorted integers -> [(first, last)] of their runs of consecutive values."""
    runs: list[tuple[int, int]] = []
    for k in ks:
        if runs and runs[-1][1] == k - 1:
            runs[-1] = (runs[-1][0], k)
        else:
            runs.append((k, k))
    return runs


async def _list_dir(store, prefix: str) -> list[str]:
    return [key async for key in store.list_dir(prefix)]
