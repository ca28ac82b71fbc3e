"""Distances between point clouds: Chamfer and Earth mover's, for one pair and as pairwise matrices.

Conventions, used everywhere in `raywsl.eval`:

- Chamfer distance, squared Euclidean distances, the sum of both directions:

      CD(X, Y) = mean_x min_y |x - y|^2 + mean_y min_x |x - y|^2

  This is PointFlow's `distChamfer` (`dl.mean(1) + dr.mean(1)`), whose evaluation code HyperDiffusion
  and LION reuse, so MMD-CD values compare with theirs at equal point counts and normalisation. Two
  independent 2,048-point samples of one surface are not at CD 0: sampling alone puts corpus
  shapes in the unit sphere at 5e-4 to 3e-3 (median 1.4e-3), the noise floor of CD at that count.
- Earth mover's distance, the mean Euclidean (not squared) distance under the optimal bijection
  between two clouds of equal size:

      EMD(X, Y) = min over bijections s of (1/n) sum_i |x_i - y_s(i)|

  This is what PointFlow's `emd_approx` estimates (`match_cost / n`, the match cost summing
  Euclidean distances weighted by a matching), again reused by HyperDiffusion and LION. They compute
  it with an approximate CUDA matching (`approxmatch`) of unbounded error; here it is either exact or
  approximate with a bounded, one-sided error, so EMD values are close to but not bit-comparable
  with theirs.

Exact EMD: `scipy.optimize.linear_sum_assignment` on the float64 n x n distance matrix: 0.4-2 s per
pair at 2,048 points on one core (corpus shapes), fine for a few pairs and for small clouds.

Approximate EMD (the default): the auction algorithm with epsilon scaling (Bertsekas), batched over
pairs in torch. Every pair ends with a true bijection in which every point is matched within `eps`
of its best choice at the final prices (eps-complementary slackness), which bounds its mean cost:
exact <= approx <= exact + eps, eps in the units of the clouds (default 1e-3). Measured against exact
on 2,048-point clouds of corpus shapes in the unit sphere (16 + 16 pairs): relative error 0.03 % on
average (max 0.04 %) between distinct shapes (EMD 0.23-0.55), 0.06 % (max 0.12 %) between two
samples of one shape (EMD 0.03-0.07, the hardest case); `benchmarks/eval/bench_distances.py
--emd-pairs 16` measures it, the tests check the bound. Cost: ~50 passes over the n x n cost
matrices per pair, held in memory (float32, 16 MiB per pair at 2,048 points), plus the tail of each
phase, where displaced points bid one at a time: ~20,000 rounds per batch of a dozen small tensor
ops and one host sync each, shared by all pairs of the batch. Hence batches of up to 1,024 pairs on
a GPU; on CPU it runs ~0.6 s per pair (2 free cores; several seconds when they are shared), against
0.4-2 s for the exact assignment.

Pairwise matrices (`chamfer_matrix`, `emd_matrix`) enumerate the pairs to compute (i < j only when a
set is compared with itself: each pair once, zero diagonal, mirrored) and process them `tile` pairs
per step, with no Python loop per pair, writing into a matrix on the device that is copied back
once (Chamfer steps never wait for the device). Chamfer computes squared distances in the expanded
form |x|^2 + |y|^2 - 2 x.y as one batched product of augmented points, [x, |x|^2, 1] . [-2y, 1, |y|^2],
on (tile, rows, m) blocks, min-reduced both ways. `BLOCK` bounds a step's temporary: on CPU 4 pairs
x 256 rows of 2,048-point clouds (cache-sized, fastest), on a GPU 64 whole pairs (2 GiB).
Measured on 2 CPU cores at 2,048 points: with the cores free, 310-730 pairs/s with 2 threads
(185-250 with 1) against ~180 for a k-d tree per pair (1 worker); with the cores oversubscribed (two
other busy processes) the 2-thread path collapses to 19-115 pairs/s, its threads waiting on each
other, while 1 thread gives 84-177 and the k-d trees 105-121. So on a CPU
`generation.fastest_chamfer_matrix` uses the k-d trees (robust, never far behind); either way a
2,048 x 2,048 matrix (4.2 M pairs) takes hours on CPU. On a GPU it is memory-bound at ~100 MB of
traffic per pair (float64): an estimated few minutes on an H100, not measured here.

The fused path (`chamfer_matrix_fused`, the Triton kernel of `raywsl.kernels.chamfer`, what
`generation.fastest_chamfer_matrix` uses on CUDA) never writes a pair's distances to memory: each
program streams one cloud past blocks of the other's points held on chip, keeping running minima,
so it is compute-bound (~1.8e13 distances for 2,048 x 2,048 clouds of 2,048 points: seconds on an
H100 by its peak rates, to be measured with benchmarks/gpu/bench_chamfer.py). It computes the
directed matrix mean_x min_y for A against B and B against A (for A against itself: once, plus its
transpose), each pair centred on the centroid of the cloud minimised over, in float32-level
arithmetic (split TF32 tensor-core products, see that module): max relative error 2e-7 against the
k-d trees on corpus shapes at 2,048 points (6e-8 for the float32 torch path).
It runs on CUDA, and on a CPU only in Triton's interpreter (the tests).

Precision: each pair is first centred on the centroid of its first cloud (distances unchanged; the
expanded form's error grows with |x|^2). On CPU the products are float32: the expanded form loses
digits to cancellation (it can go slightly negative: clamped at 0), ~1e-7 absolute on squared
distances in the unit sphere, ~2e-6 relative on CD against the float64 k-d tree on corpus shapes;
a cloud against a copy of itself gives ~1e-8 instead of 0 (the symmetric diagonal is exactly 0).
That is far below the sampling noise of the metrics. On CUDA the products are float64 (see
`_product_dtype`: immune to TF32). `chamfer` and `chamfer_matrix_kdtree` are float64 and exact.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist

from raywsl.kernels import check
from raywsl.progress import Progress

DEFAULT_EPS = 1e-3  # auction accuracy: exact <= approx EMD <= exact + eps
EPS_SCALING = 4.0  # each auction phase bids with 1/4 of the previous step, from extent / 10 down to eps
# Elements of the largest temporary of a step: 8 MB of float32 on CPU, 2 GiB of float64 on a GPU.
# On CPU, Chamfer steps of 4 pairs x 256 rows x 2,048 points measured fastest on 2 cores (~750
# pairs/s, vs ~650 with whole 16 MB pair matrices): cache-sized blocks. A GPU takes whole pairs.
BLOCK = {"cpu": 1 << 21, "gpu": 1 << 28}
CPU_ROWS = 256
# Float32 cost matrices an EMD batch holds: 512 MiB on CPU (32 pairs of 2,048 points); on a GPU up
# to 16 GiB (1,024 pairs, so more pairs share the sequential tail of the auction) or a quarter of
# the free memory.
EMD_COSTS = {"cpu": 1 << 27, "gpu": 1 << 32}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" is CUDA when torch sees a GPU, else CPU; anything else is passed to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _block(device: torch.device) -> int:
    return BLOCK["cpu" if device.type == "cpu" else "gpu"]


def _product_dtype(device: torch.device) -> torch.dtype:
    """float64 for the distance products on CUDA: training code often enables TF32 globally, which
    would round float32 matmul inputs to 10 bits (errors ~1e-3 on squared distances); float64 is
    immune to that flag and these kernels are memory-bound anyway. CPU (and MPS): float32."""
    return torch.float64 if device.type == "cuda" else torch.float32


def _clouds(a, name: str, dtype=np.float32) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=dtype)
    if a.ndim != 3 or a.shape[2] != 3 or a.shape[1] == 0:
        raise ValueError(f"{name} must be a stack of point clouds (count, points, 3), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or Inf coordinates")
    return a


def _cloud(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 3 or len(x) == 0:
        raise ValueError(f"{name} must be a point cloud (points, 3), got shape {x.shape}")
    return x


def _check_equal_sizes(n: int, m: int) -> None:
    if n != m:
        raise ValueError(f"EMD needs clouds of equal size (a bijection), got {n} and {m} points")


def _centred(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both clouds of each pair moved by the centroid of x, in the product dtype: the distances are
    unchanged, and the expanded form is only accurate near the origin (its error grows with |x|^2)."""
    dtype = _product_dtype(x.device)
    x, y = x.to(dtype), y.to(dtype)
    c = x.mean(1, keepdim=True)
    return x - c, y - c


# --- one pair, exact (float64, CPU) ------------------------------------------------------------------


def chamfer(x: np.ndarray, y: np.ndarray) -> float:
    """CD(x, y) of two clouds (n, 3) and (m, 3), exact in float64 (k-d trees)."""
    x, y = _cloud(x, "x"), _cloud(y, "y")
    return float(np.mean(cKDTree(y).query(x)[0] ** 2) + np.mean(cKDTree(x).query(y)[0] ** 2))


def _emd_exact(x: np.ndarray, y: np.ndarray) -> float:
    cost = cdist(x, y)
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean())


def emd(x: np.ndarray, y: np.ndarray, exact: bool = False, eps: float = DEFAULT_EPS) -> float:
    """EMD(x, y) of two clouds of equal size: exact (linear assignment, float64) or by the auction
    (CPU torch, exact <= value <= exact + eps)."""
    x, y = _cloud(x, "x"), _cloud(y, "y")
    _check_equal_sizes(len(x), len(y))
    if exact:
        return _emd_exact(x, y)
    pair = [torch.as_tensor(c.astype(np.float32))[None] for c in (x, y)]
    return float(emd_batch(*pair, eps=eps)[0])


# --- batched pairs (torch, any device) ---------------------------------------------------------------


def chamfer_batch(x: torch.Tensor, y: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """CD(x[k], y[k]) for k < p: x (p, n, 3), y (p, m, 3) -> (p,), on their device. `rows` points of
    x are compared with all of y at a time (default: all n); memory p * rows * m."""
    p, n, _ = x.shape
    rows = rows or n
    x, y = _centred(x, y)
    # |x - y|^2 = [x, |x|^2, 1] . [-2y, 1, |y|^2]: one batched product (K = 5) writes the squared
    # distances, with no extra pass to add the norms.
    xa = torch.cat([x, x.square().sum(2, keepdim=True), torch.ones_like(x[..., :1])], 2)
    ya = torch.cat([-2 * y, torch.ones_like(y[..., :1]), y.square().sum(2, keepdim=True)], 2).transpose(1, 2)
    to_y = x.new_zeros(p)  # sum over x of min_y |x - y|^2
    to_x = None  # running min over the row blocks of min_x |x - y|^2, per y
    for s in range(0, n, rows):
        d = torch.bmm(xa[:, s:s + rows], ya)
        to_y += d.amin(2).clamp_(min=0).sum(1)
        block = d.amin(1)
        to_x = block if to_x is None else torch.minimum(to_x, block)
    return to_y / n + to_x.clamp_(min=0).mean(1)


def _costs(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(p, n, m) float32 Euclidean distances, computed a block of pairs at a time."""
    p, n, _ = x.shape
    m = y.shape[1]
    out = torch.empty(p, n, m, dtype=torch.float32, device=x.device)
    step = max(1, _block(x.device) // (n * m))
    for s in range(0, p, step):
        out[s:s + step] = torch.cdist(*_centred(x[s:s + step], y[s:s + step]))
    return out


def emd_batch(x: torch.Tensor, y: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Approximate EMD(x[k], y[k]) for k < p by the eps-scaling auction: x, y (p, n, 3) -> (p,), on
    their device; each value is the mean cost of a bijection within eps of optimal. Holds the p
    n x n cost matrices in memory (float32).

    Points of x bid for points of y (Jacobi auction: all unmatched points bid at once, each point of
    y goes to its highest bid); a phase ends when every point is matched."""
    p, n, _ = x.shape
    _check_equal_sizes(n, y.shape[1])
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if n == 1:
        return (x - y).norm(dim=2)[:, 0]
    dev = x.device
    cost = _costs(x, y).view(p * n, n)  # row: flat index (pair, point of x)
    chunk = max(1, _block(dev) // n)
    price = cost.new_zeros(p * n)  # per flat (pair, point of y)
    owner = torch.full((p * n,), -1, dtype=torch.long, device=dev)  # the x point holding a y point
    match = torch.full((p * n,), -1, dtype=torch.long, device=dev)  # the y point an x point holds
    step = max(eps, float((x - x.mean(1, keepdim=True)).abs().amax()) / 10)
    while True:
        owner.fill_(-1)  # each phase restarts the matching from the previous phase's prices
        match.fill_(-1)
        while (free := (match < 0).nonzero().squeeze(1)).numel():  # one host sync per round
            keys, bids = [], []
            for c in range(0, free.numel(), chunk):
                who = free[c:c + chunk]
                pair = who // n
                top = (cost[who] + price.view(p, n)[pair]).neg_().topk(2, dim=1)
                key = pair * n + top.indices[:, 0]
                # Outbid the current price by the margin over the second-best point, plus the step.
                bids.append(price[key] + (top.values[:, 0] - top.values[:, 1]) + step)
                keys.append(key)
            key, bid = torch.cat(keys), torch.cat(bids)
            objects, slot = torch.unique(key, return_inverse=True)
            best = bid.new_full((len(objects),), -math.inf).scatter_reduce_(0, slot, bid, "amax")
            top = bid == best[slot]  # equal best bids: the highest index wins
            winner = free.new_full((len(objects),), -1).scatter_reduce_(0, slot[top], free[top], "amax")
            dropped = owner[objects]
            match[dropped[dropped >= 0]] = -1
            owner[objects] = winner
            match[winner] = objects
            price[objects] = best
        if step <= eps:
            break
        step = max(step / EPS_SCALING, eps)
    # The cost of the matching from the coordinates, not the (expanded-form) cost matrix.
    return (x.reshape(-1, 3) - y.reshape(-1, 3)[match]).norm(dim=1).view(p, n).mean(1)


# --- pairwise matrices -------------------------------------------------------------------------------


class _Pairs:
    """The pairs (i, j) of a matrix in row-major order: all of them, or i < j for a set against
    itself; `chunk(s, e)` returns pairs s..e-1 as index tensors, computed, never stored in full."""

    def __init__(self, na: int, nb: int, symmetric: bool, device: torch.device):
        self.symmetric = symmetric
        counts = torch.arange(na - 1, -1, -1) if symmetric else torch.full((na,), nb)
        self.starts = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(device)
        self.total = int(self.starts[-1])

    def chunk(self, s: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        flat = torch.arange(s, e, device=self.starts.device)
        i = torch.searchsorted(self.starts, flat, right=True) - 1
        j = flat - self.starts[i] + (i + 1 if self.symmetric else 0)
        return i, j


def _matrix(A, B, dev: torch.device, name: str, per_step: int, fn) -> np.ndarray:
    """D[i, j] = fn(A[I], B[J]) over all pairs, `per_step` pairs at a time, as float64."""
    a = torch.as_tensor(_clouds(A, "A")).to(dev)
    b = a if B is None else torch.as_tensor(_clouds(B, "B")).to(dev)
    pairs = _Pairs(len(a), len(b), B is None, dev)
    out = torch.zeros(len(a), len(b), dtype=torch.float64, device=dev)
    progress = Progress(name, pairs.total, "pairs")
    for s in range(0, pairs.total, per_step):
        e = min(s + per_step, pairs.total)
        i, j = pairs.chunk(s, e)
        out[i, j] = fn(a[i], b[j]).to(out.dtype)
        progress.update(e - s)
    progress.close()
    d = out.cpu().numpy()
    return d + d.T if B is None else d


def chamfer_matrix(A, B=None, device: str | torch.device = "auto", tile: int | None = None) -> np.ndarray:
    """CD between every cloud of A (na, n, 3) and every cloud of B (nb, m, 3): (na, nb) float64.
    B None: A against itself, symmetric, each pair computed once, zero diagonal.

    Tiled in torch on `device` ("auto": CUDA when present), `tile` pairs per step (default: as many
    as fit in `BLOCK` elements of squared distances, see the module doc)."""
    dev = resolve_device(device)
    n, m = np.shape(A)[1], np.shape(A if B is None else B)[1]
    rows = max(1, min(n, _block(dev) // m, CPU_ROWS if dev.type == "cpu" else n))
    tile = tile or max(1, _block(dev) // (rows * m))
    return _matrix(A, B, dev, "chamfer matrix", tile, lambda x, y: chamfer_batch(x, y, rows))


def chamfer_matrix_fused(A, B=None, device: str | torch.device = "auto", tuning=None) -> np.ndarray:
    """The same matrix as `chamfer_matrix` (float64 (na, nb); B None: symmetric, zero diagonal) by the
    fused Triton kernel (`raywsl.kernels.chamfer`, see the module doc) on `device`: a CUDA device, or
    a CPU in Triton's interpreter (TRITON_INTERPRET=1; slow, for tests). Raises
    raywsl.kernels.KernelUnavailable where it cannot run. `tuning`: a `raywsl.kernels.chamfer.Tuning`
    (default: `DEFAULTS["tensor"]` there)."""
    dev = resolve_device(device)
    check(dev, "chamfer_matrix_fused")
    from raywsl.kernels import chamfer as fused  # imports triton: only once the kernel can run

    a = torch.as_tensor(_clouds(A, "A")).to(dev)
    b = None if B is None else torch.as_tensor(_clouds(B, "B")).to(dev)
    pairs = len(a) * (len(a) - 1) // 2 if b is None else len(a) * len(b)
    progress = Progress("chamfer matrix (fused)", pairs, "pairs")
    # The kernel reports directed pairs (A against itself: all na^2 of them, in one pass).
    d = fused.chamfer_matrix(a, b, tuning or fused.DEFAULTS["tensor"],
                             progress=lambda done, total: progress.set(pairs * done // total))
    progress.close()
    return d.cpu().numpy()


def chamfer_matrix_kdtree(A, B=None, workers: int = 1) -> np.ndarray:
    """The same matrix as `chamfer_matrix`, exact in float64 with one scipy k-d tree per cloud and a
    loop over pairs: the CPU baseline and cross-check."""
    a = _clouds(A, "A", np.float64)
    b = a if B is None else _clouds(B, "B", np.float64)
    ta = [cKDTree(x) for x in a]
    tb = ta if B is None else [cKDTree(y) for y in b]
    d = np.zeros((len(a), len(b)))
    for i in range(len(a)):
        for j in range(i + 1 if B is None else 0, len(b)):
            d[i, j] = (np.mean(tb[j].query(a[i], workers=workers)[0] ** 2)
                       + np.mean(ta[i].query(b[j], workers=workers)[0] ** 2))
    return d + d.T if B is None else d


def _emd_tile(dev: torch.device, n: int) -> int:
    if dev.type == "cpu":
        return max(1, EMD_COSTS["cpu"] // (n * n))
    budget = EMD_COSTS["gpu"]
    if dev.type == "cuda":
        budget = min(budget, torch.cuda.mem_get_info(dev)[0] // 16)  # a quarter, in float32 elements
    return max(1, budget // (n * n))


def emd_matrix(A, B=None, device: str | torch.device = "auto", exact: bool = False, eps: float = DEFAULT_EPS,
               tile: int | None = None) -> np.ndarray:
    """EMD between every cloud of A (na, n, 3) and every cloud of B (nb, n, 3): (na, nb) float64;
    B None: A against itself (each pair once, zero diagonal).

    Default: the batched auction on `device`, `tile` pairs per batch (default: as many as fit their
    cost matrices in `EMD_COSTS`); each value within [exact, exact + eps].
    exact=True: linear assignment per pair on the CPU (float64; seconds per pair at 2,048 points)."""
    n, m = np.shape(A)[1], np.shape(A if B is None else B)[1]
    _check_equal_sizes(n, m)
    if exact:
        a = _clouds(A, "A", np.float64)
        b = a if B is None else _clouds(B, "B", np.float64)
        d = np.zeros((len(a), len(b)))
        for i in range(len(a)):
            for j in range(i + 1 if B is None else 0, len(b)):
                d[i, j] = _emd_exact(a[i], b[j])
        return d + d.T if B is None else d
    dev = resolve_device(device)
    return _matrix(A, B, dev, "emd matrix", tile or _emd_tile(dev, n), lambda x, y: emd_batch(x, y, eps))
