"""Generation metrics from distance matrices, as defined in the weight-space literature
(papers/004 appendix 9, following PointFlow / HyperDiffusion / LION), and novelty / memorisation.

Notation: generated set G (P in the papers), reference set R (Q); D_gr[i, j] = D(g_i, r_j), D_gg and
D_rr within each set. The functions take matrices, so any distance works; `generation_metrics`
builds them from point clouds with `raywsl.geometry.distances` (CD and EMD, conventions there).

- MMD (minimum matching distance, "mMD"): mean over references of the distance to their nearest
  generated shape, mean_j min_i D_gr[i, j]. Lower is better.
- COV (coverage): share of references that are the nearest reference of at least one generated
  shape, |{argmin_j D_gr[i, j] : i in G}| / |R|. Higher is better. Ties: every reference at the
  minimal distance of a row is covered (argmin as a set), so a generated set equal to the reference
  set covers 100 % even if the reference holds duplicate shapes.
- 1-NNA: accuracy of the leave-one-out 1-nearest-neighbour classifier of "generated or reference"
  over G u R (each shape is classified by the label of its nearest other shape). 50 % is ideal
  (indistinguishable sets), 100 % means fully separable sets. Ties: a shape whose nearest distance
  is shared by s shapes of its own set and o of the other counts s / (s + o), the expected accuracy
  of a uniformly random tie-break (PointFlow's `knn` leaves ties to torch.topk's order).
  Below 50 % means shapes sit closer to the other set than to their own: an exact copy (G = R, no
  duplicates within a set) scores 0 %, because every shape's nearest other shape is its own copy at
  distance 0 in the other set, a unique minimum, so no tie rule applies. That is why 1-NNA is read
  together with novelty: a memorising generator looks "better than ideal".
- Novelty / memorisation: for each generated shape the CD to its nearest training shape (and its
  index); the memorisation rate is the share below a threshold. The threshold must be read against
  the sampling noise floor: two independent 2,048-point samples of one corpus shape are at CD
  5e-4 to 3e-3 (median 1.4e-3), while the nearest distinct corpus shapes are at 1.7e-3 and up, so at
  2,048 points a copy of a training shape is not reliably below 1e-3. `raywsl eval` therefore
  calibrates the threshold by default on resampled training shapes (`run.resampling_noise`).

The reference set's internal matrix D_rr is the costliest part of repeated evaluations against one
reference (it does not change): `generation_metrics(cache=...)` keeps it in a dict or as .npy files
in a folder (local or fsspec URL), keyed by a hash of the reference clouds and the distance settings.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Callable

import fsspec
import numpy as np

from raywsl.geometry.distances import (DEFAULT_EPS, chamfer_matrix, chamfer_matrix_fused, chamfer_matrix_kdtree,
                                    emd_matrix, resolve_device)
from raywsl.kernels import KernelUnavailable, check

log = logging.getLogger(__name__)

DEFAULT_MEMORISATION_THRESHOLD = 1e-3  # for library callers; `raywsl eval` calibrates its own (module doc)


def _matrix(d, name: str, shape: tuple[int | None, int | None]) -> np.ndarray:
    d = np.asarray(d, dtype=np.float64)
    if d.ndim != 2 or any(want is not None and got != want for got, want in zip(d.shape, shape)):
        raise ValueError(f"{name} must be a matrix of shape {shape} (None: any), got {d.shape}")
    if d.size == 0:
        raise ValueError(f"{name} is empty: both sets need at least one shape")
    if np.isnan(d).any():
        raise ValueError(f"{name} contains NaN")
    return d


def mmd(d_gr: np.ndarray) -> float:
    """Mean over references (columns) of the distance to the nearest generated shape (rows)."""
    return float(_matrix(d_gr, "d_gr", (None, None)).min(axis=0).mean())


def coverage(d_gr: np.ndarray) -> float:
    """Share of references (columns) that are the nearest reference of some generated shape (row);
    all references tied at a row's minimum count."""
    d = _matrix(d_gr, "d_gr", (None, None))
    return float((d == d.min(axis=1, keepdims=True)).any(axis=0).mean())


def one_nna(d_gg: np.ndarray, d_rr: np.ndarray, d_gr: np.ndarray) -> float:
    """Leave-one-out 1-NN accuracy over G u R; ties count the share of own-set shapes among the
    tied nearest ones."""
    d_gr = _matrix(d_gr, "d_gr", (None, None))
    ng, nr = d_gr.shape
    d_gg, d_rr = _matrix(d_gg, "d_gg", (ng, ng)), _matrix(d_rr, "d_rr", (nr, nr))
    d = np.block([[d_gg, d_gr], [d_gr.T, d_rr]])
    np.fill_diagonal(d, np.inf)  # leave one out
    generated = np.arange(ng + nr) < ng
    tied = d == d.min(axis=1, keepdims=True)
    own = (tied & (generated[None, :] == generated[:, None])).sum(axis=1)
    return float(np.mean(own / tied.sum(axis=1)))


def fastest_chamfer_matrix(A, B=None, device: str = "auto") -> np.ndarray:
    """The Chamfer matrix by the faster path for the device: on CUDA the fused Triton kernel
    (`chamfer_matrix_fused`: compute-bound, vs the tiled torch path's ~100 MB of memory traffic per
    pair), or the tiled torch path where triton is missing (with a warning); per-pair k-d trees on a
    CPU, where torch's threads collapse when the cores are shared (19-115 pairs/s vs 105-121 for the
    k-d trees, 2,048 points, 2 oversubscribed cores; 430-730 vs ~180 when free). Other devices: the
    tiled torch path."""
    dev = resolve_device(device)
    if dev.type == "cpu":
        return chamfer_matrix_kdtree(A, B)
    if dev.type == "cuda":
        try:
            check(dev, "fastest_chamfer_matrix")
        except KernelUnavailable as e:
            log.warning("%s; using the tiled torch path", e)
        else:
            return chamfer_matrix_fused(A, B, device=dev)
    return chamfer_matrix(A, B, device=dev)


def set_metrics(d_gr: np.ndarray, d_gg: np.ndarray, d_rr: np.ndarray) -> dict[str, float]:
    """{"mmd", "cov", "1nna"} from the three matrices of one distance."""
    return {"mmd": mmd(d_gr), "cov": coverage(d_gr), "1nna": one_nna(d_gg, d_rr, d_gr)}


Cache = MutableMapping | str | os.PathLike


def _cached(cache: Cache | None, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    if cache is None:
        return compute()
    if isinstance(cache, MutableMapping):
        if key not in cache:
            cache[key] = compute()
        return cache[key]
    fs, folder = fsspec.core.url_to_fs(os.fspath(cache))
    path = f"{folder.rstrip('/')}/{key}.npy"
    if fs.exists(path):
        with fs.open(path, "rb") as f:
            return np.load(f)
    d = compute()
    fs.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with fs.open(tmp, "wb") as f:
        np.save(f, d)
    fs.mv(tmp, path)  # a concurrent reader never sees half a file
    return d


def reference_key(reference: np.ndarray, distance: str) -> str:
    """Cache key of D_rr: the distance (with its settings) and a hash of the float32 clouds."""
    ref = np.ascontiguousarray(reference, dtype=np.float32)
    digest = hashlib.sha256(repr(ref.shape).encode() + ref.tobytes()).hexdigest()[:24]
    return f"d_rr-{distance}-{digest}"


def generation_metrics(generated, reference, distances=("cd", "emd"), device: str = "auto",
                       cache: Cache | None = None, emd_eps: float = DEFAULT_EPS,
                       emd_exact: bool = False, matrices: dict | None = None) -> dict[str, float]:
    """MMD, COV and 1-NNA of the generated clouds (ng, n, 3) against the reference clouds (nr, n, 3)
    for each distance in `distances` ("cd": Chamfer, "emd": Earth mover's), as
    {"mmd_cd", "cov_cd", "1nna_cd", "mmd_emd", ...}. D_rr is taken from / stored in `cache` (a
    dict, or a folder, local or fsspec URL, for .npy files) when given. A `matrices` dict, if
    given, receives {distance: (D_gr, D_gg, D_rr)} so callers can reuse them (histograms, novelty)."""
    fns = {"cd": (lambda a, b=None: fastest_chamfer_matrix(a, b, device=device), "cd"),
           "emd": (lambda a, b=None: emd_matrix(a, b, device=device, exact=emd_exact, eps=emd_eps),
                   "emd-exact" if emd_exact else f"emd-eps{emd_eps:g}")}
    unknown = [d for d in distances if d not in fns]
    if unknown or not distances:
        raise ValueError(f"distances must be a non-empty list from {sorted(fns)}, got {list(distances)}")
    generated, reference = np.asarray(generated, np.float32), np.asarray(reference, np.float32)
    out = {}
    for name in distances:
        fn, key = fns[name]
        d_rr = _cached(cache, reference_key(reference, key), lambda: fn(reference))
        d_gr, d_gg = fn(generated, reference), fn(generated)
        if matrices is not None:
            matrices[name] = (d_gr, d_gg, d_rr)
        metrics = set_metrics(d_gr, d_gg, d_rr)
        out.update({f"{metric}_{name}": value for metric, value in metrics.items()})
    return out


@dataclass
class Novelty:
    nearest_cd: np.ndarray  # (ng,) CD of each generated shape to its nearest training shape
    nearest_index: np.ndarray  # (ng,) index of that training shape (the lowest one on ties)
    threshold: float
    memorisation_rate: float  # share of generated shapes with nearest_cd < threshold


def nearest(d_gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distance, index) of the nearest column for each row of a distance matrix."""
    d = _matrix(d_gt, "d_gt", (None, None))
    index = d.argmin(axis=1)
    return d[np.arange(len(d)), index], index


def memorisation_rate(nearest_distance: np.ndarray, threshold: float = DEFAULT_MEMORISATION_THRESHOLD) -> float:
    """Share of generated shapes closer than `threshold` (strictly) to their nearest training shape."""
    return float(np.mean(np.asarray(nearest_distance) < threshold))


def novelty(generated, training, threshold: float = DEFAULT_MEMORISATION_THRESHOLD,
            device: str = "auto") -> Novelty:
    """Nearest training shape (Chamfer) of every generated cloud, and the memorisation rate."""
    distance, index = nearest(fastest_chamfer_matrix(generated, training, device=device))
    return Novelty(distance, index, threshold, memorisation_rate(distance, threshold))
