"""Weight-space diagnostics: how a set of weight vectors (rows of W, N x P) is spread, whether
generated vectors collapse onto a few training ones, and whether the space carries semantics.

From the small-data study (papers/002, §3.3 and §3.6): pairwise cosine statistics (a warm-started set sits
in a thin shell, mean pairwise cosine ~0.96), cosine to the population mean (the attractor shapes
are the most central ones), variance captured by the top-k dimensions (together: `weight_statistics`,
its Table 2), and ranking each generated vector against all training vectors by cosine (collapse =
the same few nearest training shapes whatever the input). From the LoRA weight-space paper
(papers/004, §4.4): the semantic probes (1-NN by cosine, logistic regression, k-means ARI) repeated
over seeded splits (`probe_table`, its Table 4); its linear mode connectivity barrier is measured by
`raywsl stability` (fit/stability.py). The eval stage and `raywsl probe` run these on the run's
training rows (eval/probe.py).

Rows too many to hold (10^6 rows x 54,785 float32 = 219 GB) come as a `RowSource`, read a block of
rows at a time (eval/probe.py's StoreRows reads a weight store so). `scan_weights` reads them in two
passes and holds one block, O(1) numbers per row and a seeded subset of at most SAMPLE_ROWS rows,
whatever N: the norms, the per-coordinate variance, the cosine to the mean and the nearest training
rows are exact over all rows; the pairwise cosine, the PCA spectrum and the probes use the subset
(every row up to SAMPLE_ROWS rows, so small sets get the exact numbers).

Inputs are numpy arrays (or RowSources); float32 stays float32 in the big matrix products (what a
store holds), anything else is computed in float64. Outputs are plain dicts of floats, ints and
numpy arrays; `raywsl.tracking.log_metrics` logs the scalars and skips the arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import numpy as np


# Products are tiled so that no temporary holds more than this many elements (128 MiB of float64).
CHUNK_ELEMENTS = 1 << 24
# Above this many rows the pairwise-cosine, PCA and probe statistics use a seeded uniform subset of
# this many: 5 * 10^7 pairs, 2.2 GB of float32 at papers/002's 54,785 coordinates.
SAMPLE_ROWS = 10_000
# The top-k coordinate counts of papers/002 Table 2 (and 100).
TOP_KS = (10, 100, 1000, 10_000)


def _as_matrix(W) -> np.ndarray:
    W = np.asarray(W)
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D matrix of weight vectors, got shape {W.shape}")
    return W if W.dtype == np.float32 else W.astype(np.float64)


def _work_dtype(dtype) -> np.dtype:
    """The dtype `_as_matrix` computes rows of `dtype` in."""
    return np.dtype(np.float32) if np.dtype(dtype) == np.float32 else np.dtype(np.float64)


def _row_norms(W: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("ij,ij->i", W, W, dtype=np.float64))


def _unit_rows(W: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; a zero row stays zero, so its cosine with anything is 0."""
    norms = _row_norms(W)
    return (W / np.where(norms > 0, norms, 1.0)[:, None]).astype(W.dtype)


def _merge_moments(a: tuple[int, float, float], values: np.ndarray) -> tuple[int, float, float]:
    """Chan et al.'s pairwise update of (count, mean, sum of squared deviations): exact in float64
    even for a thin shell, where E[s^2] - E[s]^2 would cancel catastrophically."""
    n_a, mean_a, m2_a = a
    n_b = values.size
    mean_b = float(values.mean(dtype=np.float64))
    m2_b = float(np.square(values - mean_b, dtype=np.float64).sum())
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * n_b / n, m2_a + m2_b + delta * delta * n_a * n_b / n


# ------------------------------------------------------------------------------------ rows read a block at a time

class RowSource(Protocol):
    """N rows of P weights, read a block of consecutive rows at a time."""

    n_rows: int
    dims: int
    dtype: np.dtype

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """One pass over all rows in order: (position of the block's first row, the block's rows)."""
        ...


class ArrayRows:
    """A matrix in memory as a RowSource: one block, or blocks of `block_rows` rows."""

    def __init__(self, W, block_rows: int | None = None):
        self.W = _as_matrix(W)
        self.n_rows, self.dims = self.W.shape
        self.dtype = self.W.dtype
        self.block_rows = max(1, block_rows or self.n_rows)

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        for a in range(0, self.n_rows, self.block_rows):
            yield a, self.W[a:a + self.block_rows]


def as_rows(W) -> RowSource:
    """`W` itself when it is a RowSource, else the matrix as one."""
    return W if hasattr(W, "blocks") else ArrayRows(W)


def seeded_subset(n: int, max_rows: int = SAMPLE_ROWS, seed: int = 0) -> np.ndarray:
    """Sorted positions of a uniform random subset of `max_rows` of `n` rows drawn with `seed` (the
    same seed, the same rows); all n positions when n <= max_rows."""
    if max_rows < 2:
        raise ValueError(f"max_rows must be at least 2 (a pair), got {max_rows}")
    if n <= max_rows:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))


class _Moments:
    """Per-row L2 norms, and per-coordinate mean and sum of squared deviations merged block by
    block (Chan et al., as `_merge_moments` per coordinate): for one block exactly what
    W.mean(axis=0) and W.var(axis=0) compute in float64."""

    def __init__(self):
        self.n, self.mean, self.m2, self.norms = 0, None, None, []

    def update(self, start: int, block: np.ndarray) -> None:
        self.norms.append(_row_norms(block))
        n_b = len(block)
        mean_b = block.mean(axis=0, dtype=np.float64)
        deviations = block - mean_b  # float64
        m2_b = np.square(deviations, out=deviations).sum(axis=0)
        if self.n == 0:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + np.square(delta) * (self.n * n_b / n)
        self.n = n


class _Subset:
    """Copies of the rows at sorted `positions`, taken from the blocks as they stream past."""

    def __init__(self, positions: np.ndarray, dims: int, dtype):
        self.positions = positions
        self.rows = np.empty((len(positions), dims), dtype=dtype)

    def update(self, start: int, block: np.ndarray) -> None:
        lo, hi = np.searchsorted(self.positions, [start, start + len(block)])
        self.rows[lo:hi] = block[self.positions[lo:hi] - start]


def _keep_best(index: np.ndarray, score: np.ndarray, new_index: np.ndarray, new_score: np.ndarray, k: int,
               largest: bool) -> tuple[np.ndarray, np.ndarray]:
    """The k best of two candidate lists per row (columns), best first; ties keep the earlier list's
    entries first (the lower row index, as blocks come in order)."""
    index, score = np.concatenate([index, new_index], axis=1), np.concatenate([score, new_score], axis=1)
    order = np.argsort(-score if largest else score, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(index, order, axis=1), np.take_along_axis(score, order, axis=1)


class _Nearest:
    """For each generated row, the `top_k` nearest training rows by cosine and by L2, kept while the
    training rows stream past a block at a time (`nearest_training`)."""

    def __init__(self, generated: np.ndarray, top_k: int, dtype):
        self.G = generated.astype(dtype, copy=False)
        self.dtype, self.k = dtype, top_k
        self.g_norm = _row_norms(self.G)
        m = len(self.G)
        self.cos_index, self.cos_sim = np.zeros((m, 0), np.int64), np.zeros((m, 0))
        self.l2_index, self.l2_dist = np.zeros((m, 0), np.int64), np.zeros((m, 0))
        self.n, self.t_sum = 0, np.zeros(generated.shape[1])

    def update(self, start: int, block: np.ndarray) -> None:
        T = block.astype(self.dtype, copy=False)
        self.n += len(T)
        self.t_sum += T.sum(axis=0, dtype=np.float64)
        t_norm = _row_norms(T)
        safe_t = np.where(t_norm > 0, t_norm, 1.0)
        k, n_cand = min(self.k, len(T)), min(self.k + 4, len(T))
        width = min(self.k, self.cos_index.shape[1] + k)
        cos_index, cos_sim = np.empty((len(self.G), width), np.int64), np.empty((len(self.G), width))
        l2_index, l2_dist = np.empty((len(self.G), width), np.int64), np.empty((len(self.G), width))
        step = max(1, CHUNK_ELEMENTS // max(T.shape))
        for a in range(0, len(self.G), step):
            rows = slice(a, a + step)
            g, g_norm = self.G[rows], self.g_norm[rows]
            dots = (g @ T.T).astype(np.float64)
            cos = dots / (np.where(g_norm > 0, g_norm, 1.0)[:, None] * safe_t)
            idx = _top_k(cos, k)
            cos_index[rows], cos_sim[rows] = _keep_best(self.cos_index[rows], self.cos_sim[rows], idx + start,
                                                        np.take_along_axis(cos, idx, axis=1), self.k, largest=True)
            # L2 candidates from the expansion in the input precision, then their exact distances
            d2 = g_norm[:, None] ** 2 + t_norm[None] ** 2 - 2.0 * dots
            cand = _top_k(-d2, n_cand)
            exact = np.stack([np.linalg.norm((g - T[c]).astype(np.float64), axis=1) for c in cand.T], 1)
            l2_index[rows], l2_dist[rows] = _keep_best(self.l2_index[rows], self.l2_dist[rows], cand + start, exact,
                                                       self.k, largest=False)
        self.cos_index, self.cos_sim, self.l2_index, self.l2_dist = cos_index, cos_sim, l2_index, l2_dist

    def result(self, attractor_k: int) -> dict:
        G, cos_sim, nearest = self.G, self.cos_sim, self.cos_index[:, 0]
        counts = np.bincount(nearest, minlength=self.n)
        attractors = np.argsort(-counts, kind="stable")[:attractor_k]
        margin = cos_sim[:, 0] - cos_sim[:, 1] if cos_sim.shape[1] > 1 else np.full(len(G), np.nan)
        t_mean = self.t_sum / self.n
        to_mean = (G @ t_mean.astype(self.dtype)) / np.maximum(self.g_norm * np.linalg.norm(t_mean),
                                                                np.finfo(float).tiny)
        return {
            "n_generated": len(G),
            "n_training": self.n,
            "distinct_nearest": int((counts > 0).sum()),
            "attractor_share": float(counts[attractors].sum() / len(G)),
            "attractors": attractors,
            "attractor_counts": counts[attractors],
            "cos_top1_mean": float(cos_sim[:, 0].mean()),
            "cos_margin_mean": float(margin.mean()),
            "cos_to_training_mean": float(to_mean.mean()),
            "l2_top1_mean": float(self.l2_dist[:, 0].mean()),
            "cos_l2_agreement": float((self.l2_index[:, 0] == nearest).mean()),  # same nearest by both metrics
            "cos_index": self.cos_index,
            "cos_sim": cos_sim,
            "cos_margin": margin,
            "l2_index": self.l2_index,
            "l2_dist": self.l2_dist,
            "nearest_counts": counts,
        }


def _one_pass(source: RowSource, *accumulators) -> None:
    """Feed every block of `source`, in order, to each accumulator."""
    for start, block in source.blocks():
        block = _as_matrix(block)
        for acc in accumulators:
            acc.update(start, block)


# ------------------------------------------------------------------------------------ statistics

def _pair_cosines(X: np.ndarray, block: int, bins: int) -> dict:
    """Mean, std, min, max and median of the cosine over all pairs i < j of the unit rows X, a
    block x block tile at a time (never a len(X)^2 matrix). The median comes from a histogram of
    `bins` bins over [-1, 1] (error below 2 / bins ~ 2e-6); the rest is exact."""
    moments, lo, hi = (0, 0.0, 0.0), np.inf, -np.inf
    hist = np.zeros(bins, dtype=np.int64)
    block = max(1, min(block, len(X)))
    upper = np.triu(np.ones((block, block), dtype=bool), k=1)
    for i in range(0, len(X), block):
        for j in range(i, len(X), block):
            S = X[i:i + block] @ X[j:j + block].T
            S = S[upper[:len(S), :len(S)]] if i == j else S.ravel()
            if S.size == 0:
                continue
            S = np.clip(S, -1.0, 1.0)
            moments = _merge_moments(moments, S)
            lo, hi = min(lo, float(S.min())), max(hi, float(S.max()))
            idx = np.minimum(((S.astype(np.float64) + 1.0) * (bins / 2.0)).astype(np.int64), bins - 1)
            hist += np.bincount(idx, minlength=bins)
    count, mean_cos, m2 = moments
    cum = np.cumsum(hist)
    k = int(np.searchsorted(cum, count / 2.0))  # the bin holding the middle pair; interpolate inside it
    before = cum[k - 1] if k else 0
    median = -1.0 + (k + (count / 2.0 - before) / max(hist[k], 1)) * (2.0 / bins)
    return {"pairs": count, "mean": mean_cos, "std": float(np.sqrt(m2 / count)), "min": lo, "max": hi,
            "median": float(np.clip(median, lo, hi))}


def _dims_share(var: np.ndarray, ks: Sequence[int]) -> dict:
    """`top_dims_variance` from the per-coordinate variances."""
    var = np.sort(var)[::-1]
    cum = np.minimum(np.cumsum(var) / max(var.sum(), np.finfo(float).tiny), 1.0)  # no 1 + 3e-15 from rounding
    return {"share": {int(k): float(cum[min(k, len(cum)) - 1]) for k in ks},
            "std_median": float(np.sqrt(np.median(var))), "dims": len(var)}


@dataclass
class WeightScan:
    """What `scan_weights` read off N rows."""

    statistics: dict  # `weight_statistics`
    cosine: dict  # `cosine_stats`
    subset: np.ndarray  # sorted positions of the seeded subset (all rows when N <= max_rows)
    subset_weights: np.ndarray  # (len(subset), P): those rows, for the PCA and the probes
    nearest: dict | None  # `nearest_training(generated, rows)` when generated rows were given

    @property
    def subsampled(self) -> bool:
        return len(self.subset) < self.statistics["n"]


def scan_weights(W, ks: Sequence[int] = TOP_KS, max_rows: int = SAMPLE_ROWS, seed: int = 0,
                 subset: np.ndarray | None = None, generated=None, top_k: int = 5, attractor_k: int = 4,
                 block: int = 2048, bins: int = 1 << 20) -> WeightScan:
    """The statistics of the rows of `W` (a matrix or a RowSource) in two passes over them, holding
    one block, O(1) numbers per row and the subset rows at a time.

    Pass 1: the norms and the per-coordinate moments (exact), the rows of the subset (`subset`: sorted
    positions; by default `seeded_subset(N, max_rows, seed)`) and, with `generated` rows, their
    nearest rows (`nearest_training`, exact over all rows). Pass 2: the cosine of each row to the
    mean (exact). Then the pair statistics of `cosine_stats` on the subset (`pairs_subsampled`)."""
    source = as_rows(W)
    n = source.n_rows
    if n < 2:
        raise ValueError("cosine statistics need at least two weight vectors")
    subset = seeded_subset(n, max_rows, seed) if subset is None else np.asarray(subset, dtype=np.int64)
    if len(subset) < 2 or (np.diff(subset) <= 0).any() or subset[0] < 0 or subset[-1] >= n:
        raise ValueError(f"subset must hold at least two sorted distinct positions in 0..{n - 1}")
    dtype = _work_dtype(source.dtype)
    moments, rows = _Moments(), _Subset(subset, source.dims, dtype)
    accumulators: list = [moments, rows]
    near = None
    if generated is not None:
        G = _as_matrix(generated)
        if G.shape[1] != source.dims:
            raise ValueError(f"generated vectors have {G.shape[1]} dims, training vectors {source.dims}")
        near = _Nearest(G, top_k, np.result_type(G.dtype, dtype))
        accumulators.append(near)
    _one_pass(source, *accumulators)
    if moments.n != n:
        raise ValueError(f"the row source says {n} rows but yielded {moments.n}")

    norms, mean = np.concatenate(moments.norms), moments.mean
    dots = np.concatenate([_as_matrix(b) @ mean.astype(dtype) for _, b in source.blocks()])  # pass 2
    cos_to_mean = dots / np.maximum(norms * np.linalg.norm(mean), np.finfo(float).tiny)
    pairs = _pair_cosines(_unit_rows(rows.rows), block, bins)
    cos = {"n": n, **pairs, "pairs_subsampled": len(subset) < n,
           "norm_mean": float(norms.mean()), "norm_std": float(norms.std()),
           "cos_to_mean_mean": float(cos_to_mean.mean()), "cos_to_mean_max": float(cos_to_mean.max()),
           "most_central": np.argsort(-cos_to_mean, kind="stable")[:5],  # candidate attractors
           "cos_to_mean": cos_to_mean}
    top = _dims_share(moments.m2 / n, ks)
    statistics = {
        "n": n, "dims": top["dims"], "norm_mean": cos["norm_mean"], "norm_std": cos["norm_std"],
        "cos_mean": cos["mean"], "cos_std": cos["std"], "cos_min": cos["min"], "cos_max": cos["max"],
        "cos_median": cos["median"], "pairs": cos["pairs"], "pairs_subsampled": cos["pairs_subsampled"],
        "sample_rows": len(subset), "subsampled": len(subset) < n,
        "cos_to_mean": cos["cos_to_mean_mean"], "cos_to_mean_max": cos["cos_to_mean_max"],
        "most_central": cos["most_central"],
        **{f"top{k}_dims_share": v for k, v in top["share"].items()},
        "coord_std_median": top["std_median"]}
    return WeightScan(statistics, cos, subset, rows.rows, near.result(attractor_k) if near else None)


def cosine_stats(W, max_rows: int = SAMPLE_ROWS, block: int = 2048, bins: int = 1 << 20, seed: int = 0) -> dict:
    """Statistics of the cosine similarity over all pairs i < j of rows, plus norms and cosine to
    the mean vector (papers/002, Table 2). `W`: a matrix or a RowSource.

    Pairs are computed block by block (never an N x N matrix). Mean, std, min and max are exact;
    the median comes from a histogram of `bins` bins over [-1, 1] (error below 2 / bins ~ 2e-6).
    Above `max_rows` rows (10^4 rows = 5 * 10^7 pairs) the pair statistics use a deterministic
    random subset of `max_rows` rows (`pairs_subsampled`); norms and cosine-to-mean always use all.
    """
    return scan_weights(W, max_rows=max_rows, seed=seed, block=block, bins=bins).cosine


def pca_spectrum(W, k: int = 100, exact_max: int = 2000, seed: int = 0) -> dict:
    """Explained-variance ratios of the top-k principal directions of the centred rows.

    Exact (eigenvalues of the smaller Gram matrix) when min(N, P) <= `exact_max`, otherwise a
    randomised truncated SVD (Halko et al., scikit-learn). Ratios are against the exact total
    variance, so `cumulative[-1]` is the share the top k capture."""
    X = _as_matrix(W)
    X = X - X.mean(axis=0, dtype=np.float64).astype(X.dtype)
    k = min(k, *X.shape)
    total = float(np.einsum("ij,ij->", X, X, dtype=np.float64))
    exact = min(X.shape) <= exact_max
    if exact:
        gram = X @ X.T if X.shape[0] <= X.shape[1] else X.T @ X
        variances = np.clip(np.linalg.eigvalsh(gram.astype(np.float64))[::-1][:k], 0.0, None)
    else:
        from sklearn.utils.extmath import randomized_svd

        _, s, _ = randomized_svd(X, k, n_iter=7, random_state=seed)
        variances = s.astype(np.float64) ** 2
    ratio = variances / total if total > 0 else np.zeros(k)
    return {"explained_ratio": ratio, "cumulative": np.cumsum(ratio), "total_variance": total / len(X),
            "exact": exact}


def top_dims_variance(W, ks: Sequence[int] = TOP_KS) -> dict:
    """Share of the total per-coordinate variance held by the k highest-variance coordinates
    (papers/002, Table 2: 0.2 % in the top 10 of 54,785 dims, 55 % in the top 10,000), and the
    median per-coordinate std: how thinly per-shape variation is spread over raw coordinates.
    `W`: a matrix, or a RowSource (one pass, per-coordinate moments merged block by block)."""
    if hasattr(W, "blocks"):
        moments = _Moments()
        _one_pass(W, moments)
        return _dims_share(moments.m2 / max(moments.n, 1), ks)
    return _dims_share(_as_matrix(W).var(axis=0, dtype=np.float64), ks)


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k largest scores per row, largest first."""
    if k < scores.shape[1]:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def nearest_training(generated, training, top_k: int = 5, attractor_k: int = 4) -> dict:
    """Rank every generated vector against all training vectors (papers/002, §3.3); `training`: a
    matrix or a RowSource (one pass, a block of training rows at a time).

    Per generated row: the `top_k` nearest training rows by cosine (`cos_index`, `cos_sim`, best
    first) and by L2 (`l2_index`, `l2_dist`), and `cos_margin` = best - second-best cosine (a
    large margin = a confident copy). Collapse is read off the cosine-nearest training row:
    `distinct_nearest` = how many training rows are nearest to some sample, `attractor_share` =
    share of samples whose nearest row is one of the `attractor_k` most frequent nearest rows
    (`attractors`), `cos_to_training_mean` = mean cosine to the training centroid.

    L2 candidates (the k + 4 best of each block) come from |g|^2 + |t|^2 - 2 g.t in the input
    precision, then their distances are recomputed directly, so reported distances are exact even
    for near-copies (where that expansion cancels catastrophically in float32)."""
    G, source = _as_matrix(generated), as_rows(training)
    if G.shape[1] != source.dims:
        raise ValueError(f"generated vectors have {G.shape[1]} dims, training vectors {source.dims}")
    near = _Nearest(G, top_k, np.result_type(G.dtype, _work_dtype(source.dtype)))
    _one_pass(source, near)
    return near.result(attractor_k)


def _row_space(W: np.ndarray) -> np.ndarray:
    """The centred rows in coordinates of their own span: N x N instead of N x P when N < P, with
    the same pairwise distances (Z Z^T = Xc Xc^T), so Euclidean methods such as k-means give the
    same result at a fraction of the cost on wide weight vectors."""
    X = W - W.mean(axis=0, dtype=np.float64).astype(W.dtype)
    if len(X) >= X.shape[1]:
        return X
    eigenvalues, U = np.linalg.eigh((X @ X.T).astype(np.float64))
    keep = eigenvalues > eigenvalues.max() * 1e-12
    return U[:, keep] * np.sqrt(eigenvalues[keep])


def probe_classes(labels, n_rows: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(classes, y): the sorted distinct labels and each row's index into them, refused (ValueError
    naming the problem) unless a stratified split with `test_fraction` is possible: one label per
    row, at least two classes, and every class with at least two members (one to train on, one to
    test)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    classes, y = np.unique(np.asarray(labels), return_inverse=True)
    if len(y) != n_rows:
        raise ValueError(f"{n_rows} weight vectors but {len(y)} labels")
    if len(classes) < 2:
        raise ValueError(f"the probes need at least two classes; the labels hold {len(classes)}: "
                         f"{[str(c) for c in classes]}")
    sizes = np.bincount(y)
    if sizes.min() < 2:
        small = ", ".join(f"{c!s} ({k})" for c, k in zip(classes, sizes) if k < 2)
        raise ValueError(f"a stratified train/test split needs at least 2 rows per class (one to train on, "
                         f"one to test); too few in: {small}")
    return classes, y


def stratified_split(labels, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, test): sorted row indices. Per class of n rows, round(test_fraction * n) rows, but at
    least 1 and at most n - 1, go to the test set, drawn by `np.random.default_rng(seed)`: the same
    seed gives the same split, and every class is on both sides."""
    _, y = probe_classes(labels, len(labels), test_fraction)
    rng = np.random.default_rng(seed)
    test = []
    for c in range(y.max() + 1):
        members = np.flatnonzero(y == c)
        k = min(max(int(test_fraction * len(members) + 0.5), 1), len(members) - 1)
        test.append(rng.permutation(members)[:k])
    test = np.sort(np.concatenate(test))
    return np.setdiff1d(np.arange(len(y)), test), test


def _nearest_by_cosine(queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """For each row of `queries` (unit rows), the index of the candidate row (unit rows) with the
    largest cosine; ties go to the lowest index."""
    step = max(1, CHUNK_ELEMENTS // max(1, len(candidates)))
    return np.concatenate([(queries[a:a + step] @ candidates.T).argmax(axis=1)
                           for a in range(0, len(queries), step)])


PROBES = ("nn_accuracy", "logistic_accuracy", "kmeans_ari")


def probe_table(W, labels, seeds: int = 5, test_fraction: float = 0.2, seed: int = 0) -> dict:
    """The semantic probes of weight vectors, repeated over seeds (papers/004, §4.4, Table 4: mean ±
    std over runs with random data splits and initialisations).

    Repeat r uses seed `seed + r`: a stratified split (`stratified_split`, `test_fraction` of each
    class held out), then
    - `nn_accuracy`: each test row gets the category of its most cosine-similar training row;
    - `logistic_accuracy`: logistic regression (L2, C = 1) on features standardised with the training
      rows' mean and std, fitted on the training rows, scored on the test rows;
    - `kmeans_ari`: adjusted Rand index against the labels of k-means (k = number of classes, 10
      restarts seeded by the repeat's seed) on all rows, raw (unstandardised) vectors.
    Each metric comes as `<metric>` (mean), `<metric>_std` (sample std over repeats, ddof = 1; NaN for
    a single repeat) and `<metric>_values` (per repeat). `chance` is the majority-class share (the
    accuracy of always guessing the largest class); the ARI of a random clustering is 0.
    Raises ValueError when the labels do not allow the split (`probe_classes`)."""
    from sklearn.cluster import KMeans
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import adjusted_rand_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    W = _as_matrix(W)
    classes, y = probe_classes(labels, len(W), test_fraction)
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    X = _unit_rows(W)
    Z = _row_space(W)  # k-means sees the same distances at N x N instead of N x P
    values: dict[str, list[float]] = {name: [] for name in PROBES}
    for s in range(seed, seed + seeds):
        train, test = stratified_split(y, test_fraction, s)
        values["nn_accuracy"].append(float((y[train][_nearest_by_cosine(X[test], X[train])] == y[test]).mean()))
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        values["logistic_accuracy"].append(float(model.fit(W[train], y[train]).score(W[test], y[test])))
        clusters = KMeans(n_clusters=len(classes), n_init=10, random_state=s).fit_predict(Z)
        values["kmeans_ari"].append(float(adjusted_rand_score(y, clusters)))
    sizes = np.bincount(y)
    out: dict = {"n": len(W), "classes": len(classes), "class_names": [str(c) for c in classes],
                 "class_sizes": sizes, "chance": float(sizes.max() / len(W)), "seeds": list(range(seed, seed + seeds)),
                 "test_fraction": float(test_fraction), "n_train": len(train), "n_test": len(test)}
    for name, v in values.items():
        v = np.asarray(v)
        out.update({name: float(v.mean()), f"{name}_std": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
                    f"{name}_values": v})
    return out


def weight_statistics(W, ks: Sequence[int] = TOP_KS, max_rows: int = SAMPLE_ROWS, seed: int = 0) -> dict:
    """The weight-distribution statistics of the small-data study (papers/002, Table 2), from
    `cosine_stats` and `top_dims_variance`: L2 norm mean and (population) std, pairwise cosine
    mean / std / min / max / median (over a seeded subset of `max_rows` rows above that many:
    `sample_rows`, `pairs_subsampled`), mean cosine to the population mean and the most central rows,
    the share of the per-coordinate variance held by the top-k coordinates (`top<k>_dims_share`; 1
    when k >= dims) and the median per-coordinate std. `W`: a matrix or a RowSource (`scan_weights`)."""
    return scan_weights(W, ks=ks, max_rows=max_rows, seed=seed).statistics
