"""report.html: one self-contained page per run folder (figures inlined), also logged to MLflow.

Sections: what ran (config, stage timings), fitting (loss curve, reconstructions, their metrics),
diffusion (loss per timestep bucket), generation (generated and reference meshes, set metrics,
novelty), weight space (the category probes and weight statistics of the training rows as tables,
training rows and samples in the top-two PCA plane, collapse signals).
Every figure comes from the artifact of the stage that made it (found through the plan); a missing one
(a stage not run) is left out. The stages table says which artifacts were reused.
The page helpers (page_html, table_html, figure_html) give the sweep report (sweep/report.py) the same look.
"""

from __future__ import annotations

import base64
import datetime
import html
import logging
from typing import Any, Sequence

import fsspec

from raywsl import cache
from raywsl import contract as C
from raywsl.config import Config, dump_yaml
from raywsl.eval.probe import from_metrics, probe_note, probe_rows, statistics_rows

log = logging.getLogger(__name__)

STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
         "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 8px}"
         "th{background:#f6f6f6}td:last-child{text-align:right}"
         "figure{margin:1em 0}img{max-width:100%}pre{background:#f6f6f6;padding:1em;font-size:12px}")

# (section, [(stage, figure file in its artifact, caption)], [metric keys]) in page order
SECTIONS = [
    ("Fitting", [("fit", C.FIT_CURVE, "fitting loss, mean over shapes"),
                 ("recon", C.RECON_GRID, "reconstructions of fitted fields"),
                 ("recon", C.RECON_LOSSES, "final fitting loss per shape")],
     ["recon_cd_median", "recon_cd_mean", "recon_iou_mean", "recon_no_surface", "fit_loss_median", "fit_loss_p95"]),
    ("Diffusion", [("train", C.DIFFUSION_LOSS, "denoiser loss per timestep bucket (flat across t: collapse)")],
     []),
    ("Generation", [("sample", C.GENERATED_GRID, "generated meshes"), ("eval", "reference.png", "held-out reference"),
                    ("eval", "nearest_reference.png", "distance to the nearest reference")],
     ["mmd_cd", "cov_cd", "1nna_cd", "mmd_emd", "cov_emd", "1nna_emd", "valid_share", "single_component_share",
      "watertight_share", "memorisation_rate", "novelty_cd_median", "novelty_distinct_nearest", "n_generated",
      "n_reference"]),
    ("Weight space", [("eval", C.WEIGHTS_PCA, "training rows and sampled rows, top two principal directions"),
                      ("eval", C.WEIGHTS_SPECTRUM, "training rows: variance per principal direction")],
     ["weights_pca10_share", "weights_probe_skipped", "weights_distinct_nearest", "weights_distinct_nearest_share",
      "weights_attractor_share", "weights_nearest_cos_median", "weights_cos_to_training_mean"]),
]


def write_report(cfg: Config, plan: C.Plan) -> str:
    run = plan.run
    fs, root = fsspec.core.url_to_fs(run.root)
    metrics = cache.read_json(run.metrics, {})
    stages = cache.read_json(run.stages, {}).get("stages", {})
    parts = [f"<h1>raywsl run {html.escape(cfg.run.name)}</h1>",
             f"<p>{html.escape(run.root)} &middot; cache {html.escape(plan.cache)} &middot; "
             f"{datetime.datetime.now():%Y-%m-%d %H:%M}</p>"]
    if stages:
        rows = {name: f"{'reused' if e['reused'] else 'computed'} &middot; {e['seconds']:.1f} s &middot; "
                      f"{html.escape(e['fingerprint'])}" for name, e in stages.items()}
        parts.append("<h2>Stages</h2>" + table_html(rows, escape=False))
    for title, pictures, keys in SECTIONS:
        body = [figure_html(fs, plan[stage].join(name), caption) for stage, name, caption in pictures if stage in plan]
        body = [b for b in body if b]
        values = {k: metrics[k] for k in keys if k in metrics}
        tables = _weight_space(metrics) if title == "Weight space" else ""
        if not body and not values and not tables:
            continue
        parts.append(f"<h2>{title}</h2>" + tables + (table_html(values) if values else "") + "".join(body))
    parts.append("<h2>Config</h2><pre>" + html.escape(dump_yaml(cfg)) + "</pre>")
    cache.write_text(run.report, page_html(f"raywsl {cfg.run.name}", parts))
    log.info("report: %s", run.report)
    return run.report


def page_html(title: str, parts: Sequence[str]) -> str:
    """One self-contained page of HTML `parts` under the style sheet every raywsl report shares."""
    return ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title><style>" +
            STYLE + "</style></head><body>" + "\n".join(parts) + "</body></html>")


def table_html(values: dict[str, Any], escape: bool = True) -> str:
    """A two-column table of name -> value (floats to 4 significant digits)."""
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v)) if escape else str(v)

    return "<table>" + "".join(f"<tr><td>{html.escape(k)}</td><td>{fmt(v)}</td></tr>" for k, v in values.items()) \
        + "</table>"


def _weight_space(metrics: dict[str, Any]) -> str:
    """The probe table (papers/004 Table 4: mean ± std, chance) and the weight statistics (papers/002
    Table 2) of the eval stage's weights_* metrics, as `raywsl probe` writes them."""
    probe, stats = from_metrics(metrics)
    out = ""
    if rows := probe_rows(probe):
        out += ("<table><tr><th>probe</th><th>mean ± std</th><th>chance</th></tr>" +
                "".join(f"<tr>{''.join(f'<td>{html.escape(c)}</td>' for c in row)}</tr>" for row in rows) +
                "</table>" + (f"<p><small>{html.escape(probe_note(probe))}</small></p>"
                              if {"seeds", "test_fraction", "classes", "n_test"} <= probe.keys() else ""))
    if rows := statistics_rows(stats):
        out += ("<table><tr><th>statistic</th><th>value</th></tr>" +
                "".join(f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td></tr>" for a, b in rows) + "</table>")
    return out


def figure_html(fs, path: str, caption: str) -> str:
    """The PNG at `path` on `fs`, inlined (base64) with its caption; empty when there is none."""
    if not fs.exists(path):
        return ""
    data = base64.b64encode(fs.cat_file(path)).decode()
    return (f"<figure><img src='data:image/png;base64,{data}'><figcaption>{html.escape(caption)}"
            f"</figcaption></figure>")
