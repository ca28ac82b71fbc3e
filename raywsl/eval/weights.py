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

Inputs are numpy arrays; float32 stays float32 in the big matrix products (what a store holds),
anything else is computed in float64. Outputs are plain dicts of floats, ints and numpy arrays;
`raywsl.tracking.log_metrics` logs the scalars and skips the arrays.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


# Products are tiled so that no temporary holds more than this many elements (128 MiB of float64).
CHUNK_ELEMENTS = 1 << 24


def _as_matrix(W) -> np.ndarray:
    W = np.asarray(W)
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D matrix of weight vectors, got shape {W.shape}")
    return W if W.dtype == np.float32 else W.astype(np.float64)


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


def cosine_stats(W, max_rows: int = 10_000, block: int = 2048, bins: int = 1 << 20, seed: int = 0) -> dict:
    """Statistics of the cosine similarity over all pairs i < j of rows, plus norms and cosine to
    the mean vector (papers/002, Table 2).

    Pairs are computed block by block (never an N x N matrix). Mean, std, min and max are exact;
    the median comes from a histogram of `bins` bins over [-1, 1] (error below 2 / bins ~ 2e-6).
    Above `max_rows` rows (10^4 rows = 5 * 10^7 pairs) the pair statistics use a deterministic
    random subset of `max_rows` rows (`pairs_subsampled`); norms and cosine-to-mean always use all.
    """
    W = _as_matrix(W)
    n = len(W)
    if n < 2:
        raise ValueError("cosine statistics need at least two weight vectors")
    norms = _row_norms(W)
    mean = W.mean(axis=0, dtype=np.float64)
    cos_to_mean = (W @ mean.astype(W.dtype)) / np.maximum(norms * np.linalg.norm(mean), np.finfo(float).tiny)

    rows = np.arange(n)
    if n > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))
    X = _unit_rows(W[rows])
    moments, lo, hi = (0, 0.0, 0.0), np.inf, -np.inf
    hist = np.zeros(bins, dtype=np.int64)
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
    return {
        "n": n,
        "pairs": count,
        "pairs_subsampled": len(rows) < n,
        "mean": mean_cos,
        "std": float(np.sqrt(m2 / count)),
        "min": lo,
        "max": hi,
        "median": float(np.clip(median, lo, hi)),
        "norm_mean": float(norms.mean()),
        "norm_std": float(norms.std()),
        "cos_to_mean_mean": float(cos_to_mean.mean()),
        "cos_to_mean_max": float(cos_to_mean.max()),
        "most_central": np.argsort(-cos_to_mean, kind="stable")[:5],  # candidate attractors
        "cos_to_mean": cos_to_mean,
    }


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


def top_dims_variance(W, ks: Sequence[int] = (10, 100, 1000, 10_000)) -> dict:
    """Share of the total per-coordinate variance held by the k highest-variance coordinates
    (papers/002, Table 2: 0.2 % in the top 10 of 54,785 dims, 55 % in the top 10,000), and the
    median per-coordinate std: how thinly per-shape variation is spread over raw coordinates."""
    W = _as_matrix(W)
    var = np.sort(W.var(axis=0, dtype=np.float64))[::-1]
    cum = np.minimum(np.cumsum(var) / max(var.sum(), np.finfo(float).tiny), 1.0)  # no 1 + 3e-15 from rounding
    return {"share": {int(k): float(cum[min(k, len(cum)) - 1]) for k in ks},
            "std_median": float(np.sqrt(np.median(var))), "dims": len(var)}


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k largest scores per row, largest first."""
    if k < scores.shape[1]:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def nearest_training(generated, training, top_k: int = 5, attractor_k: int = 4) -> dict:
    """Rank every generated vector against all training vectors (papers/002, §3.3).

    Per generated row: the `top_k` nearest training rows by cosine (`cos_index`, `cos_sim`, best
    first) and by L2 (`l2_index`, `l2_dist`), and `cos_margin` = best - second-best cosine (a
    large margin = a confident copy). Collapse is read off the cosine-nearest training row:
    `distinct_nearest` = how many training rows are nearest to some sample, `attractor_share` =
    share of samples whose nearest row is one of the `attractor_k` most frequent nearest rows
    (`attractors`), `cos_to_training_mean` = mean cosine to the training centroid.

    L2 candidates (the k + 4 best) come from |g|^2 + |t|^2 - 2 g.t in the input precision, then
    their distances are recomputed directly, so reported distances are exact even for near-copies
    (where that expansion cancels catastrophically in float32)."""
    G, T = _as_matrix(generated), _as_matrix(training)
    if G.shape[1] != T.shape[1]:
        raise ValueError(f"generated vectors have {G.shape[1]} dims, training vectors {T.shape[1]}")
    dtype = np.result_type(G.dtype, T.dtype)
    G, T = G.astype(dtype, copy=False), T.astype(dtype, copy=False)
    k = min(top_k, len(T))
    g_norm, t_norm = _row_norms(G), _row_norms(T)
    safe_t = np.where(t_norm > 0, t_norm, 1.0)
    cos_index, cos_sim = np.empty((len(G), k), dtype=np.int64), np.empty((len(G), k))
    l2_index, l2_dist = np.empty((len(G), k), dtype=np.int64), np.empty((len(G), k))
    step = max(1, CHUNK_ELEMENTS // max(T.shape))
    for a in range(0, len(G), step):
        g = G[a:a + step]
        dots = (g @ T.T).astype(np.float64)
        cos = dots / (np.where(g_norm[a:a + step] > 0, g_norm[a:a + step], 1.0)[:, None] * safe_t)
        idx = _top_k(cos, k)
        cos_index[a:a + step], cos_sim[a:a + step] = idx, np.take_along_axis(cos, idx, axis=1)
        d2 = g_norm[a:a + step, None] ** 2 + t_norm[None] ** 2 - 2.0 * dots
        cand = _top_k(-d2, min(k + 4, len(T)))
        exact = np.stack([np.linalg.norm((g - T[c]).astype(np.float64), axis=1) for c in cand.T], 1)
        order = np.argsort(exact, axis=1, kind="stable")[:, :k]
        l2_index[a:a + step] = np.take_along_axis(cand, order, axis=1)
        l2_dist[a:a + step] = np.take_along_axis(exact, order, axis=1)

    nearest = cos_index[:, 0]
    counts = np.bincount(nearest, minlength=len(T))
    attractors = np.argsort(-counts, kind="stable")[:attractor_k]
    margin = cos_sim[:, 0] - cos_sim[:, 1] if k > 1 else np.full(len(G), np.nan)
    t_mean = T.mean(axis=0, dtype=np.float64)
    to_mean = (G @ t_mean.astype(dtype)) / np.maximum(g_norm * np.linalg.norm(t_mean), np.finfo(float).tiny)
    return {
        "n_generated": len(G),
        "n_training": len(T),
        "distinct_nearest": int((counts > 0).sum()),
        "attractor_share": float(counts[attractors].sum() / len(G)),
        "attractors": attractors,
        "attractor_counts": counts[attractors],
        "cos_top1_mean": float(cos_sim[:, 0].mean()),
        "cos_margin_mean": float(margin.mean()),
        "cos_to_training_mean": float(to_mean.mean()),
        "l2_top1_mean": float(l2_dist[:, 0].mean()),
        "cos_l2_agreement": float((l2_index[:, 0] == nearest).mean()),  # same nearest by both metrics
        "cos_index": cos_index,
        "cos_sim": cos_sim,
        "cos_margin": margin,
        "l2_index": l2_index,
        "l2_dist": l2_dist,
        "nearest_counts": counts,
    }


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


def weight_statistics(W, ks: Sequence[int] = (10, 100, 1000, 10_000), max_rows: int = 10_000, seed: int = 0) -> dict:
    """The weight-distribution statistics of the small-data study (papers/002, Table 2), from
    `cosine_stats` and `top_dims_variance`: L2 norm mean and (population) std, pairwise cosine
    mean / std / min / max / median (over a seeded subset of `max_rows` rows above that many;
    `pairs_subsampled`), mean cosine to the population mean and the most central rows, the share of
    the per-coordinate variance held by the top-k coordinates (`top<k>_dims_share`; 1 when k >= dims)
    and the median per-coordinate std."""
    cos = cosine_stats(W, max_rows=max_rows, seed=seed)
    top = top_dims_variance(W, ks)
    return {"n": cos["n"], "dims": top["dims"], "norm_mean": cos["norm_mean"], "norm_std": cos["norm_std"],
            "cos_mean": cos["mean"], "cos_std": cos["std"], "cos_min": cos["min"], "cos_max": cos["max"],
            "cos_median": cos["median"], "pairs": cos["pairs"], "pairs_subsampled": cos["pairs_subsampled"],
            "cos_to_mean": cos["cos_to_mean_mean"], "cos_to_mean_max": cos["cos_to_mean_max"],
            "most_central": cos["most_central"],
            **{f"top{k}_dims_share": v for k, v in top["share"].items()},
            "coord_std_median": top["std_median"]}
