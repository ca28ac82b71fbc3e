"""Weight-space stability (papers/004, §4.2, Figure 3): does a field type's fitted weight row
depend on where the fit started?

For each shape we fit the field twice, from ι1 and from the variance-preserving perturbation
ι_λ = sqrt(1 - λ²) ι1 + λ ι2 (ι1, ι2 two seeded draws of the field's init, shared by all shapes),
giving φ and φ_λ, for every λ of a list. Per field variant (`mlp`, `mlp-asym`, `lora`, ...) and λ we
report the cosine similarity of φ and φ_λ (high: the fits land on similar weights) and the linear
mode connectivity barrier: the Chamfer distance between the ground-truth surface and the mesh
marching-cubed from the midpoint (φ + φ_λ) / 2 (low: the two fits lie in one linear mode), next to
the endpoints' own Chamfer distances, its baseline.

Each variant is one Ray task (with scaling.use_gpu, fit.gpus_per_actor GPUs each): all of its fits (ι1
and every λ, every shape) go through one batched fitter, then the endpoints and midpoints are decoded
in batches.
Writes `<run.dir>/stability/`: stability.json (every figure with its convention), stability.md (the
table) and stability.png (cosine and barrier against λ, ± one std shaded); logs them to MLflow.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import time
from typing import Any, Sequence

import fsspec
import numpy as np
import torch

from raywsl import cache
from raywsl import contract as C
from raywsl import tracking
from raywsl.config import Config, to_dict
from raywsl.geometry import figures
from raywsl.fit.engine import BatchedFitter, ShapeData
from raywsl.geometry.extract import decode_device, decode_rows
from raywsl.geometry.shape import RECON_POINTS, surface_chamfer, thin_surface
from raywsl.models.fields import FIELDS, field_from_config
from raywsl.runtime import gpu_wait_notice, ray_session, remote
from raywsl.store.rows import RowStore, StoreError
from raywsl.store.split import training_rows

log = logging.getLogger(__name__)

ASYM = "-asym"  # variant name suffix: the field type with asymmetric masks

CONVENTIONS = {
    "init": "ι1 = field.init_rows(seed), ι2 = field.init_rows(seed + 1), one pair shared by every shape, "
            "every entry drawn (the paper's ι ~ N(0, I)); ι_λ = μ + sqrt(1 - λ²) (ι1 - μ) + λ (ι2 - μ) entry "
            "by entry, μ = field.init_mean() (0 but for mlora's a_0 = b_0 = 1): variance preserving around "
            "the init's mean, so at λ = 1 the two fits start from independent draws",
    "cosine": "cos(φ, φ_λ) of the two fitted weight rows (float64), per shape",
    "barrier": "Chamfer distance between the ground-truth surface and the mesh of the midpoint row "
               "(φ + φ_λ) / 2, per shape; a midpoint without a surface is left out and counted (no_surface)",
    "endpoint_cd": "the same Chamfer distance for φ itself (endpoint_cd) and for φ_λ (endpoint_lambda_cd)",
    "chamfer": f"as recon/: {RECON_POINTS} surface points of the decoded mesh (seeded per shape id) against "
               f"the ingested surface points thinned to ~{RECON_POINTS}, squared distances, both directions "
               f"summed, normalised frame; marching cubes at fit.recon_resolution",
    "statistics": "mean, std (population, ddof 0) and median over the shapes with a finite value",
}


class StabilityError(ValueError):
    """The experiment's arguments are invalid (an unknown variant, λ outside [0, 1], ...)."""


# ------------------------------------------------------------------------------------ building blocks

def perturbed_init(i1: torch.Tensor, i2: torch.Tensor, lam: float, mean: torch.Tensor | None = None) -> torch.Tensor:
    """ι_λ = μ + sqrt(1 - λ²) (ι1 - μ) + λ (ι2 - μ) for two draws of an init with mean μ (default 0):
    the paper's variance-preserving perturbation, applied to the deviations so that a non-zero mean
    (mlora's a_0 = b_0 = 1) is not rescaled to (sqrt(1 - λ²) + λ) μ. Every entry is mixed. Computed
    in float64, returned in ι1's dtype; λ = 0 gives ι1 exactly, λ = 1 gives ι2 (to rounding)."""
    if not 0.0 <= lam <= 1.0:
        raise StabilityError(f"lambda must lie in [0, 1], got {lam}")
    if lam == 0.0:
        return i1.clone()
    mu = torch.zeros_like(i1, dtype=torch.float64) if mean is None else mean.double()
    mixed = mu + math.sqrt(1.0 - lam * lam) * (i1.double() - mu) + lam * (i2.double() - mu)
    return mixed.to(i1.dtype)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two flat rows, in float64 (nan when either is zero)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norm) if norm > 0 else float("nan")


def parse_variant(name: str) -> tuple[str, bool]:
    """"<type>" or "<type>-asym" -> (field type, asym)."""
    asym = name.endswith(ASYM)
    kind = name[: -len(ASYM)] if asym else name
    if kind not in FIELDS:
        raise StabilityError(f"variants: unknown field type {kind!r} in {name!r}; known types: {sorted(FIELDS)} "
                             f"(optionally with the suffix {ASYM!r})")
    return kind, asym


def variant_config(cfg: Config, name: str) -> Config:
    """The config of one variant: field.type and field.asym from the name; field.preset the config's
    when it is a preset of that type, else the type's first; the other field keys the config's."""
    kind, asym = parse_variant(name)
    presets = list(FIELDS[kind].PRESETS)
    preset = cfg.field.preset if cfg.field.preset in presets else presets[0]
    return dataclasses.replace(cfg, field=dataclasses.replace(cfg.field, type=kind, asym=asym, preset=preset))


# ------------------------------------------------------------------------------------ one variant (a Ray task)

def run_variant(cfg: Config, shapes: dict[str, Any], lambdas: Sequence[float], base: str = "") -> dict[str, Any]:
    """Fit and decode one variant (`cfg` is the variant's config, `base` its trained base if it needs
    one). `shapes`: ids (n,), points (n, M, 3), sdf (n, M), surface (n, S, 3) thinned. Returns
    per-shape lists (plain data)."""
    t0 = time.perf_counter()
    torch.set_num_threads(1)  # the task holds one CPU
    field = field_from_config(cfg, base=base)
    i1 = field.init_rows(1, torch.Generator().manual_seed(cfg.seed))[0]
    i2 = field.init_rows(1, torch.Generator().manual_seed(cfg.seed + 1))[0]
    inits = [i1] + [perturbed_init(i1, i2, lam, field.init_mean()) for lam in lambdas]  # slot 0: ι1, 1 + k: λ_k
    ids, n, k = list(shapes["ids"]), len(shapes["ids"]), len(inits)

    # Every fit of the variant in one call, so they share batches (key = shape * k + slot).
    jobs = (ShapeData(s * k + j, ids[s], shapes["points"][s], shapes["sdf"][s], inits[j])
            for s in range(n) for j in range(k))
    rows: dict[tuple[int, int], np.ndarray] = {}
    failed: dict[tuple[int, int], str] = {}
    for r in BatchedFitter(field, cfg.fit, cfg.fit.device).fit(jobs):
        s, j = divmod(r.key, k)
        if r.ok:
            rows[s, j] = r.row
        else:
            failed[s, j] = r.reason
    t_fit = time.perf_counter() - t0

    # Decode the endpoints and midpoints in batches: (shape, what, row); what = ("end", j) | ("mid", j).
    todo = [(s, ("end", j), rows[s, j]) for s in range(n) for j in range(k) if (s, j) in rows]
    todo += [(s, ("mid", j), (rows[s, 0] + rows[s, j]) / 2) for s in range(n) for j in range(1, k)
             if (s, 0) in rows and (s, j) in rows]
    device = decode_device(cfg.fit.device)
    cd: dict[tuple[int, tuple[str, int]], tuple[float, str]] = {}
    if todo:
        batch = torch.from_numpy(np.stack([row for _, _, row in todo]).astype(np.float32))
        for (s, what, _), ex in zip(todo, decode_rows(field.bind, batch, cfg.fit.recon_resolution, device)):
            value, reason = surface_chamfer(ex.mesh, shapes["surface"][s], cfg.seed, ids[s])
            cd[s, what] = value, ex.reason or reason

    def fit_reason(s: int, j: int, label: str) -> str:
        return f"{label} fit failed: {failed[s, j]}" if (s, j) in failed else ""

    nan = float("nan")
    endpoint = [cd.get((s, ("end", 0)), (nan, fit_reason(s, 0, "ι1"))) for s in range(n)]
    per_lambda = []
    for j, lam in enumerate(lambdas, start=1):
        entries = []
        for s in range(n):
            fit_failure = fit_reason(s, 0, "ι1") or fit_reason(s, j, "ι_λ")
            end_cd, end_reason = cd.get((s, ("end", j)), (nan, fit_failure))
            mid_cd, mid_reason = cd.get((s, ("mid", j)), (nan, fit_failure))
            entries.append({
                "shape_id": ids[s],
                "cosine": nan if fit_failure else cosine(rows[s, 0], rows[s, j]),
                "barrier": mid_cd,
                "endpoint_cd": endpoint[s][0],
                "endpoint_lambda_cd": end_cd,
                "fit_failed": bool(fit_failure),
                "no_surface": not fit_failure and bool(mid_reason),
                "reason": fit_failure or (f"midpoint: {mid_reason}" if mid_reason else ""),
            })
        per_lambda.append({"lambda": float(lam), "shapes": entries})
    return {"params": field.layout.size, "preset": cfg.field.preset, "fit_seconds": t_fit,
            "seconds": time.perf_counter() - t0, "endpoint_reasons": [r for _, r in endpoint],
            "per_lambda": per_lambda}


# ------------------------------------------------------------------------------------ the experiment

def variant_configs(cfg: Config, variants: list[str], lambdas: list[float], n_shapes: int) -> dict[str, Config]:
    """The config of each variant, after checking the experiment's arguments (StabilityError)."""
    return _validate(cfg, variants, lambdas, n_shapes)


def run_stability(cfg: Config, variants: list[str], lambdas: list[float], n_shapes: int, samples: str,
                  bases: dict[str, str] | None = None) -> dict[str, Any]:
    """Run the experiment on the first `n_shapes` training shapes of the sample store `samples`
    (`bases`: variant -> its trained base, for the variants that need one); write the results into
    the run folder's stability/ and return them (the content of stability.json)."""
    configs = _validate(cfg, variants, lambdas, n_shapes)
    bases = bases or {}
    lambdas, n_shapes = [float(lam) for lam in lambdas], int(n_shapes)
    params = {name: field_from_config(c, base=bases.get(name, "")).layout.size  # FieldError early
              for name, c in configs.items()}
    shapes = _read_shapes(samples, n_shapes)
    log.info("stability: %d variants (%s) x %d lambdas on %d shapes, %d fits each",
             len(configs), ", ".join(f"{v}: {params[v]} params" for v in configs), len(lambdas),
             len(shapes["ids"]), len(shapes["ids"]) * (len(lambdas) + 1))

    with ray_session(cfg.ray.address, cfg.ray.num_cpus or None):
        import ray

        gpus = cfg.fit_gpus  # from the config, never the cluster's state (GPU nodes may autoscale from 0)
        task = remote(run_variant, num_cpus=1, num_gpus=gpus)
        shapes_ref = ray.put(shapes)  # once in the object store, read by every task
        pending = {task.remote(c, shapes_ref, lambdas, bases.get(name, "")): name for name, c in configs.items()}
        outputs = {}
        what = f"{len(pending)} variant task{'s' if len(pending) > 1 else ''} x {gpus:g} GPU"
        with gpu_wait_notice("stability", gpus, what):  # one GPU-sized slot lets the variants start
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                name = pending.pop(done[0])
                outputs[name] = ray.get(done[0])
                log.info("stability: %s done in %.1fs (fitting %.1fs)", name, outputs[name]["seconds"],
                         outputs[name]["fit_seconds"])

    result = _summarise(cfg, configs, outputs, lambdas, n_shapes, shapes["ids"])
    _write(cfg, result)
    return result


def _validate(cfg: Config, variants: list[str], lambdas: list[float], n_shapes: int) -> dict[str, Config]:
    if isinstance(variants, str) or not variants:
        raise StabilityError(f"variants: a non-empty list of names like 'mlp' or 'mlp-asym', got {variants!r}")
    if len(set(variants)) != len(variants):
        raise StabilityError(f"variants: each variant once, got {variants}")
    if not lambdas:
        raise StabilityError("lambdas: a non-empty list of perturbation strengths in [0, 1]")
    bad = [lam for lam in lambdas
           if isinstance(lam, bool) or not (isinstance(lam, numbers.Real) and 0.0 <= lam <= 1.0)]
    if bad:
        raise StabilityError(f"lambdas: every perturbation strength must lie in [0, 1], got {bad}")
    if len(set(lambdas)) != len(lambdas):
        raise StabilityError(f"lambdas: each value once, got {lambdas}")
    if isinstance(n_shapes, bool) or not isinstance(n_shapes, numbers.Integral) or n_shapes < 1:
        raise StabilityError(f"n_shapes: at least 1 shape, got {n_shapes!r}")
    return {name: variant_config(cfg, name) for name in variants}


def _read_shapes(path: str, n_shapes: int) -> dict[str, Any]:
    """The SDF samples and thinned surface of the first `n_shapes` ingested training shapes (plain arrays)."""
    try:
        store = RowStore.open(path, kind="samples")
    except StoreError as e:
        raise StoreError(f"{e}: run `raywsl ingest` with this config first") from e
    rows = training_rows(store, 0)[:n_shapes]
    if not len(rows):
        raise StabilityError(f"{path}: no ingested shapes (none with status done); run `raywsl ingest` first")
    if len(rows) < n_shapes:
        log.warning("stability: n_shapes=%d but only %d shapes are ingested: using those", n_shapes, len(rows))

    def read(name: str) -> np.ndarray:
        arr = store.group[name]
        return arr.get_orthogonal_selection((rows, *[slice(None)] * (arr.ndim - 1)))

    ids = [str(i) for i in store.row_meta()[C.SHAPE_ID][rows]]
    return {"ids": ids, "points": read(C.POINTS), "sdf": read(C.SDF),
            "surface": np.stack([thin_surface(s) for s in read(C.SURFACE)])}


def _stats(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return {"mean": float("nan"), "std": float("nan"), "median": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v)), "n": int(v.size)}


def _summarise(cfg: Config, configs: dict[str, Config], outputs: dict[str, Any], lambdas: list[float],
               n_shapes: int, ids: list[str]) -> dict[str, Any]:
    results, variants = [], {}
    for name, c in configs.items():  # in the order asked, not the order finished
        out = outputs[name]
        endpoint = _stats([out["per_lambda"][0]["shapes"][s]["endpoint_cd"] for s in range(len(ids))])
        variants[name] = {"type": c.field.type, "asym": c.field.asym, "preset": out["preset"],
                          "params": out["params"], "seconds": out["seconds"], "endpoint_cd_mean": endpoint["mean"],
                          "endpoint_failures": [{"shape_id": i, "reason": r}
                                                for i, r in zip(ids, out["endpoint_reasons"]) if r]}
        for entry in out["per_lambda"]:
            shapes = entry["shapes"]
            cos = _stats([e["cosine"] for e in shapes])
            bar = _stats([e["barrier"] for e in shapes])
            results.append({
                "variant": name, "params": out["params"], "lambda": entry["lambda"], "n": len(shapes),
                "cosine_mean": cos["mean"], "cosine_std": cos["std"],
                "barrier_mean": bar["mean"], "barrier_std": bar["std"], "barrier_median": bar["median"],
                "endpoint_cd_mean": _stats([e["endpoint_cd"] for e in shapes])["mean"],
                "endpoint_lambda_cd_mean": _stats([e["endpoint_lambda_cd"] for e in shapes])["mean"],
                "fit_failed": sum(e["fit_failed"] for e in shapes),
                "no_surface": sum(e["no_surface"] for e in shapes),
                "failures": [{"shape_id": e["shape_id"], "reason": e["reason"]} for e in shapes if e["reason"]],
                "shapes": shapes,
            })
    return {
        "experiment": "weight-space stability (papers/004 §4.2): fits from ι1 and ι_λ per shape",
        "conventions": CONVENTIONS,
        "settings": {"variants": list(configs), "lambdas": lambdas, "n_shapes": n_shapes, "shapes": ids,
                     "seed": cfg.seed, "recon_resolution": cfg.fit.recon_resolution, "chamfer_points": RECON_POINTS,
                     "field": to_dict(cfg.field), "fit": to_dict(cfg.fit)},
        "variants": variants,
        "results": results,
    }


def _fmt(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else "n/a"


def _table(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [f"# Weight-space stability ({len(s['shapes'])} shapes, fit.steps={s['fit']['steps']}, "
             f"recon_resolution={s['recon_resolution']}, seed={s['seed']})", "",
             "| variant | params | λ | cosine mean ± std | barrier CD mean ± std | endpoint CD mean (φ / φ_λ) |",
             "|---|---:|---:|---|---|---|"]
    for r in result["results"]:
        barrier = f"{_fmt(r['barrier_mean'])} ± {_fmt(r['barrier_std'])}"
        if r["no_surface"] or r["fit_failed"]:
            barrier += f" ({r['no_surface']} no surface, {r['fit_failed']} fit failed)"
        lines.append(f"| {r['variant']} | {r['params']} | {r['lambda']:g} | {_fmt(r['cosine_mean'])} ± "
                     f"{_fmt(r['cosine_std'])} | {barrier} | {_fmt(r['endpoint_cd_mean'])} / "
                     f"{_fmt(r['endpoint_lambda_cd_mean'])} |")
    lines += ["", *[f"- {k}: {v}" for k, v in result["conventions"].items()]]
    failures = [f"- {r['variant']} λ={r['lambda']:g} {f['shape_id']}: {f['reason']}"
                for r in result["results"] for f in r["failures"]]
    if failures:
        lines += ["", "Failures:", *failures]
    return "\n".join(lines) + "\n"


def _write(cfg: Config, result: dict[str, Any]) -> None:
    out = C.RunLayout(cfg.run_dir).stability
    fs, fs_out = fsspec.core.url_to_fs(out)
    fs.makedirs(fs_out, exist_ok=True)
    cache.write_json(C.join(out, "stability.json"), result)
    cache.write_text(C.join(out, "stability.md"), _table(result))

    curves: dict[str, dict[str, tuple]] = {"cosine similarity": {}, "barrier (Chamfer distance)": {}}
    for name in result["variants"]:
        rs = [r for r in result["results"] if r["variant"] == name]
        lam = [r["lambda"] for r in rs]
        curves["cosine similarity"][name] = (lam, [r["cosine_mean"] for r in rs], [r["cosine_std"] for r in rs])
        curves["barrier (Chamfer distance)"][name] = (lam, [r["barrier_mean"] for r in rs],
                                                      [r["barrier_std"] for r in rs])
    png = C.join(out, "stability.png")
    figures.plot_bands(curves, png, xlabel="perturbation strength λ", log_y=["barrier (Chamfer distance)"],
                       title=f"weight-space stability, {len(result['settings']['shapes'])} shapes (mean ± std)")
    tracking.log_figure(png)
    metrics: dict[str, dict[str, Any]] = {name: {} for name in result["variants"]}
    for r in result["results"]:
        metrics[r["variant"]][f"lambda_{r['lambda']:g}"] = {k: r[k] for k in (
            "cosine_mean", "cosine_std", "barrier_mean", "barrier_std", "barrier_median", "endpoint_cd_mean",
            "endpoint_lambda_cd_mean", "no_surface", "fit_failed")}
    tracking.log_metrics({"stability": metrics})
    for r in result["results"]:
        log.info("stability: %s λ=%g cosine %s ± %s, barrier %s ± %s (endpoints %s / %s)", r["variant"], r["lambda"],
                 _fmt(r["cosine_mean"]), _fmt(r["cosine_std"]), _fmt(r["barrier_mean"]), _fmt(r["barrier_std"]),
                 _fmt(r["endpoint_cd_mean"]), _fmt(r["endpoint_lambda_cd_mean"]))
    log.info("stability: wrote %s", out)
