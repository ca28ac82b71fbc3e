"""`raywsl eval`: evaluate a set of meshes against a reference set.

    generated meshes --load, normalise, sample 2,048 surface points--> clouds --+
    reference meshes --------------------- the same ------------------> clouds --+--> MMD / COV / 1-NNA
    training meshes (optional) ----------- the same ------------------> clouds ----> novelty, memorisation
    generated meshes -----------------------------------------------------------> topology validity

Inside a run (eval.generated and eval.reference empty) the generated set is the sample artifact, the
reference set the source's held-out shapes and the training set the run's training shapes
(store/split.py), and the output is the eval artifact (eval/ in the run folder, shared by runs with
the same samples and eval settings); given sets of meshes, the output is the run folder's own eval/.
It holds `points_generated.npy` and `points_reference.npy` (the exact clouds used, (n, points, 3)),
`ids_*.json` (which shape each cloud is), PNG figures, and `metrics.json`: every figure with its
convention (merged into the run's metrics.json).
A mesh that cannot be loaded (or has no surface) is left out of the set metrics and counted in
`valid_share`, so a generator that produces garbage is never rewarded by silently shrinking.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import trimesh

from raywsl import cache
from raywsl import contract as C
from raywsl import tracking
from raywsl.config import Config
from raywsl.data.meshes import MeshError, load_mesh, normalise
from raywsl.data.sources import resolve_source
from raywsl.geometry import figures
from raywsl.geometry.distances import DEFAULT_EPS, chamfer
from raywsl.geometry.sampling import sample_surface, shape_rng
from raywsl.geometry.topology import topology
from raywsl.eval.generation import generation_metrics, novelty
from raywsl.eval.probe import CONVENTIONS as PROBE_CONVENTIONS
from raywsl.eval.probe import PROBE_SEEDS, PROBE_TEST_FRACTION, eval_metrics, training_weights
from raywsl.eval.weights import pca_spectrum, probe_table, scan_weights
from raywsl.store.rows import RowStore, StoreError
from raywsl.store.split import write_split_manifests

log = logging.getLogger(__name__)

CONVENTIONS = {
    "chamfer": "CD(X,Y) = mean_x min_y |x-y|^2 + mean_y min_x |x-y|^2 (squared, both directions summed)",
    "emd": "EMD(X,Y) = min over bijections phi of mean_x |x - phi(x)| (Euclidean, not squared); "
           "auction algorithm, exact <= value <= exact + {emd_eps} (0: exact assignment)",
    "clouds": "{points} area-weighted surface points per shape, seeded per shape id; shapes "
              "{normalised}",
    "mmd": "MMD = mean over reference y of min over generated x of D(x, y)",
    "cov": "COV = share of reference shapes that are the nearest reference of some generated shape",
    "1nna": "1-NNA = leave-one-out 1-NN accuracy over generated + reference (0.5 is ideal)",
    "validity": "valid_share: generated meshes that load with a surface; single_component_share and "
                "watertight_share over all generated meshes",
    "memorisation": "share of generated shapes whose Chamfer distance to the nearest training shape is "
                    "below memorisation_threshold (given, or calibrated: the 95th percentile of the CD between "
                    "two independent samplings of each training shape, i.e. what a perfect copy scores)",
}


class EvalError(ValueError):
    """The sets to evaluate cannot be evaluated at all (e.g. no valid mesh)."""


@dataclass
class ShapeSet:
    """The meshes of one set and the clouds sampled from the valid ones."""

    name: str
    ids: list[str]
    meshes: list[trimesh.Trimesh | None]
    reasons: list[str]  # "" for a valid mesh, else why it is not
    clouds: np.ndarray = field(repr=False)  # (n_valid, points, 3) float32

    @property
    def valid(self) -> np.ndarray:
        return np.array([not r for r in self.reasons], dtype=bool)

    @property
    def valid_ids(self) -> list[str]:
        return [i for i, r in zip(self.ids, self.reasons) if not r]


def load_set(source: str, name: str, cfg: Config) -> ShapeSet:
    """Load every mesh of `source` (the `eval.<name>` setting); sample a seeded surface cloud from
    each valid one."""
    refs = resolve_source(source, f"eval.{name}")
    meshes, reasons, clouds = [], [], []
    for ref in refs:
        if ref.problem:  # refused by name (data/sources.py): its uri may even name another file
            meshes.append(None)
            reasons.append(ref.problem)
            continue
        try:
            mesh = load_mesh(ref.uri, cfg.ingest.max_faces, max_bytes=cfg.ingest.max_bytes)
            if cfg.eval.normalise:
                mesh, _, _ = normalise(mesh, cfg.ingest.margin)
        except MeshError as e:
            meshes.append(None)
            reasons.append(str(e))
            continue
        meshes.append(mesh)
        reasons.append("")
        clouds.append(sample_surface(mesh, cfg.eval.points, shape_rng(cfg.seed, ref.shape_id))[0])
    n_bad = sum(bool(r) for r in reasons)
    log.info("eval: %s set %s: %d meshes, %d invalid", name, source, len(refs), n_bad)
    empty = np.zeros((0, cfg.eval.points, 3), np.float32)
    return ShapeSet(name, [r.shape_id for r in refs], meshes, reasons, np.stack(clouds) if clouds else empty)


def resampling_noise(s: ShapeSet, cfg: Config, quantile: float = 0.95, max_shapes: int = 256) -> float:
    """The `quantile` of CD(cloud, second cloud) over (up to `max_shapes` of) the set's meshes.

    A generated shape that copies a training shape is at this sampling noise from it, not at 0, and
    the noise depends on the point count and the shapes (at 2,048 points on the corpus it spans 5e-4
    to 3e-3), so a fixed threshold either misses copies or flags novel shapes."""
    valid = [(i, m) for i, m in zip(s.ids, s.meshes) if m is not None]
    pick = np.linspace(0, len(valid) - 1, min(len(valid), max_shapes)).round().astype(int)
    noise = []
    for k in pick:
        shape_id, mesh = valid[k]
        a = sample_surface(mesh, cfg.eval.points, shape_rng(cfg.seed, shape_id))[0]
        b = sample_surface(mesh, cfg.eval.points, shape_rng(cfg.seed + 1, shape_id))[0]
        noise.append(chamfer(a, b))
    return float(np.quantile(noise, quantile))


def is_external(cfg: Config) -> bool:
    """Sets of meshes given by the config (eval.generated / eval.reference), not the run's own."""
    return bool(cfg.eval.generated or cfg.eval.reference)


def _split_sets(cfg: Config, plan: C.Plan | None, out: str):
    """eval settings whose reference (and, unless set, training) meshes are the source's held-out
    shapes (and the run's training shapes), as manifests in `out` written from the sample store."""
    import dataclasses

    try:
        samples = RowStore.open(plan.samples, kind="samples") if plan else None
    except StoreError:
        samples = None
    if samples is None:
        raise EvalError("eval.reference is empty and this config has no ingested samples: set it to the "
                        "reference meshes (folder, glob or manifest), or run `raywsl ingest` first") from None
    sets = write_split_manifests(samples, out, cfg.data.shapes)
    log.info("eval: reference = the held-out split (%s), training = %s", sets["reference"],
             cfg.eval.training or sets["training"])
    return dataclasses.replace(cfg.eval, reference=sets["reference"], training=cfg.eval.training or sets["training"])


def _add_samples_without_surface(gen: ShapeSet, generated: str) -> None:
    """Sampled rows whose field had no surface have no mesh file; `raywsl sample` lists them in
    summary.json. They count as invalid generated shapes (valid_share), not as absent."""
    for entry in cache.read_json(C.join(generated, C.SAMPLES_SUMMARY), {}).get("samples", []):
        if not entry["surface"] and entry["id"] not in gen.ids:
            gen.ids.append(entry["id"])
            gen.meshes.append(None)
            gen.reasons.append(entry["reason"] or "no surface")


def _sampled_rows(plan: C.Plan, dims: int) -> np.ndarray | None:
    """The sample artifact's generated rows (rows.npy), when there and as wide as the training rows."""
    fs, path = fsspec.core.url_to_fs(plan["sample"].join(C.ROWS))
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        generated = np.load(f)
    return generated if generated.ndim == 2 and generated.shape[1] == dims else None


def _weight_diagnostics(cfg: Config, plan: C.Plan, out: str) -> dict[str, Any]:
    """The weight-space diagnostics of the papers, on the run's training rows: the weight statistics
    (norms, pairwise cosine, variance in the top-k coordinates; papers/002 Table 2), the variance per
    principal direction (weights_spectrum.png), the category probes over PROBE_SEEDS seeded splits
    (papers/004 Table 4; eval/probe.py, as `raywsl probe`); and the collapse signals of the sampled
    rows (rows.npy): distinct nearest training rows and the attractor share (papers/002, §3.3); and
    weights_pca.png (training and sampled rows in one PCA plane).

    The training rows are streamed from the store in two passes (eval/weights.py `scan_weights`):
    memory does not grow with their number. Norms, cosine to the mean, the top-k variance shares and
    the nearest training rows are exact; the pairwise cosine, the spectrum, the probes and the figure
    use a seeded subset of at most SAMPLE_ROWS rows (all of them below that; `weights_sample_rows`
    of `weights_n`, `weights_subsampled`)."""
    try:
        inputs = training_weights(cfg, plan)
    except StoreError:
        return {}
    generated = _sampled_rows(plan, inputs.weights.dims)
    scan = scan_weights(inputs.weights, subset=inputs.subset, generated=generated)
    training = scan.subset_weights
    of = f"a seeded subset of {len(training):,} of {len(inputs.rows):,}" if scan.subsampled else f"{len(training)}"
    spectrum = pca_spectrum(training, k=min(50, len(training)))
    figures.plot_spectrum(spectrum["explained_ratio"], C.join(out, C.WEIGHTS_SPECTRUM),
                          title=f"{of} training rows: variance per principal direction")
    _weights_figure(inputs.field_type, training, inputs.labels, generated, out)
    try:
        probe = probe_table(training, inputs.labels, seeds=PROBE_SEEDS, test_fraction=PROBE_TEST_FRACTION,
                            seed=cfg.seed)
        skipped = {}
    except ValueError as e:  # e.g. one category, or a category of one shape: no split to probe
        why = f"{e} ({inputs.describe()})" if scan.subsampled else str(e)
        log.info("eval: no weight-space probes: %s", why)
        probe, skipped = None, {"weights_probe_skipped": why}
    out_metrics: dict[str, Any] = {
        **eval_metrics(probe, scan.statistics), **skipped,
        "weights_pca10_share": float(spectrum["cumulative"][min(9, len(spectrum["cumulative"]) - 1)])}
    near = scan.nearest
    if near is None:
        return out_metrics
    return {**out_metrics,
            "weights_distinct_nearest": int(near["distinct_nearest"]),
            "weights_distinct_nearest_share": near["distinct_nearest"] / max(1, min(len(generated), len(inputs.rows))),
            "weights_attractor_share": float(near["attractor_share"]),
            "weights_nearest_cos_median": float(np.median(near["cos_sim"][:, 0])),
            "weights_cos_to_training_mean": float(np.mean(near["cos_to_training_mean"]))}


def evaluate(cfg: Config, plan: C.Plan | None, out: str) -> dict[str, Any]:
    """Evaluate the run's samples (or eval.generated) against the held-out split (or eval.reference),
    writing into `out`; returns the figures (also out/metrics.json)."""
    ec = cfg.eval
    own = not is_external(cfg)
    if not ec.reference:  # the source's held-out split, when it has ingested shapes
        ec = _split_sets(cfg, plan, out)
    generated = ec.generated or (plan["sample"].path if plan else "")
    if own and not cache.is_complete(generated):
        raise EvalError(f"no samples for this config ({generated}): run `raywsl sample` with this config first")
    t0 = time.perf_counter()
    gen = load_set(generated, "generated", cfg)
    if own:
        _add_samples_without_surface(gen, generated)
    ref = load_set(ec.reference, "reference", cfg)
    for s in (gen, ref):
        if len(s.clouds) == 0:
            raise EvalError(f"the {s.name} set has no valid mesh; first failure: {s.reasons[0]}")
    fs, out_path = fsspec.core.url_to_fs(out)
    fs.makedirs(out_path, exist_ok=True)
    for s in (gen, ref):
        with fs.open(C.join(out_path, f"points_{s.name}.npy"), "wb") as f:
            np.save(f, s.clouds)
        with fs.open(C.join(out_path, f"ids_{s.name}.json"), "w") as f:
            json.dump(s.valid_ids, f)

    matrices: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    result: dict[str, Any] = generation_metrics(gen.clouds, ref.clouds, distances=ec.distances,
                                                device=ec.device, cache=C.join(out, "cache"),
                                                emd_eps=ec.emd_eps or DEFAULT_EPS, emd_exact=ec.emd_eps == 0,
                                                matrices=matrices)
    topo = [topology(m) for m in gen.meshes]
    result.update({
        "n_generated": len(gen.ids), "n_reference": len(ref.ids),
        "valid_share": float(gen.valid.mean()),
        "single_component_share": float(np.mean([t["components"] == 1 for t in topo])),
        "watertight_share": float(np.mean([t["watertight"] for t in topo])),
    })
    if ec.training:
        train = load_set(ec.training, "training", cfg)
        threshold = ec.memorisation_threshold or resampling_noise(train, cfg)
        nov = novelty(gen.clouds, train.clouds, threshold, ec.device)
        result.update({"memorisation_rate": nov.memorisation_rate, "memorisation_threshold": threshold,
                       "novelty_cd_median": float(np.median(nov.nearest_cd)),
                       "novelty_distinct_nearest": int(len(np.unique(nov.nearest_index)))})
    if own:
        result.update(_weight_diagnostics(cfg, plan, out))

    # Pictures: the shapes themselves, and how far each shape is from its nearest reference
    # (generated vs the reference set's own leave-one-out spread, the scale to read them against).
    n = ec.render
    if n:
        figures.render_meshes(gen.meshes[:n], C.join(out, "generated.png"), titles=gen.ids[:n])
        figures.render_meshes(ref.meshes[:n], C.join(out, "reference.png"), titles=ref.ids[:n])
    d_gr, _, d_rr = matrices["cd"] if "cd" in matrices else matrices[ec.distances[0]]
    loo = np.where(np.eye(len(d_rr), dtype=bool), np.inf, d_rr).min(axis=1) if len(d_rr) > 1 else d_rr[:, 0]
    figures.plot_histogram({"generated -> nearest reference": d_gr.min(axis=1),
                            "reference -> nearest other reference": loo},
                           C.join(out, "nearest_reference.png"),
                           xlabel="Chamfer distance" if "cd" in matrices else ec.distances[0])

    result["eval_seconds"] = time.perf_counter() - t0
    conventions = {k: v.format(points=ec.points, emd_eps=ec.emd_eps, normalised="normalised into the unit sphere"
                               if ec.normalise else "in their own frame") for k, v in CONVENTIONS.items()}
    if own:  # the weights_probe_* and Table-2 keys (eval/probe.py)
        conventions["weight_space"] = {**PROBE_CONVENTIONS, "seeds": f"{PROBE_SEEDS} repeats from seed={cfg.seed}",
                                       "test_fraction": f"{PROBE_TEST_FRACTION:g} of each category"}
    details = {"generated": generated, "reference": ec.reference, "training": ec.training,
               "conventions": conventions,
               "invalid_generated": [{"shape_id": i, "reason": r} for i, r in zip(gen.ids, gen.reasons) if r],
               "invalid_reference": [{"shape_id": i, "reason": r} for i, r in zip(ref.ids, ref.reasons) if r],
               "topology_generated": topo}
    cache.write_json(C.join(out, C.STAGE_METRICS), {**result, "eval": details})
    log.info("eval: %s", ", ".join(f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, float)))
    return result


def _weights_figure(field_type: str, training: np.ndarray, labels, generated: np.ndarray | None, out: str) -> None:
    """weights_pca.png: the training rows (by category) and the sampled rows in one PCA plane."""
    if len(training) < 3:
        return
    W, names = training, [f"train: {c}" for c in labels]
    if generated is not None:
        W, names = np.concatenate([W, generated.astype(W.dtype)]), names + ["sampled"] * len(generated)
    figures.plot_embedding(W, names, C.join(out, C.WEIGHTS_PCA), title=f"{field_type} rows: training and sampled")


def log_eval(folder: str) -> dict[str, Any]:
    """The eval artifact's figures and metrics, to the active MLflow run (also when it was reused);
    returns its metrics."""
    metrics = cache.read_json(C.join(folder, C.STAGE_METRICS), {})
    tracking.log_metrics({k: v for k, v in metrics.items() if not isinstance(v, (dict, list))})
    for name in ("generated.png", "reference.png", "nearest_reference.png", C.WEIGHTS_PCA, C.WEIGHTS_SPECTRUM):
        tracking.log_figure(C.join(folder, name))
    return metrics
