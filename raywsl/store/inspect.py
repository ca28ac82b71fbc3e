"""`raywsl inspect PATH`: what is in a store or a run folder.

The `--json` form is stable (documented in the README): a store gives its `RowStore.summary()`;
a run folder gives {"kind": "run", "path", "config", "stores": {kind: summary}}.
"""

from __future__ import annotations

from typing import Any

import fsspec
import yaml

from raywsl import layout as L
from raywsl.store.rows import RowStore, StoreError


def inspect_path(path: str, max_failures: int | None = None) -> dict[str, Any]:
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.exists(fs_path):
        raise StoreError(f"{path}: no such file or folder")
    if fs.exists(L.join(fs_path, "zarr.json")):
        return RowStore.open(path).summary(max_failures)
    config_path = L.join(fs_path, L.CONFIG)
    stores = {kind: RowStore.open(L.join(path, name)).summary(max_failures)
              for kind, name in L.STORES.items() if fs.exists(L.join(fs_path, name))}
    if not stores and not fs.exists(config_path):
        raise StoreError(f"{path}: neither a raywsl store nor a run folder")
    config = yaml.safe_load(fs.cat_file(config_path)) if fs.exists(config_path) else None
    return {"kind": "run", "path": path, "config": config, "stores": stores}


def format_summary(info: dict[str, Any]) -> str:
    """The human-readable form of `inspect_path`'s result."""
    if info["kind"] == "run":
        lines = [f"run folder {info['path']}" + ("" if info["config"] else " (no config.yaml)")]
        for s in info["stores"].values():
            lines += ["", *format_summary(s).splitlines()]
        return "\n".join(lines)
    lines = [
        f"{info['kind']} store {info['path']}",
        f"  rows {info['rows']}: {info['done']} done, {info['failed']} failed, {info['pending']} pending",
        f"  shards {info['shards']['done']}/{info['shards']['total']} done ({info['shards']['size']} rows each)",
        f"  fingerprint {info['fingerprint']}",
        "  arrays:",
        *(f"    {name:12s} {str(tuple(a['shape'])):24s} {a['dtype']}" for name, a in info["arrays"].items()),
    ]
    if info["failures"]:
        lines.append("  failures:")
        lines += [f"    [{f['row']}] {f['shape_id']}: {f['reason']}" for f in info["failures"]]
    return "\n".join(lines)
