"""Sweep configs and their search spaces: which runs a sweep is made of.

A sweep config (configs/sweeps/NAME.yaml) names a base run config and the axes to vary:

    name: scale_study_small
    base: configs/quickstart.yaml          # relative to the sweep file, or to the working folder
    overrides: [fit.steps=200]             # applied to every trial
    scale: [20, 50, 100]                   # data.shapes: nested subsets of one source (first-class axis)
    variants:                              # named bundles of keys (the parameterisations)
      mlp-warm: {field.type: mlp, fit.init: warm}
      mlora-asym: {field.type: mlora, field.asym: true, field.kappa: {grid: [2.0, 6.0]}}  # own grid axis
    space:                                 # any config key
      field.rank: {grid: [4, 8]}
      field.kappa: {choice: [2.0, 6.0]}
      train.lr: {loguniform: [1.0e-4, 1.0e-3]}
    seeds: [0, 1, 2]                       # diffusion.seed, a grid axis: one data split and one set of
                                           # fits, several diffusion runs (confidence bands)
    samples: 2                             # draws of the sampled axes per grid point
    max_concurrent_trials: 1
    trial_resources: {cpu: 0.5, gpu: 0}    # the trial's own process (its stages' workers ask for their own)
    asha: {metric: loss, mode: min, grace_period: 200, reduction_factor: 2}   # optional early stopping

Grid axes (scale, variants, seeds, `grid`) multiply; a variant's own grid axes multiply only its
trials (mask variance kappa exists only where masks do), and a variant's own `data.shapes: {grid: [200]}`
runs it at those of the sweep's scales only (a (rank, kappa) heatmap at one N), as its own
`diffusion.seed: {grid: [0]}` does with the seeds; sampled axes (`choice`, `uniform`,
`loguniform`) are drawn `samples` times per grid point from a generator seeded by the sweep's name,
so a sweep's trials are the same list every time it is read (what resuming and sharing rely on).
`asha` stops trials early on a metric the denoiser's training reports (loss, at train.checkpoint_every
steps; time is the denoiser step): worse trials stop after grace_period steps.
Across scales the base network is pinned to the largest N (`base.shapes`), so every trial of one
base config shares one trained base unless the space sets base.shapes itself.

Every trial's config is built and validated (typed keys, registries) when the sweep is read: a bad
key or value fails before any work, naming the trial and the key.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
from pathlib import Path
from typing import Any, Sequence

from raywsl.config import Config, ConfigError, load_config, read_yaml_mapping
from raywsl.models.registry import check_config

GRID, CHOICE, UNIFORM, LOGUNIFORM = "grid", "choice", "uniform", "loguniform"
KINDS = (GRID, CHOICE, UNIFORM, LOGUNIFORM)
SCALE_KEY, SEED_KEY, BASE_SHAPES_KEY = "data.shapes", "diffusion.seed", "base.shapes"
TOP_KEYS = ("name", "base", "overrides", "scale", "variants", "space", "seeds", "samples",
            "max_concurrent_trials", "trial_resources", "asha")
ASHA_DEFAULTS = {"metric": "loss", "mode": "min", "grace_period": 200, "reduction_factor": 2}


class SweepError(ConfigError):
    """A sweep config that cannot be read: names the file, the key and what is wrong."""


@dataclasses.dataclass(frozen=True)
class Axis:
    """One varied config key: a grid of values, or a distribution to sample from."""

    key: str
    kind: str  # one of KINDS
    values: tuple[Any, ...]  # grid / choice: the values; uniform / loguniform: (low, high)

    def draw(self, rng: random.Random) -> Any:
        if self.kind == CHOICE:
            return self.values[rng.randrange(len(self.values))]
        low, high = self.values
        if self.kind == UNIFORM:
            return rng.uniform(low, high)
        return math.exp(rng.uniform(math.log(low), math.log(high)))


@dataclasses.dataclass(frozen=True)
class Trial:
    """One run of a sweep: its name (stable, from its settings), the keys it sets, its config."""

    name: str
    params: dict[str, Any]  # the varied keys (variant name under "variant"), what MLflow and reports show
    overrides: tuple[str, ...]  # key=value strings on top of the base config
    config: Config


@dataclasses.dataclass(frozen=True)
class Sweep:
    name: str
    base: str  # the base run config's path
    overrides: tuple[str, ...]
    scale: tuple[int, ...]
    variants: dict[str, dict[str, Any]]
    axes: tuple[Axis, ...]
    seeds: tuple[int, ...]
    samples: int
    max_concurrent_trials: int
    trial_resources: dict[str, float]
    asha: dict[str, Any] | None
    trials: tuple[Trial, ...]


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> Sweep:
    """Read, check and expand the sweep config at `path` (SweepError naming what is wrong); `overrides`
    (`key=value`, as on the command line) come after the config's own `overrides:`, for every trial
    (a cluster's cache.dir and mlflow.tracking_uri)."""
    path = Path(path)
    raw = read_yaml_mapping(path, "sweep config", SweepError)
    if overrides:
        raw = {**raw, "overrides": [*(raw.get("overrides") or []), *overrides]}
    return parse_sweep(raw, where=str(path), folder=path.parent)


def parse_sweep(raw: dict[str, Any], where: str = "sweep", folder: Path = Path(".")) -> Sweep:
    """A Sweep from the mapping of a sweep config; `folder` resolves a relative `base`."""
    def fail(msg: str) -> SweepError:
        return SweepError(f"{where}: {msg}")

    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise fail(f"unknown keys {unknown}; allowed: {', '.join(TOP_KEYS)}")
    name = raw.get("name") or Path(where).stem
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise fail(f"name must be letters, digits, '-' or '_', got {name!r}")
    base = _base_path(raw.get("base"), folder, fail)
    overrides = _string_list(raw.get("overrides", []), "overrides", fail)
    scale = _scale(raw.get("scale", []), fail)
    variants = _variants(raw.get("variants", {}), fail)
    if not isinstance(raw.get("space") or {}, dict):
        raise fail("space: a mapping of config keys to {grid|choice|uniform|loguniform: ...}")
    axes = tuple(_axis(key, spec, fail) for key, spec in (raw.get("space") or {}).items())
    seeds = _int_list(raw.get("seeds", []), "seeds", fail)
    samples = _positive_int(raw.get("samples", 1), "samples", fail)
    concurrent = _positive_int(raw.get("max_concurrent_trials", 1), "max_concurrent_trials", fail)
    resources = _resources(raw.get("trial_resources", {}), fail)
    asha = _asha(raw["asha"], fail) if raw.get("asha") is not None else None
    sweep_axes = {SCALE_KEY: ("scale", scale), SEED_KEY: ("seeds", seeds)}
    varied = [a.key for a in axes] + [k for bundle in variants.values() for k in bundle if k not in sweep_axes]
    for reserved, (axis, values) in sweep_axes.items():
        if reserved in varied and values:
            raise fail(f"{reserved} is set by `{axis}`; do not also vary it in space or variants")
    for variant, bundle in variants.items():  # a variant's own scales / seeds: a subset of the sweep's
        for key, (axis, values) in sweep_axes.items():
            if key in bundle and not (_is_axis(bundle[key]) and set(bundle[key][GRID]) <= set(values)):
                raise fail(f"variants.{variant}.{key}: {{grid: [...]}} with some of the sweep's {axis} {list(values)} "
                           f"(the ones this variant runs at), got {bundle[key]!r}")

    sweep = Sweep(name, base, overrides, scale, variants, axes, seeds, samples, concurrent, resources, asha, ())
    return dataclasses.replace(sweep, trials=tuple(expand(sweep, fail)))


def expand(sweep: Sweep, fail=SweepError) -> list[Trial]:
    """Every trial of the sweep, in a fixed order: grid points (scale, variant with its own grid axes,
    grid axes, seeds) outermost first, then `samples` draws of the sampled axes per grid point."""
    grid_axes = [a for a in sweep.axes if a.kind == GRID]
    sampled = [a for a in sweep.axes if a.kind != GRID]
    rng = random.Random(sweep.name)  # same draws every time this sweep is read
    dims: list[list[tuple[tuple[str, Any], ...]]] = []  # per grid dimension: its points, each a few (key, value)
    if sweep.scale:
        dims.append([((SCALE_KEY, n),) for n in sweep.scale])
    if sweep.variants:
        dims.append([(("variant", name), *local) for name, bundle in sweep.variants.items()
                     for local in itertools.product(*[[(k, v) for v in spec[GRID]] for k, spec in bundle.items()
                                                      if _is_axis(spec) and k not in (SCALE_KEY, SEED_KEY)])])
    dims += [[((a.key, v),) for v in a.values] for a in grid_axes]
    if sweep.seeds:
        dims.append([((SEED_KEY, s),) for s in sweep.seeds])
    pin_base = bool(sweep.scale) and BASE_SHAPES_KEY not in {a.key for a in sweep.axes} and not any(
        BASE_SHAPES_KEY in bundle for bundle in sweep.variants.values())
    trials, names = [], set()
    for point in itertools.product(*dims) if dims else [()]:
        for _ in range(sweep.samples if sampled else 1):
            params = dict(pair for group in point for pair in group)
            bundle = sweep.variants.get(params.get("variant"), {})
            if any(k in bundle and params[k] not in bundle[k][GRID] for k in (SCALE_KEY, SEED_KEY)):
                break  # not one of this variant's scales or seeds
            params |= {a.key: a.draw(rng) for a in sampled}
            fixed = {k: v for k, v in bundle.items() if not _is_axis(v)}
            keys = fixed | {k: v for k, v in params.items() if k != "variant"}
            if pin_base:
                keys[BASE_SHAPES_KEY] = max(sweep.scale)
            overrides = (*sweep.overrides, *(f"{k}={json.dumps(v)}" for k, v in keys.items()))
            name = trial_name(params)
            if name in names:  # the same settings twice (e.g. choice drew a repeat): one trial
                continue
            names.add(name)
            try:
                cfg = check_config(load_config(sweep.base, overrides))
            except ConfigError as e:
                raise fail(f"trial {name}: {e}") from e
            trials.append(Trial(name, params, overrides, cfg))
    return trials


def _is_axis(value: Any) -> bool:
    """A variant's own grid axis ({grid: [...]}) rather than a fixed value."""
    return isinstance(value, dict) and set(value) == {GRID}


def trial_name(params: dict[str, Any]) -> str:
    """A readable, stable folder name for a trial: its varied keys' last parts and values."""
    parts = []
    for key, value in params.items():
        short = {SCALE_KEY: "N", SEED_KEY: "seed", "variant": ""}.get(key, key.rsplit(".", 1)[-1])
        text = f"{value:.3g}" if isinstance(value, float) else str(value).replace(" ", "")
        parts.append(f"{short}{'=' if short else ''}{text}")
    return ",".join(parts) or "trial"


# ------------------------------------------------------------------------------------ field checks

def _base_path(value: Any, folder: Path, fail) -> str:
    if not isinstance(value, str) or not value:
        raise fail("base: the path of the run config every trial starts from (e.g. configs/quickstart.yaml)")
    for candidate in (folder / value, Path(value)):
        if candidate.is_file():
            return str(candidate)
    raise fail(f"base: run config {value!r} does not exist (looked beside the sweep file and in the "
               f"working folder)")


def _string_list(value: Any, key: str, fail) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise fail(f"{key}: a list of key=value strings, got {value!r}")
    return tuple(value)


def _int_list(value: Any, key: str, fail) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise fail(f"{key}: a list of integers, got {value!r}")
    if len(set(value)) != len(value):
        raise fail(f"{key}: values repeat: {value}")
    return tuple(value)


def _scale(value: Any, fail) -> tuple[int, ...]:
    scale = _int_list(value, "scale", fail)
    if any(n < 1 for n in scale) or list(scale) != sorted(scale):
        raise fail(f"scale: positive numbers of training shapes in increasing order (nested subsets), "
                   f"got {list(scale)}")
    return scale


def _positive_int(value: Any, key: str, fail) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise fail(f"{key}: a positive integer, got {value!r}")
    return value


def _variants(value: Any, fail) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict) or not all(isinstance(v, dict) and v for v in value.values()):
        raise fail("variants: a mapping of names to non-empty mappings of config keys "
                   "(e.g. mlora-asym: {field.type: mlora, field.asym: true})")
    for name, bundle in value.items():
        for key, spec in bundle.items():
            if isinstance(spec, dict):  # the variant's own grid axis: checked like one of `space`
                axis = _axis(key, spec, lambda msg: fail(f"variants.{name}: {msg}"))
                if axis.kind != GRID:
                    raise fail(f"variants.{name}.{key}: a variant's own axes are grids ({{grid: [...]}}), "
                               f"got {axis.kind}")
    return {str(k): dict(v) for k, v in value.items()}


def _resources(value: Any, fail) -> dict[str, float]:
    if not isinstance(value, dict) or set(value) - {"cpu", "gpu"} or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in value.values()):
        raise fail(f"trial_resources: {{cpu: N, gpu: N}} with non-negative numbers, got {value!r}")
    if value.get("cpu", 0.5) <= 0:  # Ray Tune refuses a trial of 0 CPUs
        raise fail(f"trial_resources.cpu: more than 0 (a fraction such as 0.5), got {value['cpu']!r}")
    # A trial's own process mostly waits for its stages' tasks and workers, which ask for their own CPUs:
    # half a CPU leaves those free (a whole one per trial starves them on a 2-core laptop).
    return {"cpu": float(value.get("cpu", 0.5)), "gpu": float(value.get("gpu", 0))}


def _asha(value: Any, fail) -> dict[str, Any]:
    if value is True:
        value = {}
    if not isinstance(value, dict) or set(value) - set(ASHA_DEFAULTS):
        raise fail(f"asha: a mapping with keys among {', '.join(ASHA_DEFAULTS)} (or true), got {value!r}")
    asha = ASHA_DEFAULTS | value
    if asha["mode"] not in ("min", "max") or not isinstance(asha["metric"], str):
        raise fail(f"asha: metric a name of the denoiser's training metrics (loss), mode min or max, got {value!r}")
    for key in ("grace_period", "reduction_factor"):
        _positive_int(asha[key], f"asha.{key}", fail)
    if asha["reduction_factor"] < 2:
        raise fail(f"asha.reduction_factor: at least 2, got {asha['reduction_factor']}")
    return asha


def _axis(key: Any, spec: Any, fail) -> Axis:
    if not isinstance(key, str) or not key:
        raise fail(f"space: keys are config keys such as train.lr, got {key!r}")
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise fail(f"space.{key}: one of {{grid: [...]}}, {{choice: [...]}}, {{uniform: [low, high]}}, "
                   f"{{loguniform: [low, high]}}, got {spec!r}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise fail(f"space.{key}.{kind}: a non-empty list, got {values!r}")
    if kind in (UNIFORM, LOGUNIFORM):
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) \
                or not values[0] < values[1]:
            raise fail(f"space.{key}.{kind}: [low, high] numbers with low < high, got {values!r}")
        if kind == LOGUNIFORM and values[0] <= 0:
            raise fail(f"space.{key}.loguniform: low must be > 0, got {values[0]!r}")
    elif len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
        raise fail(f"space.{key}.{kind}: values repeat: {values!r}")
    return Axis(key, kind, tuple(values))
