"""A Zarr group of per-shape rows, written a whole shard at a time, resumable and exactly-once.

The sample store (ingest) and the weight store (fit) are both row stores: N rows, one per shape,
cut into shards of `shard_size` consecutive rows. A shard is the unit of work and of writing:

- Every array is chunked so that one shard of rows is one storage object (Zarr sharding for the
  big per-row arrays, one chunk per shard for the small ones). Two workers never write to the same
  object, so parallel writers cannot lose each other's data (Zarr rewrites a shard as a whole).
- A worker writes all arrays of its shard, then the shard's `shard_done` chunk. That marker is the
  commit: a shard without it is pending, whatever else was written, so a killed worker never
  leaves rows that look done. Rewriting a pending shard overwrites exactly its own objects, and
  the content of a shard is deterministic, so a retry gives the same bytes.
- The driver alone creates the group and writes attributes (Zarr rewrites zarr.json on every
  attribute change). The `fingerprint` attribute is written last; the stages create a store in a
  temporary folder of the cache and rename it into place (cache.py), so a store is whole or absent.

Per-row metadata (shape id, source, category) is written by the driver at creation; status and
reason by the shard's worker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import zarr

from raywsl import __version__
from raywsl import contract as C
from raywsl.cache import is_complete

FORMAT = "raywsl-rowstore/1"

PENDING, DONE, FAILED = 0, 1, 2
STATUS_NAMES = {PENDING: "pending", DONE: "done", FAILED: "failed"}


class StoreError(RuntimeError):
    """A store is missing, of the wrong kind, or was made by a different config."""


@dataclass(frozen=True)
class ArraySpec:
    """A per-row array: `row_shape` is the shape of one row (without the leading N)."""

    name: str
    row_shape: tuple[int, ...]
    dtype: str = "float32"


class RowStore:
    def __init__(self, group: zarr.Group, path: str):
        self.group = group
        self.path = path
        attrs = group.attrs
        self.kind: str = attrs[C.Attr.KIND]
        self.n_rows: int = int(attrs[C.Attr.N_ROWS])
        self.shard_size: int = int(attrs[C.Attr.SHARD_SIZE])
        self.n_shards: int = -(-self.n_rows // self.shard_size)

    # ---------------------------------------------------------------- creating and opening

    @classmethod
    def create(cls, path: str, *, kind: str, ids: list[str], sources: list[str], categories: list[str],
               shard_size: int, arrays: Iterable[ArraySpec], fingerprint: str,
               attrs: dict[str, Any] | None = None) -> "RowStore":
        n = len(ids)
        if n == 0:
            raise StoreError(f"{path}: cannot create a {kind} store with no rows")
        if len(set(ids)) != n:
            dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise StoreError(f"{path}: shape ids must be unique; repeated: {dup}")
        group = zarr.open_group(path, mode="w")
        s = min(shard_size, n)
        for spec in arrays:
            group.create_array(spec.name, shape=(n, *spec.row_shape), dtype=spec.dtype,
                               chunks=(1, *spec.row_shape), shards=(s, *spec.row_shape),
                               compressors=None, fill_value=0)  # float samples do not compress
        for name, values in ((C.SHAPE_ID, ids), (C.SOURCE, sources), (C.CATEGORY, categories)):
            group.create_array(name, shape=(n,), dtype=str, chunks=(s,), fill_value="")[:] = np.array(values)
        group.create_array(C.STATUS, shape=(n,), dtype="int8", chunks=(s,), fill_value=PENDING)
        group.create_array(C.REASON, shape=(n,), dtype=str, chunks=(s,), fill_value="")
        group.create_array(C.SHARD_DONE, shape=(-(-n // s),), dtype="uint8", chunks=(1,), fill_value=0)
        group.attrs.update({C.Attr.FORMAT: FORMAT, C.Attr.KIND: kind, C.Attr.N_ROWS: n, C.Attr.SHARD_SIZE: s,
                            C.Attr.VERSION: __version__, C.Attr.CREATED: time.strftime("%Y-%m-%dT%H:%M:%S"),
                            **(attrs or {})})
        group.attrs[C.Attr.FINGERPRINT] = fingerprint  # last: marks the creation complete
        return cls(group, path)

    @classmethod
    def open(cls, path: str, mode: str = "r", kind: str | None = None) -> "RowStore":
        try:
            group = zarr.open_group(path, mode=mode)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
            raise StoreError(f"{path}: no store here") from e
        except (ValueError, KeyError, TypeError) as e:  # unreadable metadata (zarr.json damaged)
            raise StoreError(f"{path}: not a readable store ({type(e).__name__}: {e})") from e
        if group.attrs.get(C.Attr.FORMAT) != FORMAT or C.Attr.FINGERPRINT not in group.attrs:
            raise StoreError(f"{path}: not a complete raywsl store (format {group.attrs.get(C.Attr.FORMAT)!r})")
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
        except StoreError:
            if is_complete(artifact):
                raise StoreError(f"{path} cannot be opened (damaged?): rerun with --restart to delete it "
                                 f"and compute it again") from None
        return None

    # ---------------------------------------------------------------- shards

    @property
    def fingerprint(self) -> str:
        return self.group.attrs[C.Attr.FINGERPRINT]

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    def shard_rows(self, k: int) -> slice:
        if not 0 <= k < self.n_shards:
            raise IndexError(f"{self.path}: shard {k} out of range 0..{self.n_shards - 1}")
        return slice(k * self.shard_size, min((k + 1) * self.shard_size, self.n_rows))

    def shards_done(self) -> np.ndarray:
        return self.group[C.SHARD_DONE][:].astype(bool)

    def pending_shards(self) -> list[int]:
        return np.flatnonzero(~self.shards_done()).tolist()

    def write_shard(self, k: int, arrays: dict[str, np.ndarray], status: np.ndarray,
                    reason: list[str]) -> None:
        """Write every array of shard k, then its marker. Rows that failed keep zeros."""
        rows = self.shard_rows(k)
        for name, values in arrays.items():
            self.group[name][rows] = values
        self.group[C.STATUS][rows] = np.asarray(status, dtype="int8")
        self.group[C.REASON][rows] = np.array(reason, dtype=str)
        self.group[C.SHARD_DONE][k] = 1

    def read_shard(self, k: int, names: Iterable[str]) -> dict[str, np.ndarray]:
        rows = self.shard_rows(k)
        return {name: self.group[name][rows] for name in names}

    def row_meta(self, rows: slice | None = None) -> dict[str, np.ndarray]:
        rows = rows or slice(None)
        return {name: self.group[name][rows] for name in (C.SHAPE_ID, C.SOURCE, C.CATEGORY)}

    def status(self) -> np.ndarray:
        """Per-row status; rows of shards without a marker are pending, whatever was written."""
        status = self.group[C.STATUS][:]
        done_rows = np.repeat(self.shards_done(), self.shard_size)[: self.n_rows]
        return np.where(done_rows, status, PENDING).astype("int8")

    # ---------------------------------------------------------------- summaries

    def rows_summary(self, rows: range) -> dict[str, Any]:
        """Counts of `rows` (done, failed, pending) and their failures: what a stage that filled
        those rows reports."""
        status = self.status()[rows.start:rows.stop]
        failed = np.flatnonzero(status == FAILED) + rows.start
        meta, reason = self.row_meta(), self.group[C.REASON]
        return {"rows": len(rows), "done": int((status == DONE).sum()), "failed": len(failed),
                "pending": int((status == PENDING).sum()), "path": self.path,
                "failures": [{"row": int(k), "shape_id": str(meta[C.SHAPE_ID][k]), "source": str(meta[C.SOURCE][k]),
                              "reason": str(reason[k])} for k in failed]}

    def summary(self, max_failures: int | None = None) -> dict[str, Any]:
        """The stable summary `raywsl inspect --json` prints for a store (see README)."""
        status = self.status()
        failed = np.flatnonzero(status == FAILED)
        if max_failures is not None:
            failed = failed[:max_failures]
        meta = self.row_meta()
        reason = self.group[C.REASON][:]
        done_shards = int(self.shards_done().sum())
        return {
            "kind": self.kind,
            "path": self.path,
            "format": FORMAT,
            "rows": self.n_rows,
            **{name: int((status == code).sum()) for code, name in STATUS_NAMES.items()},
            "shards": {"size": self.shard_size, "total": self.n_shards, "done": done_shards},
            "fingerprint": self.fingerprint,
            "arrays": {name: {"shape": list(arr.shape), "dtype": "str" if arr.dtype.kind == "T" else str(arr.dtype)}
                       for name, arr in sorted(self.group.arrays())},
            "failures": [{"row": int(i), "shape_id": str(meta[C.SHAPE_ID][i]),
                          "source": str(meta[C.SOURCE][i]), "reason": str(reason[i])} for i in failed],
        }
