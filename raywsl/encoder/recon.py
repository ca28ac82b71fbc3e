"""How well the trained encoder reconstructs shapes: the figures of the train-encoder artifact.

For the first encoder.eval_count ingested held-out shapes (store/split.py: never fitted, never seen by the
encoder) and as many of the encoder's training shapes: encode a seeded subset of encoder.points of the
shape's surface points (model.eval_cloud), decode the row (geometry/extract.py, encoder.resolution) and
measure Chamfer to the shape's ingested surface points -- the convention of the recon stage
(geometry/shape.py `surface_chamfer`), so the numbers compare with recon/metrics.json. For comparison:
the fitted rows of the same training shapes (what the encoder was trained to reproduce) decoded alike, and
the mean training row (the encoder's start: z = 0) against the held-out shapes. In weight space: R^2 of
the encoder's standardised rows against the fitted ones over up to R2_ROWS training shapes (held-out
shapes have no fitted row).

Written into the artifact: metrics.json (the figures, per-shape entries, conventions) and
encoder_recon.png (rows: held-out shapes encoded, training shapes encoded, the same training shapes' fitted
rows; RENDER of each).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from raywsl import cache
from raywsl import contract as C
from raywsl.config import Config
from raywsl.encoder.model import eval_cloud, from_folder, r_squared
from raywsl.geometry import figures
from raywsl.geometry.extract import decode_device, decode_rows
from raywsl.geometry.shape import RECON_POINTS, surface_chamfer, thin_surface
from raywsl.models.fields import field_of
from raywsl.store.rows import DONE, RowStore
from raywsl.store.split import held_out_range

log = logging.getLogger(__name__)

R2_ROWS = 256  # training rows the weight-space R^2 is measured on (their clouds are read at once)
RENDER = 4  # meshes per row of encoder_recon.png
CONVENTIONS = {
    "cd": f"Chamfer (the recon stage's convention) between {RECON_POINTS} points of the decoded mesh and the "
          f"ingested surface points, normalised frame; the encoder sees a seeded subset of encoder.points of them",
    "heldout": "held-out shapes (never fitted, never seen by the encoder): encoded, decoded",
    "train": "the encoder's training shapes: encoded, decoded",
    "fitted": "the same training shapes' fitted rows, decoded (what the encoder was trained to reproduce)",
    "mean_row": "the mean training row (a fresh encoder's output), decoded, against each held-out shape",
    "r2_train": "1 - SSE/SST of the encoder's standardised rows against the fitted ones, over up to "
                f"{R2_ROWS} training shapes (SST around each parameter's mean)",
}


def reconstruct(cfg: Config, plan: C.Plan, out: str, samples: RowStore, weights: RowStore,
                rows: np.ndarray) -> dict[str, Any]:
    """The figures of the encoder in `out` (trained on `rows`), also written to out/metrics.json and drawn
    in out/encoder_recon.png."""
    ec = cfg.encoder
    device = decode_device(cfg.fit.device)
    enc = from_folder(out, field_of(weights), device)
    held = held_out_range(samples)
    held = (np.flatnonzero(samples.status(held) == DONE) + held.start)[:ec.eval_count]
    train = rows[:ec.eval_count]
    if not len(held):
        log.warning("train-encoder: no ingested held-out shape (ingest.test_fraction 0?): no held-out figures")

    held_ids, held_seen, held_truth = _clouds(samples, held, ec.points, cfg.seed)
    train_ids, train_seen, train_truth = _clouds(samples, train, ec.points, cfg.seed)
    fitted = torch.from_numpy(weights.read(C.ROW_WEIGHTS, train))
    decoded = decode_rows(enc.field.bind, torch.cat([enc.encode(held_seen), enc.encode(train_seen), fitted,
                                                     enc.standardizer.mean[None]]), ec.resolution, device)
    held_ex, train_ex = decoded[:len(held)], decoded[len(held):len(held) + len(train)]
    fitted_ex, mean_ex = decoded[len(held) + len(train):-1], decoded[-1]

    def cd(ex, truth: np.ndarray, shape_id: str) -> tuple[float, str]:
        value, why = surface_chamfer(ex.mesh, thin_surface(truth), cfg.seed, shape_id)
        return value, ex.reason or why

    shapes = []
    for row, shape_id, truth, ex in zip(held, held_ids, held_truth, held_ex):
        value, reason = cd(ex, truth, shape_id)
        shapes.append({"set": "heldout", "row": int(row), "shape_id": shape_id, "encoder_cd": value,
                       "mean_row_cd": cd(mean_ex, truth, shape_id)[0], "reason": reason})
    for row, shape_id, truth, ex, fit_ex in zip(train, train_ids, train_truth, train_ex, fitted_ex):
        value, reason = cd(ex, truth, shape_id)
        shapes.append({"set": "train", "row": int(row), "shape_id": shape_id, "encoder_cd": value,
                       "fitted_cd": cd(fit_ex, truth, shape_id)[0], "reason": reason})

    def column(subset: str, key: str) -> np.ndarray:
        return np.array([e[key] for e in shapes if e["set"] == subset], dtype=np.float64)

    def stat(values: np.ndarray, fn) -> float:
        return float(fn(values[np.isfinite(values)])) if np.isfinite(values).any() else float("nan")

    result = {
        "encoder_heldout_count": len(held),
        "encoder_heldout_cd_median": stat(column("heldout", "encoder_cd"), np.median),
        "encoder_heldout_cd_mean": stat(column("heldout", "encoder_cd"), np.mean),
        "encoder_heldout_no_surface": int(sum(e["reason"] != "" for e in shapes if e["set"] == "heldout")),
        "encoder_mean_row_cd_median": stat(column("heldout", "mean_row_cd"), np.median),
        "encoder_train_count": len(train),
        "encoder_train_cd_median": stat(column("train", "encoder_cd"), np.median),
        "encoder_fitted_cd_median": stat(column("train", "fitted_cd"), np.median),
        **_r_squared(enc, samples, weights, rows[:R2_ROWS], cfg.seed, ec.points),
    }
    meshes, titles = [], []
    grid = (("held-out", held_ex, held_ids, column("heldout", "encoder_cd")),
            ("encoded", train_ex, train_ids, column("train", "encoder_cd")),
            ("fitted", fitted_ex, train_ids, column("train", "fitted_cd")))
    for name, exs, ids, values in grid:
        shown = min(RENDER, len(exs))
        meshes += [ex.mesh for ex in exs[:shown]] + [None] * (RENDER - shown)
        titles += [f"{name} {i[:20]}: CD {v:.2g}" for i, v in zip(ids[:shown], values)] + [""] * (RENDER - shown)
    figures.render_meshes(meshes, C.join(out, C.ENCODER_RECON), titles=titles, ncols=RENDER)
    cache.write_json(C.join(out, C.STAGE_METRICS), {**result, "encoder": {"conventions": CONVENTIONS,
                                                                          "shapes": shapes}})
    log.info("train-encoder: %s", ", ".join(f"{k}={v:.4g}" for k, v in result.items()))
    return result


def _clouds(samples: RowStore, idx: np.ndarray, points: int, seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(shape ids, the clouds the encoder sees, the truth reconstructions are compared with) of rows `idx`."""
    if not len(idx):
        return [], np.zeros((0, 1, 3), np.float32), np.zeros((0, 1, 3), np.float32)
    ids = [str(i) for i in samples.read(C.SHAPE_ID, idx)]
    surface = samples.read(C.SURFACE, idx)
    return ids, np.stack([eval_cloud(s, points, seed, i) for s, i in zip(surface, ids)]), surface


def _r_squared(enc, samples: RowStore, weights: RowStore, rows: np.ndarray, seed: int,
               points: int) -> dict[str, Any]:
    seen = _clouds(samples, rows, points, seed)[1]
    target = enc.standardizer.forward(torch.from_numpy(weights.read(C.ROW_WEIGHTS, rows)))
    pred = enc.standardizer.forward(enc.encode(seen))
    return {"encoder_r2_train": r_squared(pred, target), "encoder_r2_rows": len(rows)}
