"""`data.source` -> the ordered list of meshes to ingest.

A source is a folder (searched recursively), a glob, or a manifest (.csv or .jsonl with a `path`
column and optional `id` and `category`; relative paths are relative to the manifest). Local paths
and fsspec URLs (s3://, gs://, memory://, ...) both work. The order is deterministic (sorted for
folders and globs, file order for manifests): row i of every store is the same shape on every run.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
from dataclasses import dataclass

import fsspec

MESH_EXTENSIONS = (".obj", ".ply", ".stl", ".off", ".glb", ".gltf")
MANIFEST_EXTENSIONS = (".csv", ".jsonl")


class SourceError(ValueError):
    """`data.source` cannot be resolved at all (as opposed to one bad mesh, which is a row failure)."""


@dataclass(frozen=True)
class MeshRef:
    shape_id: str
    uri: str
    category: str = ""


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
    ids = [r.shape_id for r in refs]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise SourceError(f"{key} '{source}': shape ids must be unique; repeated: {dup}")
    return refs


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
    text = fs.cat_file(path).decode()
    if path.lower().endswith(".csv"):
        rows = list(csv.DictReader(io.StringIO(text)))
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SourceError(f"manifest '{protocol}{path}' line {n}: not valid JSON ({e})") from e
    base = posixpath.dirname(path)
    refs = []
    for n, row in enumerate(rows, 1):
        p = str(row.get("path") or "")
        if not p:
            raise SourceError(f"manifest '{protocol}{path}' row {n}: no 'path' value")
        if "://" not in p and not posixpath.isabs(p):
            p = protocol + posixpath.join(base, p)
        refs.append(MeshRef(str(row.get("id") or posixpath.splitext(posixpath.basename(p))[0]), p,
                            str(row.get("category") or "")))
    return refs
