"""The weight-space probes of a run's weight store, as tables: the LoRA paper's discriminative probes,
mean ± std over seeded splits next to chance (papers/004, Table 4), and the small-data study's
weight statistics (papers/002, Table 2), on the run's fitted training rows labelled by category.

    raywsl probe -c CONFIG [--seeds 5] [--test-fraction 0.2]
      <run.dir>/probe/probe.json   every number (per seed too), the settings and the conventions
      <run.dir>/probe/probe.md     the two tables
      MLflow                       probe.<name>: probe.nn_accuracy, probe.nn_accuracy_std, probe.norm_mean, ...

The eval stage computes the same tables with PROBE_SEEDS and PROBE_TEST_FRACTION (`eval_metrics`)
into metrics.json as weights_probe_<name> and weights_<statistic>; the report renders them back
(`from_metrics`, `probe_rows`, `statistics_rows`).

The rows are streamed from the store (`StoreRows`, shard by shard in bounded slices), never loaded
whole: the statistics that are exact over all rows stay exact, and the pairwise cosine, PCA and the
probes use a seeded subset of at most SAMPLE_ROWS rows (eval/weights.py `scan_weights`); `n` and
`sample_rows` say how many rows each used.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from raywsl import cache, tracking
from raywsl import contract as C
from raywsl.config import Config
from raywsl.eval.weights import PROBES, SAMPLE_ROWS, probe_classes, probe_table, scan_weights, seeded_subset
from raywsl.store.rows import RowStore
from raywsl.store.weights import fitted_training_rows

log = logging.getLogger(__name__)

# What the eval stage uses (no config key: the eval fingerprint would change with one).
PROBE_SEEDS = 5
PROBE_TEST_FRACTION = 0.2

# The metric-key prefixes of the eval stage's metrics.json.
PROBE_PREFIX = "weights_probe_"
STATISTICS_PREFIX = "weights_"

PROBE_LABELS = {"nn_accuracy": "1-NN accuracy (cosine)", "logistic_accuracy": "logistic regression accuracy",
                "kmeans_ari": "k-means ARI"}
# The scalars of a probe table that are logged and kept in metrics.json.
PROBE_SCALARS = (*(k for m in PROBES for k in (m, f"{m}_std")), "chance", "classes", "seeds", "test_fraction",
                 "n_test")
# papers/002 Table 2, in its order: (key, label); `dims` says how many coordinates the shares are of.
STATISTICS = (("norm_mean", "mean L2 norm"), ("norm_std", "std of the L2 norm"),
              ("cos_mean", "mean pairwise cosine"), ("cos_std", "std of pairwise cosine"),
              ("cos_min", "min pairwise cosine"), ("cos_max", "max pairwise cosine"),
              ("cos_to_mean", "mean cosine to the population mean"),
              ("top10_dims_share", "variance held by the top 10 coordinates"),
              ("top100_dims_share", "variance held by the top 100 coordinates"),
              ("top1000_dims_share", "variance held by the top 1,000 coordinates"),
              ("top10000_dims_share", "variance held by the top 10,000 coordinates"),
              ("dims", "coordinates per row"), ("n", "rows"),
              ("sample_rows", "rows of the seeded subset (pairwise cosine, PCA, probes)"))

CONVENTIONS = {
    "split": "repeat r uses seed + r: per class of n rows, round(test_fraction * n) rows (halves up; at least 1, "
             "at most n - 1) drawn as test rows, the rest train",
    "nn_accuracy": "1-NN: each test row gets the category of its most cosine-similar training row",
    "logistic_accuracy": "logistic regression (L2, C = 1) on features standardised with the training rows' "
                         "mean and std; fitted on the training rows, accuracy on the test rows",
    "kmeans_ari": "adjusted Rand index of k-means (k = classes, 10 restarts, seeded per repeat) on all rows "
                  "(raw vectors) against the categories",
    "std": "sample standard deviation over repeats (ddof = 1); n/a for a single repeat",
    "chance": "the majority-class share (the accuracy of always guessing the largest class); a random "
              "clustering has ARI 0",
    "statistics": "papers/002 Table 2 on the same rows: L2 norm mean and population std; cosine over all pairs "
                  "i < j of the subset; share of the summed per-coordinate variance held by the k highest-variance "
                  "coordinates (1 when k >= dims)",
    "subset": f"above {SAMPLE_ROWS:,} rows the pairwise cosine, the PCA spectrum and the probes use a seeded "
              f"uniform subset of {SAMPLE_ROWS:,} rows (`sample_rows` of `n`); norms, cosine to the mean, "
              f"per-coordinate variance and nearest training rows are exact over all rows",
}


class ProbeError(ValueError):
    """The weight store's rows cannot be probed as asked (too few rows per class, bad settings)."""


# One read of weights holds at most this many (64 MiB of float32): 306 rows of 54,785 coordinates.
READ_ELEMENTS = 1 << 24
# Metadata (categories) is read this many rows at a time.
META_ROWS = 1 << 16


class StoreRows:
    """Rows `rows` (sorted store row indices) of a store's weights as a RowSource (eval/weights.py):
    each block is a slice of at most `read_elements` weights inside one shard (one storage object),
    so a pass over 10^6 rows holds one slice at a time."""

    def __init__(self, store: RowStore, rows: np.ndarray, read_elements: int = READ_ELEMENTS):
        self.store, self.rows = store, np.asarray(rows, dtype=np.int64)
        if len(self.rows) and ((np.diff(self.rows) <= 0).any() or self.rows[0] < 0 or self.rows[-1] >= store.n_rows):
            raise ValueError(f"{store.path}: rows must be sorted distinct row indices in 0..{store.n_rows - 1}")
        array = store.group[C.ROW_WEIGHTS]
        self.n_rows, self.dims, self.dtype = len(self.rows), int(array.shape[1]), array.dtype
        self.block_rows = max(1, read_elements // max(1, self.dims))

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        array = self.store.group[C.ROW_WEIGHTS]
        for k in range(self.store.n_shards):
            shard = self.store.shard_rows(k)
            for a in range(shard.start, shard.stop, self.block_rows):
                b = min(a + self.block_rows, shard.stop)
                lo, hi = np.searchsorted(self.rows, [a, b])
                if lo == hi:
                    continue
                wanted = self.rows[lo:hi]
                block = array[wanted[0]:wanted[-1] + 1]  # a row slice; rows left out (failed) are dropped
                yield int(lo), block if len(block) == len(wanted) else block[wanted - wanted[0]]

    def categories(self, positions: np.ndarray) -> np.ndarray:
        """The category (str) of the rows at sorted `positions`, metadata read META_ROWS rows at a time."""
        wanted = self.rows[positions]
        out = []
        for a in range(0, self.store.n_rows, META_ROWS):
            lo, hi = np.searchsorted(wanted, [a, a + META_ROWS])
            if lo < hi:
                meta = self.store.row_meta(slice(a, min(a + META_ROWS, self.store.n_rows)))[C.CATEGORY]
                out += [str(c) for c in meta[wanted[lo:hi] - a]]
        return np.array(out, dtype=str)


@dataclass
class ProbeInputs:
    """The run's fitted training rows, streamed from the store, and the seeded subset of them that
    the pairwise cosine, PCA and the probes use, with its categories."""

    store: str  # the weight store's path
    field_type: str
    rows: np.ndarray  # the fitted training rows: row indices into the store
    weights: StoreRows  # those rows' weights, read a block at a time (eval/weights.py `scan_weights`)
    subset: np.ndarray  # sorted positions into `rows` of the subset: all of them up to SAMPLE_ROWS
    labels: np.ndarray  # (len(subset),) category of each subset row

    @property
    def subsampled(self) -> bool:
        return len(self.subset) < len(self.rows)

    def describe(self) -> str:
        """How many rows, for messages: "9 training rows" or "... (probed: a seeded subset of 10,000)"."""
        sub = f" (probed: a seeded subset of {len(self.subset):,})" if self.subsampled else ""
        return f"{len(self.rows):,} training rows{sub}"


def training_weights(cfg: Config, plan: C.Plan, max_rows: int = SAMPLE_ROWS) -> ProbeInputs:
    """The run's fitted training rows (store/split.py), the seeded subset of at most `max_rows` of
    them (drawn with cfg.seed) and its categories; refused (StoreError) unless `raywsl fit` has
    fitted at least two rows. Reads no weights: `weights` streams them when asked."""
    store, rows = fitted_training_rows(plan.weights, cfg.data.shapes, 2, "the weight-space probes")
    weights = StoreRows(store, rows)
    subset = seeded_subset(len(rows), max_rows, cfg.seed)
    return ProbeInputs(store.path, str(store.attrs[C.Attr.FIELD_TYPE]), rows, weights, subset,
                       weights.categories(subset))


def probe_inputs(cfg: Config, plan: C.Plan, seeds: int, test_fraction: float) -> ProbeInputs:
    """`training_weights`, refused (ProbeError, naming the option) unless `seeds` repeats of a
    stratified split holding out `test_fraction` of each category are possible."""
    if seeds < 1:
        raise ProbeError(f"--seeds must be at least 1, got {seeds}")
    if not 0 < test_fraction < 1:
        raise ProbeError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    inputs = training_weights(cfg, plan)
    try:
        probe_classes(inputs.labels, len(inputs.subset), test_fraction)
    except ValueError as e:
        raise ProbeError(f"{inputs.store} ({inputs.describe()}, data.shapes={cfg.data.shapes}): {e}") from None
    return inputs


# ------------------------------------------------------------------------------------ scalars and metric keys

def probe_scalars(probe: dict[str, Any]) -> dict[str, float]:
    """The logged numbers of a `probe_table` result (`seeds`: how many repeats)."""
    return {k: len(probe[k]) if k == "seeds" else probe[k] for k in PROBE_SCALARS}


def statistics_scalars(stats: dict[str, Any]) -> dict[str, float]:
    """The Table-2 numbers of a `weight_statistics` result (top-k shares for the ks it computed)."""
    return {k: stats[k] for k, _ in STATISTICS if k in stats}


def eval_metrics(probe: dict[str, Any] | None, stats: dict[str, Any]) -> dict[str, float]:
    """The eval stage's keys: weights_probe_<name> (nn_accuracy, nn_accuracy_std, ..., chance),
    weights_<statistic> (norm_mean, cos_min, top10_dims_share, ..., n, sample_rows) and
    weights_subsampled."""
    out = {f"{STATISTICS_PREFIX}{k}": v for k, v in statistics_scalars(stats).items()}
    if "subsampled" in stats:  # the pairwise cosine, PCA and probes saw a seeded subset (sample_rows of n)
        out[f"{STATISTICS_PREFIX}subsampled"] = bool(stats["subsampled"])
    if probe is not None:
        out.update({f"{PROBE_PREFIX}{k}": v for k, v in probe_scalars(probe).items()})
    return out


def from_metrics(metrics: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(probe scalars, statistics) back from a metrics.json written with `eval_metrics`."""
    probe = {k: metrics[f"{PROBE_PREFIX}{k}"] for k in PROBE_SCALARS if f"{PROBE_PREFIX}{k}" in metrics}
    stats = {k: metrics[f"{STATISTICS_PREFIX}{k}"] for k, _ in STATISTICS if f"{STATISTICS_PREFIX}{k}" in metrics}
    return probe, stats


# ------------------------------------------------------------------------------------ tables

def _pct(x: Any, digits: str = ".1f") -> str:
    return f"{100 * x:{digits}}%" if isinstance(x, (int, float)) and math.isfinite(x) else "n/a"


def probe_rows(probe: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(metric, mean ± std, chance) per probe, in percent as the paper writes them."""
    chance = {"kmeans_ari": 0.0}
    return [(PROBE_LABELS[m], f"{_pct(probe[m])} ± {_pct(probe.get(f'{m}_std'))}",
             _pct(chance.get(m, probe.get("chance")))) for m in PROBES if m in probe]


def statistics_rows(stats: dict[str, Any]) -> list[tuple[str, str]]:
    """(statistic, value) in papers/002 Table 2's order."""
    rows = []
    for key, label in STATISTICS:
        if key not in stats:
            continue
        v = stats[key]
        if key == "norm_std" and stats.get("norm_mean"):
            text = f"{v:.4g} ({_pct(v / stats['norm_mean'])} of the mean)"
        elif key.endswith("_dims_share"):
            k, dims = int(key[3:-len("_dims_share")]), stats.get("dims")
            text = _pct(v, ".3g") + (f" (all {dims} coordinates)" if dims and k >= dims else "")
        elif key.startswith("cos"):
            text = f"{v:.4f}"
        else:
            text = f"{v:.4g}" if isinstance(v, float) else str(v)
        rows.append((label, text))
    return rows


def probe_note(probe: dict[str, Any]) -> str:
    """How the probe table was measured, in one sentence."""
    return (f"{probe['seeds']} seeds, each a stratified split holding out {_pct(probe['test_fraction'], '.0f')} of "
            f"each of {probe['classes']} classes ({probe['n_test']} test rows); mean ± sample std over seeds; "
            f"chance: majority-class share (ARI: 0)")


def markdown(result: dict[str, Any]) -> str:
    """probe.md: the probe table, the statistics table and the conventions."""
    probe, stats = probe_scalars(result["probe"]), statistics_scalars(result["statistics"])
    sizes = ", ".join(f"{c} {n}" for c, n in zip(result["probe"]["class_names"], result["probe"]["class_sizes"]))
    title = (f"# Weight-space probes ({result['rows']} training rows of {result['field_type']} weights, "
             f"{result['statistics']['dims']} coordinates, seed={result['seed']})")
    subset = [f"Pairwise cosine and probes on a seeded subset of {result['sample_rows']:,} of the "
              f"{result['rows']:,} rows; the other statistics over all rows.", ""] if result.get("subsampled") else []
    lines = [title, "",
             f"{result['store']}; classes: {sizes}", "", *subset,
             "| probe (papers/004, Table 4) | mean ± std | chance |", "|---|---:|---:|",
             *(f"| {a} | {b} | {c} |" for a, b, c in probe_rows(probe)), "", probe_note(probe), "",
             "| statistic (papers/002, Table 2) | value |", "|---|---:|",
             *(f"| {a} | {b} |" for a, b in statistics_rows(stats)), "",
             *(f"- {k}: {v}" for k, v in result["conventions"].items())]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ running

def run_probe(cfg: Config, plan: C.Plan, inputs: ProbeInputs, seeds: int, test_fraction: float) -> dict[str, Any]:
    """Probe the run's training rows (`probe_inputs`) with `seeds` repeats from cfg.seed; write
    <run.dir>/probe/probe.json and probe.md, log the scalars to the active MLflow run as probe.<name>;
    returns what probe.json holds."""
    scan = scan_weights(inputs.weights, subset=inputs.subset)  # two passes over the store
    probe = probe_table(scan.subset_weights, inputs.labels, seeds=seeds, test_fraction=test_fraction, seed=cfg.seed)
    stats = scan.statistics
    result = {"store": inputs.store, "field_type": inputs.field_type, "rows": len(inputs.rows),
              "sample_rows": len(inputs.subset), "subsampled": inputs.subsampled,
              "data_shapes": cfg.data.shapes, "seed": cfg.seed, "probe": probe, "statistics": stats,
              "conventions": CONVENTIONS}
    out = plan.run.probe
    cache.write_json(C.join(out, C.PROBE_JSON), result)
    cache.write_text(C.join(out, C.PROBE_TABLE), markdown(result))
    scalars = {**probe_scalars(probe), **statistics_scalars(stats)}
    tracking.log_metrics({"probe": scalars})
    tracking.log_json(result, f"{C.PROBE}/{C.PROBE_JSON}")
    log.info("probe: %s", ", ".join(f"{k} {v:.4g}" for k, v in scalars.items() if isinstance(v, float)))
    return result
