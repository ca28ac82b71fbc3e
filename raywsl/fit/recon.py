"""The recon stage: decode fitted fields to meshes and compare them with the ground truth.

For the first `fit.recon_count` fitted training shapes (in the training order, so a run with more
shapes reconstructs the same ones): extract the mesh of each field, write it to `recon_file(row, id)`
(`<row>-<hash of the id>.ply`: a shape id is data, e.g. `chair/1a2b/model` or `../x`, never a path)
in the shape's original frame, and measure, in the normalised frame, Chamfer distance against the
ingested surface points (geometry/shape.py's convention) and volumetric IoU from SDF signs at the
ingested query points. Figures: `recon.png` (the meshes) and `fit_loss.png` (the distribution of the
final fitting losses of the run's training shapes). The artifact (recon/ in the run folder) holds them
with `metrics.json`; the figures also go to the active MLflow run.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np
import torch

from raywsl import cache
from raywsl import contract as C
from raywsl import tracking
from raywsl.config import Config
from raywsl.fit.inputs import INPUTS
from raywsl.geometry import figures
from raywsl.geometry.extract import decode_device, decode_rows
from raywsl.geometry.shape import RECON_POINTS, iou_from_sdf, surface_chamfer, thin_surface
from raywsl.models.fields import field_of
from raywsl.store.rows import StoreError
from raywsl.store.split import training_rows
from raywsl.store.weights import open_weights

log = logging.getLogger(__name__)

CONVENTIONS = {"cd": f"Chamfer (eval convention) between {RECON_POINTS} points of the decoded mesh and the "
                     f"ingested surface points, normalised frame",
               "iou": "IoU of sdf < 0 at the ingested query points"}


def recon_file(row: int, shape_id: str) -> str:
    """The file name of a reconstruction: the store row, then the first 8 hex digits of the SHA-1 of
    the shape id (which metrics.json pairs with it): flat, unique per row and safe whatever the id
    holds ('/', '..', characters a file system refuses)."""
    return f"{row:07d}-{hashlib.sha1(shape_id.encode()).hexdigest()[:8]}.ply"


def reconstruct(cfg: Config, plan: C.Plan, out: str) -> dict[str, Any]:
    """Write the reconstructions of the run's first fitted training shapes into `out`; returns the
    figures (also in out/metrics.json)."""
    try:
        store = open_weights(plan.weights)
    except StoreError as e:
        raise StoreError(f"{e}: run `raywsl fit` with this config first") from e
    fitted = training_rows(store, cfg.data.shapes)
    if not len(fitted):
        raise StoreError(f"{store.path}: no fitted training shape to reconstruct: run `raywsl fit` with this "
                         f"config first")
    field = field_of(store)
    inp = INPUTS[cfg.fit.samples](cfg, plan)
    rows = fitted[: cfg.fit.recon_count]
    first = int(rows[0]) if len(rows) else 0
    ids = store.row_meta(slice(first, int(rows[-1]) + 1 if len(rows) else 0))[C.SHAPE_ID]  # only these rows' ids
    device = decode_device(cfg.fit.device)
    weights = torch.from_numpy(store.group[C.ROW_WEIGHTS].get_orthogonal_selection((rows, slice(None))))
    extracted = decode_rows(field.bind, weights, cfg.fit.recon_resolution, device)
    truth = inp.truth(rows)
    with torch.no_grad():
        pred_sdf = torch.cat([field.bind(weights[k:k + 8].to(device))(
            torch.from_numpy(truth[C.POINTS][k:k + 8]).to(device)).cpu() for k in range(0, len(rows), 8)]).numpy()
    per_shape, meshes = [], []
    for j, (row, ex) in enumerate(zip(rows, extracted)):
        shape_id = str(ids[row - first])
        entry = {"row": int(row), "shape_id": shape_id, "file": "",
                 "iou": iou_from_sdf(pred_sdf[j], truth[C.SDF][j]), "cd": float("nan"), "reason": ex.reason}
        if ex.mesh is not None:
            entry["cd"], why = surface_chamfer(ex.mesh, thin_surface(truth[C.SURFACE][j]), cfg.seed, shape_id)
            entry["reason"] = entry["reason"] or why
            original = ex.mesh.copy()
            original.vertices = original.vertices / truth[C.SCALE][j] + truth[C.CENTER][j]
            entry["file"] = recon_file(int(row), shape_id)
            cache.write_bytes(C.join(out, entry["file"]), original.export(file_type="ply"))
        per_shape.append(entry)
        meshes.append(ex.mesh)
    cds = np.array([e["cd"] for e in per_shape])
    loss = store.group[C.FIT_LOSS].get_orthogonal_selection((fitted,))
    result = {
        "recon_count": len(per_shape),
        "recon_cd_mean": float(np.nanmean(cds)) if np.isfinite(cds).any() else float("nan"),
        "recon_cd_median": float(np.nanmedian(cds)) if np.isfinite(cds).any() else float("nan"),
        "recon_iou_mean": float(np.mean([e["iou"] for e in per_shape])),
        "recon_no_surface": int(sum(e["reason"] != "" for e in per_shape)),
        "fit_loss_median": float(np.median(loss)), "fit_loss_p95": float(np.quantile(loss, 0.95)),
    }
    figures.render_meshes(meshes, C.join(out, C.RECON_GRID), titles=[e["shape_id"] for e in per_shape])
    figures.plot_histogram({"final loss": loss}, C.join(out, C.RECON_LOSSES), xlabel=f"{cfg.fit.loss} loss")
    cache.write_json(C.join(out, C.STAGE_METRICS),
                     {**result, "recon": {"conventions": CONVENTIONS, "shapes": per_shape}})
    log.info("recon: %s", ", ".join(f"{k}={v:.4g}" for k, v in result.items()))
    return result


def log_recon(folder: str) -> dict[str, Any]:
    """The recon artifact's figures and metrics, to the active MLflow run (also when it was reused);
    returns its metrics."""
    metrics = cache.read_json(C.join(folder, C.STAGE_METRICS), {})
    tracking.log_metrics({k: v for k, v in metrics.items() if not isinstance(v, dict)})
    for name in (C.RECON_GRID, C.RECON_LOSSES):
        tracking.log_figure(C.join(folder, name))
    return metrics
