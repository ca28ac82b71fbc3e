"""The onset N*: the data scale at which weight-space diffusion starts working, with an interval.

Definition (per parameterisation, over a sweep's scale axis N_1 < N_2 < ... and its seeds): at scale
N the seed-mean of every metric satisfies its rule, and so does every larger N of the sweep ("starts
working and keeps working"). N* is the smallest such N; None when no N qualifies. The default rules
(RULES) read the eval stage's metrics:

    weights_attractor_share <= 0.5   samples do not pile onto a few training rows (papers/002's collapse)
    memorisation_rate       <= 0.5   most samples are not copies of a training shape (novelty)
    valid_share             >= 0.8   most samples decode to a surface

Interval: the seeds of each N are resampled with replacement (a seeded bootstrap), N* recomputed per
resample; the interval is the (2.5, 97.5) percentiles of the resampled N* among resamples that have
one, and `found_share` is the share that do (low: the onset itself is uncertain).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping, Sequence

import numpy as np

OPS = {"<=": operator.le, ">=": operator.ge}


@dataclasses.dataclass(frozen=True)
class Rule:
    metric: str
    op: str  # "<=" or ">="
    threshold: float

    def holds(self, value: float) -> bool:
        return bool(np.isfinite(value)) and OPS[self.op](value, self.threshold)

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.threshold:g}"


RULES = (Rule("weights_attractor_share", "<=", 0.5), Rule("memorisation_rate", "<=", 0.5),
         Rule("valid_share", ">=", 0.8))


def onset_index(means: Mapping[str, np.ndarray], rules: Sequence[Rule]) -> int | None:
    """Index of the first scale from which every rule holds at every larger scale, or None.
    `means[metric]`: (n_scales,) seed-means in increasing order of N."""
    n = len(next(iter(means.values())))
    ok = np.array([all(r.holds(float(means[r.metric][i])) for r in rules) for i in range(n)], dtype=bool)
    # the first index of the trailing run of True
    if not ok.any() or not ok[-1]:
        return None
    last_bad = np.flatnonzero(~ok)
    return int(last_bad[-1]) + 1 if len(last_bad) else 0


def estimate_onset(scales: Sequence[int], values: Mapping[str, Sequence[Sequence[float]]],
                   rules: Sequence[Rule] = RULES, bootstrap: int = 1000, seed: int = 0) -> dict:
    """N* and its bootstrap interval. `values[metric][i]`: the per-seed values at scales[i] (seeds
    may differ in number between scales; NaN values are left out of a mean). Returns {"onset",
    "low", "high", "found_share", "means", "rules"}."""
    scales = list(scales)
    if list(scales) != sorted(set(scales)):
        raise ValueError(f"scales must increase, got {scales}")
    missing = [r.metric for r in rules if r.metric not in values]
    if missing:
        raise ValueError(f"no values of {missing} (have {sorted(values)})")
    per = {m: [np.asarray(values[m][i], dtype=np.float64) for i in range(len(scales))] for m in values}
    for m, rows in per.items():
        if len(rows) != len(scales) or any(r.size == 0 for r in rows):
            raise ValueError(f"{m}: one non-empty list of seed values per scale ({len(scales)}) needed")

    def means_of(pick) -> dict[str, np.ndarray]:
        return {m: np.array([_nanmean(pick(rows[i], i)) for i in range(len(scales))]) for m, rows in per.items()}

    means = means_of(lambda r, i: r)
    k = onset_index(means, rules)
    rng = np.random.default_rng(seed)
    found = []
    for _ in range(bootstrap):
        draws = [rng.integers(0, per[rules[0].metric][i].size, per[rules[0].metric][i].size)
                 for i in range(len(scales))]  # one resample of seeds per scale, shared by the metrics
        j = onset_index(means_of(lambda r, i: r[draws[i] % r.size]), rules)
        if j is not None:
            found.append(scales[j])
    low = high = None
    if found:
        low, high = (int(v) for v in np.percentile(found, [2.5, 97.5], method="nearest"))
    return {"onset": scales[k] if k is not None else None, "low": low, "high": high,
            "found_share": len(found) / bootstrap if bootstrap else float("nan"),
            "means": {m: v.tolist() for m, v in means.items()}, "rules": [str(r) for r in rules]}


def _nanmean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else float("nan")
