"""`raywsl probe subspace`: sampling inside a low-dimensional PCA subspace of one category, measured.

    raywsl probe subspace -c CONFIG [--category bracket] [--space weights|condition] [--dims 2,8,32]
                          [--radii 0.5,1,2] [--samples 16] [--paths 4] [--resolution 64]

The study (papers/000, §3.2, appendix A.2) took the conditions of k = 381 bracket shapes, kept the top
100 principal components and sampled and interpolated inside them: the shapes kept their global
topology and varied in local detail, judged by eye. Here, for the run's fitted training shapes of one
category (k of them):

- space weights: X = their rows as the weight store holds them (MLP weights, LoRA / mLoRA adapters on
  the base, DeepSDF latents: each parameterisation's own representation), decoded directly;
  space condition: X = their point-cloud encoder conditions (`raywsl train-encoder`), decoded through
  the encoder's head.
- PCA of X (mean mu, directions v_j, standard deviations s_j, j < min(k - 1, m)); for every m of
  --dims and radius r of --radii, --samples draws x = mu + sum_j r z_j s_j v_j, z ~ N(0, I): r = 1
  spreads like the set along those directions, r = 2 twice as far. Paths: --paths pairs of the set's
  shapes, projected into the largest subspace, each at --path-steps evenly spaced points.
- Every sample is decoded (geometry/extract.py) and measured:
    valid        a watertight mesh
    kept         its topology is the set's modal one: the most common (major components, genus) of the
                 set's own decoded shapes (the "training" rows of the tables give the set's own share:
                 a category whose genus varies per shape, like bracket, keeps less than 100 % itself)
    nearest_cd   Chamfer (eval's convention, geometry/distances.py) of --points surface points to the
                 nearest training shape's ingested surface: novelty (0 = a copy)
    displacement mean distance from the nearest training shape's surface points to the sample's
                 surface (a dense sample of it, so the sampling gap stays far below --tau), and
    displaced    the share of those points farther than --tau: local variation is a small displaced
                 share with a visible displacement; a global change displaces most of the surface.

Writes <run.dir>/probe/subspace-<space>/: samples.csv (one row per decoded shape), summary.csv (per kind, m
and radius: means and shares), summary.json, subspace.png (kept share, nearest CD and displaced share
against the radius, a line per m), renders.png (training shapes, then samples at each radius of the
largest m); MLflow: subspace_<space>.kept_m<m>_r<r>, .valid_m<m>_r<r>, .kept_share, ...
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from scipy.spatial import cKDTree

from raywsl import contract as C
from raywsl.config import Config
from raywsl.eval.generation import fastest_chamfer_matrix
from raywsl.geometry import figures
from raywsl.geometry.extract import decode_device
from raywsl.geometry.sampling import sample_surface, shape_rng
from raywsl.probes.common import ProbeError, Training, decode, publish

log = logging.getLogger(__name__)

SPACES = ("weights", "condition")
DENSE_POINTS = 20_000  # surface points of a sample for the displacement (gap ~0.005 at unit scale)


@dataclass
class SubspaceSettings:
    category: str = "bracket"  # "" for every fitted training shape
    space: str = "weights"
    dims: tuple[int, ...] = (2, 8, 32)
    radii: tuple[float, ...] = (0.5, 1.0, 2.0)
    samples: int = 16
    paths: int = 4
    path_steps: int = 5
    resolution: int = 64
    points: int = 2048
    tau: float = 0.02

    def check(self) -> None:
        if self.space not in SPACES:
            raise ProbeError(f"--space {self.space!r}: one of {', '.join(SPACES)}")
        if not self.dims or min(self.dims) < 1 or not self.radii or min(self.radii) <= 0:
            raise ProbeError(f"--dims: positive integers, --radii: positive numbers; got {self.dims}, {self.radii}")
        if self.samples < 1 or self.paths < 0 or self.path_steps < 2 or self.resolution < 8 or self.points < 16:
            raise ProbeError(f"--samples >= 1, --paths >= 0, --path-steps >= 2, --resolution >= 8, --points >= 16; "
                             f"got {self.samples}, {self.paths}, {self.path_steps}, {self.resolution}, {self.points}")
        if self.tau <= 0:
            raise ProbeError(f"--tau must be positive, got {self.tau}")


def _representation(cfg: Config, training: Training, positions: np.ndarray, space: str,
                    encoder_plan: tuple[Config, C.Plan] | None
                    ) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """(X (k, D) of the set, to_rows: (n, D) -> (n, P) rows of the run's field)."""
    if space == "weights":
        return training.weights(positions), lambda x: x
    from raywsl.encoder import load_encoder  # the point-cloud encoder's artifact (raywsl train-encoder)

    encoder = load_encoder(*(encoder_plan or (cfg, training.plan)), decode_device(cfg.fit.device))
    if encoder.field.layout != training.field.layout:
        raise ProbeError("the encoder's field is not the run's field: retrain it (`raywsl train-encoder`)")
    import torch

    x = encoder.conditions(training.surfaces(positions)).detach().cpu().numpy()
    return x, lambda c: encoder.rows(torch.as_tensor(c, dtype=torch.float32)).detach().cpu().numpy()


@dataclass
class Subspace:
    """PCA of a set X (k, D): the mean, the directions v_j (rows) and the standard deviation along each."""

    mean: np.ndarray
    directions: np.ndarray  # (min(k, D), D), orthonormal rows, by decreasing variance
    std: np.ndarray  # (min(k, D),)

    @classmethod
    def of(cls, x: np.ndarray) -> "Subspace":
        mean = x.mean(0)
        _, sv, vt = np.linalg.svd(x - mean, full_matrices=False)
        return cls(mean, vt, sv / math.sqrt(max(len(x) - 1, 1)))

    def sample(self, m: int, radius: float, n: int, rng: np.random.Generator) -> np.ndarray:
        """(n, D): mean + sum_j<m radius z_j std_j v_j, z ~ N(0, I)."""
        z = rng.normal(size=(n, m))
        return self.mean + (radius * z * self.std[:m]) @ self.directions[:m]

    def path(self, a: np.ndarray, b: np.ndarray, m: int, steps: int) -> np.ndarray:
        """(steps, D): from a to b, both projected into the top-m subspace, evenly spaced."""
        ca, cb = ((v - self.mean) @ self.directions[:m].T for v in (a, b))
        alphas = np.linspace(0, 1, steps)[:, None]
        return self.mean + ((1 - alphas) * ca + alphas * cb) @ self.directions[:m]


def _measure(meshes: list, topo: list[dict], truth: np.ndarray, s: SubspaceSettings, seed: int, tag: str
             ) -> list[dict[str, Any]]:
    """Per decoded shape: validity, nearest training shape by Chamfer, displacement from it."""
    clouds, dense, ok = [], [], []
    for i, mesh in enumerate(meshes):
        if mesh is None or not topo[i]["watertight"] or mesh.area <= 0:
            ok.append(False)
            continue
        rng = shape_rng(seed, f"{tag}-{i}")
        clouds.append(sample_surface(mesh, s.points, rng)[0])
        dense.append(sample_surface(mesh, DENSE_POINTS, rng)[0])
        ok.append(True)
    out = [{"valid": v, "nearest": -1, "nearest_cd": math.nan, "displacement": math.nan, "displaced": math.nan}
           for v in ok]
    if not clouds:
        return out
    d = fastest_chamfer_matrix(np.stack(clouds).astype(np.float32), truth)
    for j, i in enumerate(np.flatnonzero(ok)):
        near = int(np.argmin(d[j]))
        gaps = cKDTree(dense[j]).query(truth[near])[0]
        out[i].update(nearest=near, nearest_cd=float(d[j, near]), displacement=float(gaps.mean()),
                      displaced=float((gaps > s.tau).mean()))
    return out


def _modal(topo: list[dict]) -> tuple[int, int | None]:
    """The most common (major components, genus) of the valid shapes."""
    keys = [(t["major_components"], t["genus"]) for t in topo if t["ok"] and t["watertight"]]
    return Counter(keys).most_common(1)[0][0] if keys else (0, None)


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def mean(key: str, where=lambda r: True) -> float:
        v = [r[key] for r in rows if where(r) and r[key] is not None and np.isfinite(r[key])]
        return float(np.mean(v)) if v else math.nan

    return {"n": len(rows), "valid_share": mean("valid"), "kept_share": mean("kept"),
            "components_kept_share": mean("components_kept"), "genus_kept_share": mean("genus_kept"),
            "nearest_cd_median": float(np.nanmedian([r["nearest_cd"] for r in rows]))
            if any(np.isfinite(r["nearest_cd"]) for r in rows) else math.nan,
            "displacement_mean": mean("displacement"), "displaced_share": mean("displaced")}


def run_subspace(cfg: Config, plan: C.Plan, s: SubspaceSettings,
                 encoder_plans: Sequence[tuple[Config, C.Plan]] = ()) -> dict[str, Any]:
    """Run the probe (module docstring); returns the summary it writes. `encoder_plans`: the encoder's
    (config, plan) (space condition; default: the run's own)."""
    s.check()
    training = Training.load(cfg, plan, 3, "the subspace probe")
    positions = training.select(s.category or None)
    k = len(positions)
    if k < 3:
        raise ProbeError(f"category {s.category!r} has {k} fitted training shapes; the subspace probe needs 3 or more")
    x, to_rows = _representation(cfg, training, positions, s.space, encoder_plans[0] if encoder_plans else None)
    pca = Subspace.of(x)
    dims = sorted({min(m, k - 1) for m in s.dims})
    device = decode_device(cfg.fit.device)
    surfaces = training.surfaces(positions)
    rng = np.random.default_rng(cfg.seed)
    truth = np.stack([c[rng.choice(len(c), s.points, replace=len(c) < s.points)] for c in surfaces]).astype(np.float32)

    # The set itself, decoded as every sample is: its modal topology and its own share of it.
    topo, meshes = decode(training.field, to_rows(x), s.resolution, device)
    modal = _modal(topo)
    rows: list[dict[str, Any]] = []
    groups: dict[tuple, list[dict]] = {}
    renders = {"training": meshes[:4]}

    def record(kind: str, m: int, r: float, topo: list[dict], meshes: list, tag: str) -> None:
        measured = _measure(meshes, topo, truth, s, cfg.seed, tag)
        for i, (t, e) in enumerate(zip(topo, measured)):
            kept_c, kept_g = t["major_components"] == modal[0], t["genus"] == modal[1]
            row = {"kind": kind, "m": m, "radius": r, "index": i, **{key: t[key] for key in
                   ("ok", "major_components", "components", "genus", "euler", "watertight")},
                   "components_kept": float(kept_c and e["valid"]), "genus_kept": float(kept_g and e["valid"]),
                   "kept": float(kept_c and kept_g and e["valid"]), **e,
                   "nearest_id": str(training.ids[positions[e["nearest"]]]) if e["nearest"] >= 0 else ""}
            row["valid"] = float(row["valid"])
            rows.append(row)
            groups.setdefault((kind, m, r), []).append(row)

    def add(kind: str, m: int, r: float, xs: np.ndarray, tag: str) -> list:
        topo, meshes = decode(training.field, to_rows(xs), s.resolution, device)
        record(kind, m, r, topo, meshes, tag)
        return meshes

    log.info("subspace: %d %s shapes, space %s, modal topology (components, genus) %s, dims %s", k,
             s.category or "training", s.space, modal, dims)
    record("training", 0, 0.0, topo, meshes, "training")
    for m in dims:
        for ri, r in enumerate(s.radii):
            xs = pca.sample(m, r, s.samples, np.random.default_rng([cfg.seed, m, ri]))
            meshes = add("sample", m, r, xs, f"m{m}-r{ri}")
            if m == dims[-1]:
                renders[f"r={r:g}"] = meshes[:4]
    if s.paths:
        m = dims[-1]
        rng = np.random.default_rng([cfg.seed, 1])
        pairs = [rng.choice(k, 2, replace=False) for _ in range(s.paths)]
        add("path", m, math.nan, np.concatenate([pca.path(x[i], x[j], m, s.path_steps) for i, j in pairs]), "path")

    table = [{"kind": kind, "m": m, "radius": r, **_summary(g)} for (kind, m, r), g in groups.items()]
    out = plan.run.probe_folder(C.SUBSPACE, s.space)
    samples = [t for t in table if t["kind"] == "sample"]
    panels = {label: {f"m={m}": ([t["radius"] for t in samples if t["m"] == m],
                                  [t[key] for t in samples if t["m"] == m], [0.0] * len(s.radii)) for m in dims}
              for label, key in (("topology kept (share)", "kept_share"), ("nearest training CD (median)",
                                 "nearest_cd_median"), (f"displaced share (> {s.tau:g})", "displaced_share"))}
    base = next(t for t in table if t["kind"] == "training")
    fig = figures.plot_bands(panels, C.join(out, C.SUBSPACE_FIGURE), xlabel="radius (x the set's std per direction)",
                             title=f"{training.label}, {s.category or 'all'} ({k} shapes), {s.space}: "
                                   f"the set keeps its modal topology {base['kept_share']:.0%}")
    grid = [mesh for meshes in renders.values() for mesh in meshes]
    titles = [f"{name} #{i}" for name, meshes in renders.items() for i in range(len(meshes))]
    renders_png = figures.render_meshes(grid, C.join(out, C.SUBSPACE_RENDERS), titles=titles, ncols=4, size=192)

    summary = {"category": s.category, "space": s.space, "shapes": k,
               "field_type": training.field.type_name, "parameterisation": training.label,
               "modal_topology": {"major_components": modal[0], "genus": modal[1]}, "dims": dims,
               "explained_variance": (pca.std[:dims[-1]] ** 2 / max((pca.std ** 2).sum(), 1e-30)).tolist(),
               "settings": dataclasses.asdict(s), "table": table}
    sampled = _summary([r for r in rows if r["kind"] == "sample"])
    scalars = {"kept_share": sampled["kept_share"], "valid_share": sampled["valid_share"],
               "training_kept_share": base["kept_share"]}
    for t in samples:
        scalars[f"kept_m{t['m']}_r{t['radius']:g}"] = t["kept_share"]
        scalars[f"valid_m{t['m']}_r{t['radius']:g}"] = t["valid_share"]
        scalars[f"nearest_cd_m{t['m']}_r{t['radius']:g}"] = t["nearest_cd_median"]
    tables = {C.SUBSPACE_SAMPLES: rows, C.SUBSPACE_TABLE: table}
    publish(out, f"{C.SUBSPACE}_{s.space}", summary, tables, [fig, renders_png], scalars)
    return summary
