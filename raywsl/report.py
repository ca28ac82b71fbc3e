"""report.html: one self-contained page per run folder (figures inlined), also logged to MLflow.

Sections: what ran (config, stage timings), fitting (loss curve, reconstructions, their metrics),
diffusion (loss per timestep bucket), generation (generated and reference meshes, set metrics,
novelty), weight space (training rows and samples in the top-two PCA plane, collapse signals).
Every figure comes from the stage that made it; a missing one (a stage not run) is left out.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import logging
import os
from typing import Any

import fsspec
import numpy as np

from raywsl import layout as L
from raywsl.config import Config, dump_yaml

log = logging.getLogger(__name__)

# (section, [(figure path inside the run folder, caption)], [metric keys]) in page order
SECTIONS = [
    ("Fitting", [("recon/fit_loss_curve.png", "fitting loss, mean over shapes"),
                 ("recon/recon.png", "reconstructions of fitted fields"),
                 ("recon/fit_loss.png", "final fitting loss per shape")],
     ["recon_cd_median", "recon_cd_mean", "recon_iou_mean", "recon_no_surface", "fit_loss_median", "fit_loss_p95"]),
    ("Diffusion", [("recon/diffusion_loss.png", "denoiser loss per timestep bucket (flat across t: collapse)")],
     []),
    ("Generation", [("generated/generated.png", "generated meshes"), ("eval/reference.png", "held-out reference"),
                    ("eval/nearest_reference.png", "distance to the nearest reference")],
     ["mmd_cd", "cov_cd", "1nna_cd", "mmd_emd", "cov_emd", "1nna_emd", "valid_share", "single_component_share",
      "watertight_share", "memorisation_rate", "novelty_cd_median", "novelty_distinct_nearest", "n_generated",
      "n_reference"]),
    ("Weight space", [("eval/weights_pca.png", "training rows and sampled rows, top two principal directions")],
     ["weights_distinct_nearest", "weights_distinct_nearest_share", "weights_attractor_share",
      "weights_nearest_cos_median", "weights_cos_to_training_mean"]),
]


def write_report(cfg: Config) -> str:
    run = L.RunLayout(cfg.run_dir)
    fs, root = fsspec.core.url_to_fs(run.root)
    metrics = json.loads(fs.cat_file(L.join(root, L.METRICS))) if fs.exists(L.join(root, L.METRICS)) else {}
    _weights_figure(cfg)
    parts = [f"<h1>raywsl run {html.escape(cfg.run.name)}</h1>",
             f"<p>{html.escape(run.root)} &middot; {datetime.datetime.now():%Y-%m-%d %H:%M}</p>"]
    timings = metrics.get("stage_seconds", {})
    if timings:
        parts.append("<h2>Stages</h2>" + _table({k: f"{v:.1f} s" for k, v in timings.items()}))
    for title, pictures, keys in SECTIONS:
        body = [_figure(fs, L.join(root, p), caption) for p, caption in pictures]
        body = [b for b in body if b]
        values = {k: metrics[k] for k in keys if k in metrics}
        if not body and not values:
            continue
        parts.append(f"<h2>{title}</h2>" + (_table(values) if values else "") + "".join(body))
    parts.append("<h2>Config</h2><pre>" + html.escape(dump_yaml(cfg)) + "</pre>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>raywsl " + html.escape(cfg.run.name) +
            "</title><style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
            "table{border-collapse:collapse}td{border:1px solid #ccc;padding:2px 8px}td:last-child{text-align:right}"
            "figure{margin:1em 0}img{max-width:100%}pre{background:#f6f6f6;padding:1em;font-size:12px}</style>"
            "</head><body>" + "\n".join(parts) + "</body></html>")
    with fs.open(L.join(root, L.REPORT), "w") as f:
        f.write(page)
    log.info("report: %s", run.report)
    return run.report


def _table(values: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))

    return "<table>" + "".join(f"<tr><td>{html.escape(k)}</td><td>{fmt(v)}</td></tr>" for k, v in values.items()) \
        + "</table>"


def _figure(fs, path: str, caption: str) -> str:
    if not fs.exists(path):
        return ""
    data = base64.b64encode(fs.cat_file(path)).decode()
    return (f"<figure><img src='data:image/png;base64,{data}'><figcaption>{html.escape(caption)}"
            f"</figcaption></figure>")


def _weights_figure(cfg: Config) -> None:
    """eval/weights_pca.png: the training rows (by category) and the sampled rows in one PCA plane."""
    from raywsl import tracking
    from raywsl.diffusion.sample import ROWS_FILE
    from raywsl.diffusion.train import training_rows
    from raywsl.eval import figures
    from raywsl.store.rows import StoreError
    from raywsl.store.weights import open_weights

    run = L.RunLayout(cfg.run_dir)
    try:
        store = open_weights(run.weights)
    except StoreError:
        return
    rows = training_rows(store, cfg)
    if len(rows) < 3:
        return
    W = store.group[L.ROW_WEIGHTS].get_orthogonal_selection((rows, slice(None)))
    labels = [f"train: {c}" for c in store.row_meta()[L.CATEGORY][rows]]
    generated = L.join(run.generated, ROWS_FILE)
    if os.path.exists(generated):
        G = np.load(generated)
        if G.shape[1] == W.shape[1]:
            W, labels = np.concatenate([W, G]), labels + ["sampled"] * len(G)
    path = L.join(run.eval, "weights_pca.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    figures.plot_embedding(W, labels, path, title=f"{store.attrs['field_type']} rows: training and sampled")
    tracking.log_figure(path)
