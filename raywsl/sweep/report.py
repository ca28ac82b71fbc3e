"""The phase diagram of a sweep: where, over the data scale N and the parameterisations, weight-space
diffusion starts working.

Reads what the sweep runner wrote (sweep.json; per trial its trial.json and the run's metrics.json)
and writes <sweep folder>/report/:

    results.csv                  one row per trial: status, varied keys, the headline metrics (METRICS)
    curves.png                   per metric the seed mean against N (log axis), one line per
                                 parameterisation, the band spanning the seeds' min to max
    heatmap_<variant>_N<n>.png   per variant that varies two keys (e.g. field.rank x field.kappa): seed
                                 means of the collapse and quality metrics over that grid, one per N
    onset.json                   N* and its bootstrap interval per parameterisation (onset.py)
    report.html                  all of it on one self-contained page, styled like a run's report

A parameterisation is a variant together with the values of the other grid / choice keys; seeds, and
keys drawn from continuous distributions (uniform / loguniform: a new value every trial), are pooled
within it. Trials that have not finished are counted and listed, never plotted nor used for the onset.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import html
import io
import json
import logging
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import fsspec
import numpy as np
from matplotlib.figure import Figure

from raywsl import cache
from raywsl import contract as C
from raywsl.geometry.figures import DPI, save_figure
from raywsl.report import figure_html, page_html, table_html
from raywsl.sweep.onset import RULES, Rule, estimate_onset
from raywsl.sweep.space import LOGUNIFORM, SCALE_KEY, SEED_KEY, UNIFORM

log = logging.getLogger(__name__)

VARIANT_KEY = "variant"
FINISHED, PENDING = C.TRIAL_FINISHED, C.TRIAL_PENDING
# the headline metrics, in the order of the curves' panels and the tables' columns
METRICS = ("weights_attractor_share", "memorisation_rate", "valid_share", "1nna_cd", "cov_cd", "mmd_cd",
           "novelty_cd_median", "novelty_distinct_nearest", "weights_distinct_nearest")
# shares in [0, 1], drawn on that fixed colour scale so heatmaps compare across N and variants
HEATMAP_METRICS = ("weights_attractor_share", "memorisation_rate", "1nna_cd", "cov_cd")


@dataclasses.dataclass(frozen=True)
class SweepReport:
    path: str  # report.html
    table: str  # results.csv
    figures: list[str]  # curves.png (when drawn), then the heatmaps
    onset: dict[str, dict]  # parameterisation -> estimate_onset's result (those that could be estimated)


@dataclasses.dataclass(frozen=True)
class _Trial:
    """One trial as its folder has it now."""

    name: str
    params: dict[str, Any]
    status: str  # finished / running / failed, or pending
    state: dict[str, Any]  # trial.json
    metrics: dict[str, float]  # the run's numeric metrics; empty unless finished


def collect(sweep_dir: str | Path) -> tuple[dict, list[dict]]:
    """The sweep's record (sweep.json) and one row per finished trial: {"trial", **params, **metrics}
    with the run's numeric metrics (nested values left out)."""
    meta, trials = _read(os.fspath(sweep_dir))
    return meta, [_row(t) for t in trials if t.status == FINISHED]


def write_sweep_report(sweep_dir: str | Path, rules: Sequence[Rule] = RULES, bootstrap: int = 1000) -> SweepReport:
    """Write the report of the sweep in `sweep_dir` under its report/ folder (again on every call: a
    sweep still running gets a report of what has finished so far)."""
    sweep_dir = os.fspath(sweep_dir)  # a local folder or an fsspec URL
    out = C.join(sweep_dir, C.SWEEP_REPORT)
    meta, trials = _read(sweep_dir)
    rows = [_row(t) for t in trials if t.status == FINISHED]
    scales = [int(n) for n in meta.get("scale") or []]
    series = _series(meta, rows)
    fs, _ = fsspec.core.url_to_fs(sweep_dir)

    table = C.join(out, "results.csv")
    _write_csv(table, meta, trials)

    figures: list[str] = []
    if not scales:
        curves = "<p>This sweep has no scale axis (data.shapes): no curves over N.</p>"
    elif not (png := _curves_png(series, scales, rules, C.join(out, "curves.png"))):
        curves = "<p>No finished trial with metrics yet: nothing to plot.</p>"
    else:
        figures.append(png)
        drawn = _drawn(meta)
        curves = figure_html(fs, _fs_path(png), "seed mean per N (log axis), band: min to max over the seeds; one line "
                             "per parameterisation; dashed: the onset rules' thresholds" +
                             (f"; {', '.join(drawn)} (drawn per trial) pooled with the seeds" if drawn else ""))
    heatmaps = _heatmaps(meta, rows, scales, out)
    figures += [p for p, _ in heatmaps]

    onset: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    if len(scales) < 2:
        skipped["all"] = f"the onset needs at least two scales (this sweep has {len(scales)})"
    else:
        onset, skipped = _onsets(series, scales, rules, bootstrap)
    cache.write_json(C.join(out, "onset.json"), {"rules": [str(r) for r in rules], "bootstrap": bootstrap,
                                               "onset": onset, "skipped": skipped}, sort_keys=False)

    parts = [f"<h1>raywsl sweep {html.escape(str(meta.get('name', '')))}</h1>",
             f"<p>{html.escape(str(sweep_dir))} &middot; {datetime.datetime.now():%Y-%m-%d %H:%M}</p>",
             "<h2>Sweep</h2>" + table_html(_about(meta, trials, scales)),
             "<h2>Onset</h2>" + _onset_html(onset, skipped, rules, bootstrap),
             "<h2>Curves</h2>" + curves]
    if heatmaps:
        parts.append("<h2>Heatmaps</h2>" + "".join(figure_html(fs, _fs_path(p), c) for p, c in heatmaps))
    parts.append("<h2>Trials</h2>" + _trials_html(trials))
    path = C.join(out, "report.html")
    cache.write_text(path, page_html(f"raywsl sweep {meta.get('name', '')}", parts))
    log.info("sweep report: %s", path)
    return SweepReport(path, table, figures, onset)


# ------------------------------------------------------------------------------------------ reading

def _fs_path(url: str) -> str:
    return fsspec.core.url_to_fs(url)[1]


def _read(sweep_dir: str) -> tuple[dict, list[_Trial]]:
    meta = cache.read_json(C.join(sweep_dir, C.SWEEP_JSON))
    trials = []
    for t in meta.get("trials", []):
        run_dir = t["run_dir"]
        if not cache.exists(run_dir):  # the sweep folder was copied elsewhere (e.g. off the cluster)
            run_dir = C.join(sweep_dir, C.SWEEP_TRIALS, run_dir.rstrip("/").rsplit("/", 1)[-1])
        state = cache.read_json(C.join(run_dir, C.TRIAL_JSON), {})
        status = state.get("status", PENDING)
        metrics = cache.read_json(C.join(run_dir, C.METRICS), {}) if status == FINISHED else {}
        trials.append(_Trial(t["name"], dict(t["params"]), status, state,
                             {k: v for k, v in metrics.items() if _is_number(v)}))
    return meta, trials


def _row(t: _Trial) -> dict[str, Any]:
    return {"trial": t.name, **t.params, **t.metrics}


def _drawn(meta: dict) -> list[str]:
    """Keys drawn from a continuous distribution: a new value every trial, so pooled like the seeds."""
    return [a["key"] for a in meta.get("axes", []) if a.get("kind") in (UNIFORM, LOGUNIFORM)]


def _split_keys(meta: dict) -> list[str]:
    """The varied keys that tell parameterisations apart, besides the variant."""
    keys = dict.fromkeys(k for t in meta.get("trials", []) for k in t["params"])
    return [k for k in keys if k not in {SCALE_KEY, SEED_KEY, VARIANT_KEY, *_drawn(meta)}]


def _series(meta: dict, rows: list[dict]) -> dict[str, list[dict]]:
    """Finished rows by parameterisation, labelled by the variant and the keys that vary within it."""
    keys = _split_keys(meta)
    varying = {v: [k for k in keys if len(_values(mine, k)) > 1] for v, mine in _by_variant(rows).items()}
    series: dict[str, list[dict]] = {}
    for r in rows:
        v = r.get(VARIANT_KEY)
        parts = ([str(v)] if v is not None else []) + [f"{k}={_text(r.get(k))}" for k in varying[v]]
        series.setdefault(", ".join(parts) or "all trials", []).append(r)
    return series


def _by_variant(rows: list[dict]) -> dict[Any, list[dict]]:
    return {v: [r for r in rows if r.get(VARIANT_KEY) == v] for v in dict.fromkeys(r.get(VARIANT_KEY) for r in rows)}


def _values(rows: list[dict], key: str) -> list[str]:
    """The distinct values of `key` among `rows` as text, in numeric order where they are numbers."""
    seen: dict[str, Any] = {}
    for r in rows:
        if key in r:
            seen.setdefault(_text(r[key]), r[key])
    return sorted(seen, key=seen.__getitem__) if all(_is_number(v) for v in seen.values()) else list(seen)


# ------------------------------------------------------------------------------------------- onset

def _onsets(series: dict[str, list[dict]], scales: list[int], rules: Sequence[Rule],
            bootstrap: int) -> tuple[dict[str, dict], dict[str, str]]:
    """estimate_onset per parameterisation; one missing a scale is skipped (its N* would claim
    "keeps working" where nothing was measured)."""
    onset, skipped = {}, {}
    for label, rows in series.items():
        at = [[r for r in rows if r.get(SCALE_KEY) == n] for n in scales]
        if missing := [str(n) for n, here in zip(scales, at) if not here]:
            skipped[label] = f"no finished trial at N={', '.join(missing)}"
            continue
        values = {r.metric: [[row.get(r.metric, math.nan) for row in here] for here in at] for r in rules}
        onset[label] = estimate_onset(scales, values, rules, bootstrap)
    return onset, skipped


def _onset_html(onset: dict[str, dict], skipped: dict[str, str], rules: Sequence[Rule], bootstrap: int) -> str:
    text = ("<p>N* is the smallest scale N of the sweep at which the seed mean of every metric meets its rule, "
            "and so does every larger N (diffusion starts working and keeps working); none when no N "
            "qualifies. Interval: the seeds at each N are resampled with replacement "
            f"({bootstrap} times) and N* recomputed; [low, high] spans the 2.5 to 97.5 percentiles of the "
            "resampled N* that exist, and the found share is the share of resamples that have one (low: the "
            "onset itself is uncertain).</p><ul>" +
            "".join(f"<li><code>{html.escape(str(r))}</code></li>" for r in rules) + "</ul>")
    if onset:
        text += _grid_html(["parameterisation", "N*", "interval", "found share"], [
            [html.escape(label), str(e["onset"]) if e["onset"] is not None else "none",
             f"[{e['low']}, {e['high']}]" if e["low"] is not None else "&ndash;", f"{e['found_share']:.0%}"]
            for label, e in onset.items()])
    if skipped:
        text += "<p>Not estimated: " + html.escape("; ".join(
            reason if label == "all" else f"{label} ({reason})" for label, reason in skipped.items())) + "</p>"
    return text


# ----------------------------------------------------------------------------------------- figures

def _curves_png(series: dict[str, list[dict]], scales: list[int], rules: Sequence[Rule], path: str) -> str | None:
    """One panel per metric that has values; None when none has."""
    metrics = [m for m in METRICS if any(math.isfinite(r.get(m, math.nan)) for rows in series.values() for r in rows)]
    if not metrics:
        return None
    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig = Figure(figsize=(5.0 * ncols, 3.6 * nrows + 0.3 * math.ceil(len(series) / 3) + 0.4), dpi=DPI,
                 layout="constrained")
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for j, (label, rows) in enumerate(series.items()):
            mean, low, high = np.array([_spread([r.get(metric, math.nan) for r in rows if r.get(SCALE_KEY) == n])
                                        for n in scales]).T
            ax.plot(scales, mean, "o-", ms=3, lw=1.2, color=f"C{j % 10}", label=label)
            ax.fill_between(scales, low, high, color=f"C{j % 10}", alpha=0.2, lw=0)
        for rule in rules:
            if rule.metric == metric:
                ax.axhline(rule.threshold, color="0.4", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_xticks(scales, [str(n) for n in scales])
        ax.minorticks_off()
        ax.set_xlabel("N (training shapes)")
        ax.set_title(metric, fontsize=10)
        ax.grid(alpha=0.3)
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=min(3, len(series)),
               fontsize=9)
    return save_figure(fig, path)


def _heatmaps(meta: dict, rows: list[dict], scales: list[int], out: str) -> list[tuple[str, str]]:
    """Per variant varying at least two keys: the first two (in the sweep's order) as the grid, any
    further ones averaged over; a file per N. Returns (path, caption) pairs."""
    keys = _split_keys(meta)
    made = []
    for v, mine in _by_variant(rows).items():
        grid = [k for k in keys if len(_values(mine, k)) > 1]
        if len(grid) < 2:
            continue
        (ykey, xkey), rest = grid[:2], grid[2:]
        for n in scales or [None]:
            here = [r for r in mine if n is None or r.get(SCALE_KEY) == n]
            if not here:
                continue
            name = "_".join(["heatmap", *([re.sub(r"[^\w.=-]+", "_", str(v))] if v is not None else []),
                             *([f"N{n}"] if n is not None else [])])
            title = ", ".join([*([str(v)] if v is not None else []), *([f"N={n}"] if n is not None else [])])
            path = _heatmap_png(here, ykey, _values(mine, ykey), xkey, _values(mine, xkey),
                                C.join(out, f"{name}.png"), title)
            made.append((path, f"{title or 'all trials'}: seed means over {ykey} x {xkey}" +
                          (f", averaged over {', '.join(rest)}" if rest else "")))
    return made


def _heatmap_png(rows: list[dict], ykey: str, ys: list[str], xkey: str, xs: list[str], path: str,
                 title: str) -> str:
    fig = Figure(figsize=(4.2 * len(HEATMAP_METRICS), 0.5 * len(ys) + 2.4), dpi=DPI, layout="constrained")
    for i, metric in enumerate(HEATMAP_METRICS):
        ax = fig.add_subplot(1, len(HEATMAP_METRICS), i + 1)
        ax.set_title(metric, fontsize=10)
        cells = np.array([[_spread([r.get(metric, math.nan) for r in rows
                                    if _text(r.get(ykey)) == y and _text(r.get(xkey)) == x])[0] for x in xs]
                          for y in ys])
        if not np.isfinite(cells).any():
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        image = ax.imshow(np.ma.masked_invalid(cells), cmap="viridis", vmin=0, vmax=1, aspect="auto")
        fig.colorbar(image, ax=ax, shrink=0.8)
        for (a, b), value in np.ndenumerate(cells):
            dark = bool(np.isfinite(value) and image.norm(value) < 0.5)  # viridis is dark at the low end
            ax.text(b, a, f"{value:.3g}" if np.isfinite(value) else "–", ha="center", va="center", fontsize=9,
                    color="white" if dark else "black")
        ax.set_xticks(range(len(xs)), xs)
        ax.set_yticks(range(len(ys)), ys)
        ax.set_xlabel(xkey)
        ax.set_ylabel(ykey)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------- tables

def _write_csv(path: str, meta: dict, trials: list[_Trial]) -> None:
    keys = list(dict.fromkeys(k for t in meta.get("trials", []) for k in t["params"]))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["trial", "status", "attempts", "seconds", *keys, *METRICS, "error"])
    for t in trials:
        writer.writerow([t.name, t.status, t.state.get("attempts", ""), t.state.get("seconds", ""),
                         *(t.params.get(k, "") for k in keys), *(t.metrics.get(m, "") for m in METRICS),
                         t.state.get("error", "")])
    cache.write_text(path, buf.getvalue())


def _about(meta: dict, trials: list[_Trial], scales: list[int]) -> dict[str, str]:
    counts = Counter(t.status for t in trials)
    mlflow = meta.get("mlflow") or {}
    uri = mlflow.get("tracking_uri", "")
    variants = "; ".join(f"{v}: " + ", ".join(f"{k}={x if isinstance(x, str) else json.dumps(x)}" for k, x in b.items())
                         for v, b in (meta.get("variants") or {}).items())
    return {"name": str(meta.get("name", "")), "base": str(meta.get("base", "")),
            "scale (data.shapes)": ", ".join(map(str, scales)) or "none",
            "variants": variants or "none",
            "space": "; ".join(f"{a['key']}: {a['kind']} {json.dumps(a['values'])}" for a in meta.get("axes", []))
            or "none",
            f"seeds ({SEED_KEY})": ", ".join(map(str, meta.get("seeds", []))) or "none",
            "trials": f"{len(trials)}: " + ", ".join(f"{n} {s}" for s, n in counts.items()),
            "MLflow": (uri if uri.startswith(("http://", "https://")) else f"mlflow ui --backend-store-uri {uri}")
            if uri else "not tracked",
            "experiment": str(mlflow.get("experiment", "")), "parent run": str(mlflow.get("parent_run_id", ""))}


def _trials_html(trials: list[_Trial]) -> str:
    def status(t: _Trial) -> str:
        lines = [line for line in str(t.state.get("error") or "").splitlines() if line.strip()]
        return html.escape(t.status + (f": {lines[-1][:200]}" if lines else ""))

    header = ["trial", "status", "seconds", *(html.escape(m).replace("_", "_<wbr>") for m in METRICS)]
    return _grid_html(header, [[html.escape(t.name), status(t), _fmt(t.state.get("seconds")),
                                *(_fmt(t.metrics.get(m)) for m in METRICS)] for t in trials])


def _grid_html(header: list[str], rows: list[list[str]]) -> str:
    """A table with a header row; cells are HTML already."""
    return ("<table><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>" +
            "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows) + "</table>")


# ------------------------------------------------------------------------------------------ helpers

def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _text(v: Any) -> str:
    """A value as trial names write it (floats to 3 significant digits)."""
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if _is_number(v) and math.isfinite(v) else ""


def _spread(values: list[float]) -> tuple[float, float, float]:
    """Mean, min and max of the finite values (NaN when there are none)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    return (float(x.mean()), float(x.min()), float(x.max())) if x.size else (math.nan,) * 3
