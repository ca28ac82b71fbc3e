"""Reconstructions: decode fitted fields to meshes and compare them with the ground truth.

For the first `fit.recon_count` fitted shapes: extract the mesh of each field (evaluation toolkit),
write it to `recon/<shape_id>.ply` in the shape's original frame, and measure, in the normalised
frame, Chamfer distance against the ingested surface points and volumetric IoU from SDF signs at the
ingested query points. Figures: `recon/recon.png` (the meshes) and `recon/fit_loss.png` (the
distribution of final fitting losses). Everything also goes to metrics.json and the active MLflow run.
"""

from __future__ import annotations

import logging
from typing import Any

import fsspec
import numpy as np
import torch

from raywsl import layout as L
from raywsl.config import Config
from raywsl import tracking
from raywsl.eval import figures
from raywsl.eval.distances import chamfer
from raywsl.eval.extract import extract_meshes
from raywsl.eval.run import update_metrics_file
from raywsl.eval.shape import iou_from_sdf
from raywsl.fit.fields import Field
from raywsl.ingest.sampling import sample_surface, shape_rng
from raywsl.store.rows import DONE, RowStore

log = logging.getLogger(__name__)

RECON_POINTS = 2048  # surface points per shape for the Chamfer distance (the evaluation default)
DECODE_BATCH = 8  # fields decoded at once


def surface_chamfer(mesh, truth: np.ndarray, seed: int, shape_id: str) -> tuple[float, str]:
    """Chamfer distance of a decoded mesh to the (thinned) ground-truth surface points `truth`, by
    this module's convention; (nan, reason) when the mesh has no surface to sample."""
    if mesh is None:
        return float("nan"), "no surface"
    try:
        cloud = sample_surface(mesh, RECON_POINTS, shape_rng(seed, shape_id))[0]
    except ValueError as e:  # no faces, or zero area
        return float("nan"), f"no surface: {e}"
    return chamfer(cloud, truth), ""


def thin_surface(surface: np.ndarray) -> np.ndarray:
    """The ingested surface points as reconstructions are compared against them: every k-th, ~RECON_POINTS."""
    return surface[:: max(1, len(surface) // RECON_POINTS)]


def reconstruct(cfg: Config, store: RowStore, inp: Any, field: Field) -> dict[str, Any]:
    """`inp`: the fit's input (fit/inputs.py), which gives the ground truth of the shapes."""
    run = L.RunLayout(cfg.run_dir)
    rows = np.flatnonzero(store.status() == DONE)[: cfg.fit.recon_count]
    fs, out = fsspec.core.url_to_fs(run.recon)
    fs.makedirs(out, exist_ok=True)
    ids = store.row_meta()[L.SHAPE_ID]
    device = "cuda" if cfg.fit.device != "cpu" and torch.cuda.is_available() else "cpu"
    per_shape, meshes = [], []
    for start in range(0, len(rows), DECODE_BATCH):
        chunk = rows[start:start + DECODE_BATCH]
        weights = torch.from_numpy(store.group[L.ROW_WEIGHTS].get_orthogonal_selection((chunk, slice(None))))
        fields = field.bind(weights.to(device))
        truth = inp.truth(chunk)
        center, scale, gt_sdf, gt_surface = truth[L.CENTER], truth[L.SCALE], truth[L.SDF], truth[L.SURFACE]
        with torch.no_grad():
            normalised = extract_meshes(fields, len(chunk), cfg.fit.recon_resolution, device=device)
            pred_sdf = fields(torch.from_numpy(truth[L.POINTS]).to(device)).cpu().numpy()
        for j, (row, ex) in enumerate(zip(chunk, normalised)):
            shape_id = str(ids[row])
            entry = {"row": int(row), "shape_id": shape_id, "iou": iou_from_sdf(pred_sdf[j], gt_sdf[j]),
                     "cd": float("nan"), "reason": ex.reason}
            if ex.mesh is not None:
                entry["cd"], why = surface_chamfer(ex.mesh, thin_surface(gt_surface[j]), cfg.seed, shape_id)
                entry["reason"] = entry["reason"] or why
                original = ex.mesh.copy()
                original.vertices = original.vertices / scale[j] + center[j]
                with fs.open(L.join(out, f"{shape_id}.ply"), "wb") as f:
                    f.write(original.export(file_type="ply"))
            per_shape.append(entry)
            meshes.append(ex.mesh)

    cds = np.array([e["cd"] for e in per_shape])
    loss = store.group[L.FIT_LOSS][:][store.status() == DONE]
    result = {
        "recon_count": len(per_shape),
        "recon_cd_mean": float(np.nanmean(cds)) if np.isfinite(cds).any() else float("nan"),
        "recon_cd_median": float(np.nanmedian(cds)) if np.isfinite(cds).any() else float("nan"),
        "recon_iou_mean": float(np.mean([e["iou"] for e in per_shape])),
        "recon_no_surface": int(sum(e["reason"] != "" for e in per_shape)),
        "fit_loss_median": float(np.median(loss)), "fit_loss_p95": float(np.quantile(loss, 0.95)),
    }
    figures.render_meshes(meshes, L.join(out, "recon.png"), titles=[e["shape_id"] for e in per_shape])
    figures.plot_histogram({"final loss": loss}, L.join(out, "fit_loss.png"), xlabel=f"{cfg.fit.loss} loss")
    update_metrics_file(run.metrics, {**result, "recon": {
        "conventions": {"cd": f"Chamfer (eval convention) between {RECON_POINTS} points of the decoded mesh "
                              f"and the ingested surface points, normalised frame",
                        "iou": "IoU of sdf < 0 at the ingested query points"},
        "shapes": per_shape}})
    tracking.log_metrics(result)
    for name in ("recon.png", "fit_loss.png"):
        tracking.log_figure(L.join(out, name))
    log.info("recon: %s", ", ".join(f"{k}={v:.4g}" for k, v in result.items()))
    return result
