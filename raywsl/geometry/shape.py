"""Reconstruction metrics of one shape against its ground truth: F-score, normal consistency,
volumetric IoU. Clouds are (n, 3) arrays in normalised units (shapes in the unit sphere); distances
are exact (float64 k-d trees).

- F-score at tau (Tatarchenko et al. 2019, "What do single-view 3D reconstruction networks learn?"):
  precision = share of predicted points closer than tau (strictly) to the ground-truth cloud,
  recall = share of ground-truth points closer than tau to the predicted cloud, F = 2PR / (P + R)
  (0 when both are 0). Euclidean, not squared, distances. Default tau = 0.01, 0.5 % of the unit
  sphere's diameter. tau must sit well above the sampling gap of the clouds, or F measures the point
  count rather than the shape: two independent samples of one corpus surface (area 2-9) are
  0.015-0.033 apart on average and score F = 0.07-0.29 at 2,048 points, 0.002-0.005 apart and
  F = 0.97-1.00 at 100,000. Use >= 100,000 points at tau = 0.01 (`RECOMMENDED_POINTS`).
- Normal consistency (Occupancy Networks' convention): for each predicted point the |cos| between
  its normal and the normal of its nearest ground-truth point, averaged, and the same from the
  ground-truth side; the mean of both directions. Absolute value: the orientation of extracted
  surfaces (marching cubes on a field) is not trusted, only the tangent plane. 1 is best.
- Surface Chamfer of a decoded mesh (`surface_chamfer`, the reconstructions' and the stability
  experiment's convention): RECON_POINTS seeded surface points of the mesh against the ground-truth
  surface points thinned to ~RECON_POINTS (`thin_surface`), Chamfer as in distances.py.
- Volumetric IoU from signed distances at the same query points: inside = sdf < 0 (the surface
  itself, sdf = 0, is outside), IoU = |inside_pred and inside_gt| / |inside_pred or inside_gt|; 1
  when both are empty (they agree). Volumetric only if the query points are uniform in a volume that
  contains both shapes (e.g. the bounding cube [-1, 1]^3), not near-surface samples.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.spatial import cKDTree

from raywsl.geometry.distances import chamfer
from raywsl.geometry.sampling import sample_surface, shape_rng

DEFAULT_TAU = 0.01
RECOMMENDED_POINTS = 100_000
RECON_POINTS = 2048  # surface points per shape of `surface_chamfer` (the evaluation default)


def surface_chamfer(mesh, truth: np.ndarray, seed: int, shape_id: str) -> tuple[float, str]:
    """Chamfer distance of a decoded mesh to the (thinned) ground-truth surface points `truth`;
    (nan, reason) when the mesh has no surface to sample."""
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


class FScore(NamedTuple):
    f: float
    precision: float
    recall: float


def _cloud(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 3 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty point cloud (points, 3), got shape {x.shape}")
    return x


def fscore(pred: np.ndarray, gt: np.ndarray, tau: float = DEFAULT_TAU) -> FScore:
    """F-score, precision and recall of the cloud `pred` against `gt` at distance `tau`."""
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    pred, gt = _cloud(pred, "pred"), _cloud(gt, "gt")
    precision = float(np.mean(cKDTree(gt).query(pred)[0] < tau))
    recall = float(np.mean(cKDTree(pred).query(gt)[0] < tau))
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return FScore(f, precision, recall)


def normal_consistency(pred_points: np.ndarray, pred_normals: np.ndarray,
                       gt_points: np.ndarray, gt_normals: np.ndarray) -> float:
    """Mean |cos| between the normals of nearest-neighbour points, both directions averaged.
    Normals need not be unit length (they are normalised here)."""
    pred_points, gt_points = _cloud(pred_points, "pred_points"), _cloud(gt_points, "gt_points")
    pn, gn = _unit(pred_normals, len(pred_points), "pred_normals"), _unit(gt_normals, len(gt_points), "gt_normals")
    to_gt = cKDTree(gt_points).query(pred_points)[1]
    to_pred = cKDTree(pred_points).query(gt_points)[1]
    forward = np.abs(np.sum(pn * gn[to_gt], axis=1)).mean()
    backward = np.abs(np.sum(gn * pn[to_pred], axis=1)).mean()
    return float((forward + backward) / 2)


def _unit(normals, n: int, name: str) -> np.ndarray:
    normals = np.asarray(normals, dtype=np.float64)
    if normals.shape != (n, 3):
        raise ValueError(f"{name} must have shape ({n}, 3) like its points, got {normals.shape}")
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    if not (length > 0).all():
        raise ValueError(f"{name} contains zero-length normals")
    return normals / length


def iou_from_sdf(pred_sdf: np.ndarray, gt_sdf: np.ndarray) -> float:
    """Volumetric IoU of the insides (sdf < 0) of two signed distance fields sampled at the same
    query points."""
    pred_sdf, gt_sdf = np.asarray(pred_sdf), np.asarray(gt_sdf)
    if pred_sdf.shape != gt_sdf.shape:
        raise ValueError(f"pred_sdf and gt_sdf must be values at the same points, got shapes "
                         f"{pred_sdf.shape} and {gt_sdf.shape}")
    pred_in, gt_in = pred_sdf < 0, gt_sdf < 0
    union = np.count_nonzero(pred_in | gt_in)
    return float(np.count_nonzero(pred_in & gt_in) / union) if union else 1.0
