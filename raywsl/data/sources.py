"""`data.source` -> the ordered list of meshes to ingest.

A source is a folder (searched recursively), a glob, or a manifest (.csv or .jsonl with a `path`
column and optional `id` and `category`; relative paths are relative to the manifest). Local paths
and fsspec URLs (s3://, gs://, memory://, ...) both work. The order is deterministic (sorted for
folders and globs, file order for manifests): row i of every store is the same shape on every run.

A manifest that cannot be read as a whole (not UTF-8, a line that is not a JSON object, no `path`
column, repeated ids) is a `SourceError` naming the manifest and the line. One mesh whose id cannot
be used (empty, a `..` component, a control character, a file name that is not valid UTF-8) is not:
its `MeshRef.problem` says why, and ingest records that row as failed without reading the mesh.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import posixpath
import re
from collections import Counter
from dataclasses import dataclass, replace

import fsspec

MESH_EXTENSIONS = (".obj", ".ply", ".stl", ".off", ".glb", ".gltf")
MANIFEST_EXTENSIONS = (".csv", ".jsonl")

# Characters that make a printed id lie or break a line: C0/C1 controls, line and paragraph
# separators, bidirectional overrides. (Zero-width joiners are left alone: scripts need them.)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")
# Lone surrogates: os.fsdecode's stand-ins for the bytes of a file name that is not UTF-8. They
# cannot be encoded, so they would fail later in zarr, JSON and hashing.
_SURROGATE = re.compile("[\ud800-\udfff]")


class SourceError(ValueError):
    """`data.source` cannot be resolved at all (as opposed to one bad mesh, which is a row failure)."""


@dataclass(frozen=True)
class MeshRef:
    shape_id: str
    uri: str
    category: str = ""
    problem: str = ""  # non-empty: this mesh is rejected, for this reason (its fields are escaped)


def id_problem(shape_id: str) -> str:
    """Why `shape_id` cannot be a shape id ("" when it can). Ids may contain '/' (`chair/abc/model`),
    but no empty, '.' or '..' component, no leading '/', no control character and nothing that is
    not valid UTF-8."""
    if not shape_id:
        return "the shape id is empty"
    if _SURROGATE.search(shape_id):
        return "the shape id is not valid UTF-8 (a file name in another encoding?)"
    if m := _CONTROL.search(shape_id):
        return f"the shape id contains the control character U+{ord(m.group()):04X}"
    if shape_id.startswith("/"):
        return "the shape id starts with '/'"
    parts = shape_id.split("/")
    if ".." in parts:
        return "the shape id has a '..' path component"
    if "." in parts or "" in parts:
        return "the shape id has an empty or '.' path component"
    return ""


def printable(text: str) -> str:
    """`text` with backslashes, control characters and undecodable file-name bytes written as
    escapes (`\\\\`, `\\u000a`, `\\xe9`): printable, valid UTF-8, and different for different texts."""
    if not (_CONTROL.search(text) or _SURROGATE.search(text) or "\\" in text):
        return text
    out = []
    for ch in text:
        o = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif 0xDC80 <= o <= 0xDCFF:  # the byte os.fsdecode could not decode
            out.append(f"\\x{o - 0xDC00:02x}")
        elif _SURROGATE.match(ch) or _CONTROL.match(ch):
            out.append(f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)


def resolve_source(source: str, key: str = "data.source") -> list[MeshRef]:
    """The meshes of `source`; errors name the config `key` it came from."""
    if not source:
        raise SourceError(f"{key} is empty: set it to a folder, a glob or a manifest of meshes")
    if source.startswith("corpus:"):
        raise SourceError(f"{key} '{source}' is the built-in generator, which `raywsl run` expands; for this "
                          f"verb write it first (`raywsl corpus DIR --n N`) and use DIR/manifest.csv")
    fs, path = fsspec.core.url_to_fs(source)
    protocol = source.split("://")[0] + "://" if "://" in source else ""
    if any(c in path for c in "*?["):
        refs = _from_paths(sorted(fs.glob(path)), protocol, root=None)
    elif not fs.exists(path):
        raise SourceError(f"{key} '{source}': no such file or folder")
    elif fs.isdir(path):
        found = sorted(p for p in fs.find(path) if p.lower().endswith(MESH_EXTENSIONS))
        refs = _from_paths(found, protocol, root=path)
    elif path.lower().endswith(MANIFEST_EXTENSIONS):
        refs = _from_manifest(fs, path, protocol)
    else:
        refs = [MeshRef(posixpath.splitext(posixpath.basename(path))[0], protocol + path)]
    if not refs:
        raise SourceError(f"{key} '{source}': no meshes found (extensions {', '.join(MESH_EXTENSIONS)})")
    return _unique(f"{key} '{source}'", [_checked(r) for r in refs])


def _checked(ref: MeshRef) -> MeshRef:
    """`ref`, or an escaped copy of it with `problem` set when its id, category or path cannot be
    used (stored, printed, hashed)."""
    why = (id_problem(ref.shape_id)
           or ("the category is not valid UTF-8" if _SURROGATE.search(ref.category) else "")
           or ("the category contains a control character" if _CONTROL.search(ref.category) else "")
           or ("the file path is not valid UTF-8" if _SURROGATE.search(ref.uri) else ""))
    if not why:
        return ref
    uri = printable(ref.uri)
    return MeshRef(printable(ref.shape_id) or "(empty id)", uri, printable(ref.category), f"{uri}: {why}")


def _unique(where: str, refs: list[MeshRef]) -> list[MeshRef]:
    """Usable ids must be unique (a SourceError names the first 5 repeated ones). A rejected
    mesh's escaped id that is already taken gets a `#2`, `#3`, ... suffix: it stays a distinct row."""
    counts = Counter(r.shape_id for r in refs if not r.problem)
    repeated = sorted(i for i, n in counts.items() if n > 1)
    if repeated:
        more = f" and {len(repeated) - 5} more" if len(repeated) > 5 else ""
        raise SourceError(f"{where}: shape ids must be unique; repeated: {repeated[:5]}{more} (in a manifest, "
                          f"give each row its own 'id'; without one the id is the file name's stem)")
    used = set(counts)
    out = []
    for r in refs:
        if r.problem:
            shape_id, n = r.shape_id, 2
            while shape_id in used:
                shape_id, n = f"{r.shape_id}#{n}", n + 1
            used.add(shape_id)
            r = replace(r, shape_id=shape_id)
        out.append(r)
    return out


def _from_paths(paths: list[str], protocol: str, root: str | None) -> list[MeshRef]:
    """Ids are paths relative to the folder without extension; the category is the first folder
    below the root (the ShapeNet convention `<category>/<shape>/model.obj`) when there is one."""
    if not paths:
        return []
    root = root or posixpath.commonpath(paths)
    refs = []
    for p in paths:
        rel = posixpath.relpath(p, root) if root and p != root else posixpath.basename(p)
        parts = rel.split("/")
        refs.append(MeshRef(posixpath.splitext(rel)[0], protocol + p, parts[0] if len(parts) > 1 else ""))
    return refs


def _from_manifest(fs: fsspec.AbstractFileSystem, path: str, protocol: str) -> list[MeshRef]:
    name = protocol + path
    text = _decode(fs.cat_file(path), name)
    rows = _csv_rows(text, name) if path.lower().endswith(".csv") else _jsonl_rows(text, name)
    base = posixpath.dirname(path)
    refs = []
    for line, row in rows:
        p = _value(row, "path", name, line)
        if not p:
            raise SourceError(f"manifest '{name}' line {line}: no 'path' value")
        if "://" not in p and not posixpath.isabs(p):
            p = protocol + posixpath.join(base, p)
        shape_id = _value(row, "id", name, line) or posixpath.splitext(posixpath.basename(p))[0]
        refs.append(MeshRef(shape_id, p, _value(row, "category", name, line)))
    return refs


def _decode(raw: bytes, name: str) -> str:
    """The manifest's text: UTF-8, with or without a byte-order mark."""
    skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = skip + e.start
        line = raw.count(b"\n", 0, at) + 1
        column = at - (raw.rfind(b"\n", 0, at) + 1) + 1
        raise SourceError(f"manifest '{name}' line {line}, column {column}: not valid UTF-8 (byte "
                          f"{raw[at:at + 1]!r} at offset {at}); save the manifest as UTF-8") from None


def _csv_rows(text: str, name: str) -> list[tuple[int, dict]]:
    """(line number, {column: value}) of each non-blank record; column names are stripped and
    lower-cased."""
    reader = csv.reader(io.StringIO(text, newline=""), skipinitialspace=True)
    try:
        header = next(reader, None)
        columns = [h.strip().lower() for h in header or []]
        if not any(columns):
            raise SourceError(f"manifest '{name}' is empty: its first line must name the columns "
                              f"(path, and optionally id, category)")
        if "path" not in columns:
            raise SourceError(f"manifest '{name}' has no 'path' column (columns found: {columns}); its "
                              f"first line must name the columns (path, and optionally id, category)")
        return [(reader.line_num, dict(zip(columns, values))) for values in reader if any(values)]
    except csv.Error as e:
        raise SourceError(f"manifest '{name}' line {reader.line_num}: not valid CSV ({e})") from e


_JSON_TYPES = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}


def _jsonl_rows(text: str, name: str) -> list[tuple[int, dict]]:
    rows = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SourceError(f"manifest '{name}' line {n}: not valid JSON ({e})") from e
        if not isinstance(row, dict):
            raise SourceError(f"manifest '{name}' line {n}: expected a JSON object such as "
                              f'{{"path": "a.obj", "id": "a"}}, found {_JSON_TYPES.get(type(row), type(row).__name__)}')
        rows.append((n, row))
    return rows


def _value(row: dict, key: str, name: str, line: int) -> str:
    """The text of `row[key]` ("" when missing or null); a number is written out, anything else
    is an error."""
    value = row.get(key)
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise SourceError(f"manifest '{name}' line {line}: '{key}' must be a string, found "
                          f"{_JSON_TYPES.get(type(value), 'an object')}")
    return str(value)
