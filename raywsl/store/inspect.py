"""`raywsl inspect PATH`: what is in a store or a run folder.

The `--json` form is stable (documented in the README): a store gives its `RowStore.summary()`;
a run folder gives {"kind": "run", "path", "config", "stores": {kind: summary}, "stages": stages.json},
its stores found through stages.json (the artifacts it used).
"""

from __future__ import annotations

import json
from typing import Any

import fsspec
import yaml

from raywsl import contract as C
from raywsl.store.rows import RowStore, StoreError


def inspect_path(path: str, max_failures: int | None = None) -> dict[str, Any]:
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.exists(fs_path):
        raise StoreError(f"{path}: no such file or folder")
    if fs.exists(C.join(fs_path, "zarr.json")):
        return _summary(RowStore.open(path), max_failures)
    config_path = C.join(fs_path, C.CONFIG)
    stages_path = C.join(fs_path, C.STAGES_FILE)
    stages = json.loads(fs.cat_file(stages_path)).get("stages", {}) if fs.exists(stages_path) else {}
    stores = {}
    for kind, stage, name in (("samples", "ingest", C.SAMPLES), ("weights", "fit", C.WEIGHTS)):
        if stage in stages:
            stores[kind] = _summary(RowStore.open(C.join(stages[stage]["artifact"], name)), max_failures)
    if not stages and not fs.exists(config_path):
        raise StoreError(f"{path}: neither a raywsl store nor a run folder")
    config = yaml.safe_load(fs.cat_file(config_path)) if fs.exists(config_path) else None
    return {"kind": "run", "path": path, "config": config, "stores": stores, "stages": stages}


def _summary(store: RowStore, max_failures: int | None) -> dict[str, Any]:
    info = store.summary(max_failures)
    if store.kind == "weights":
        from raywsl.store.weights import weights_summary

        info["weights"] = weights_summary(store)
    return info


def format_summary(info: dict[str, Any]) -> str:
    """The human-readable form of `inspect_path`'s result."""
    if info["kind"] == "run":
        lines = [f"run folder {info['path']}" + ("" if info["config"] else " (no config.yaml)")]
        for stage, e in info.get("stages", {}).items():
            lines.append(f"  {stage:11s} {'reused' if e['reused'] else 'computed':8s} {e['seconds']:8.1f} s  "
                         f"{e['artifact']}")
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
    if "weights" in info:
        w = info["weights"]
        loss = (f"{w['loss']} loss median {w['loss_median']:.4g}, p95 {w['loss_p95']:.4g}"
                if w["loss_median"] is not None else "no fitted rows yet")
        warm = f" from {w['warm_shape']}" if w["warm_shape"] else ""
        lines.insert(2, f"  field {w['field_type']}/{w['field_preset']} ({w['params']} parameters), "
                        f"init {w['init']}{warm}; {loss}")
    if info["failures"]:
        lines.append("  failures:")
        lines += [f"    [{f['row']}] {f['shape_id']}: {f['reason']}" for f in info["failures"]]
    return "\n".join(lines)
