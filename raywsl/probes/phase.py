"""`raywsl probe phase`: the connectivity phase transition along a path, measured.

    raywsl probe phase -c CONFIG [--space cloud|weights] [--from A --to B] [--steps 101] [--seeds 5]
                       [--points 1000] [--radius 0.6] [--sigma 0.3] [--resolution 64] [--encoders 1]

The study (papers/000, §3.1, appendix A.1) interpolates the point-cloud condition of a shape model
from an evenly sampled sphere (Fibonacci, 1,000 points) to an unevenly sampled one (each point moved
by N(0, sigma^2 I) and put back on the sphere), slerp per point, and sees the decoded shape jump from
one connected component to many at a critical α*. Here:

- space cloud (the study's protocol): the path is a point cloud P_α (slerp per point between the
  Fibonacci sphere and its noisy copy, of radius --radius, RADIUS below by default; with --from / --to,
  linear per point between two training shapes' surface clouds, paired by index), encoded by the run's
  point-cloud encoder
  (`raywsl train-encoder`) into a row of the run's field. Seeds draw the noise (or the clouds' points);
  --encoders K repeats every path through K encoders (encoder.seed, +1, ...: trained when missing).
- space weights: the path is linear in weight space between two fitted rows (--from / --to: shape ids
  or categories; seed s takes the s-th shape of a category), decoded directly: no encoder.

Each α on the grid (--steps points in [0, 1]) is decoded at --resolution and its topology counted
(geometry/topology.py); the count is the number of major components (>= 1 % of the area: a learned
field's specks do not decide it), 0 where there is no surface. Per seed:

    start, end     the counts at α = 0 and α = 1
    alpha_star     the first α whose count differs from the start count (the onset), NaN when none does
    width          from the onset to the last change of the count (after it the count is the end count),
                   plus one grid step: a clean jump has the grid's resolution; a staircase (1 -> 2 -> 3)
                   or a flickering transition is wider
    changes        how often the count changes along the path (1: a clean jump)
    genus_*        the same figures of the genus (-1 where the mesh is open or missing): a path from a
                   sphere to a torus changes genus, not components

and over seeds the mean with a 95 % t interval, and the share of seeds with a transition.

Writes <run.dir>/probe/phase-<space>/: path.csv (seed, α, topology per point), transitions.csv (one row per
seed), summary.json, phase.png (counts vs α, every seed, with the shapes of the first seed at α = 0,
around α* and at 1); MLflow: phase_<space>.alpha_star, .alpha_star_lo / _hi, .width, .transition_share,
.genus_alpha_star, the figure.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from raywsl import contract as C
from raywsl.config import Config
from raywsl.geometry import figures
from raywsl.geometry.extract import decode_device
from raywsl.probes.common import ProbeError, Training, decode, interval, publish

log = logging.getLogger(__name__)

SPACES = ("cloud", "weights")
# The spheres' radius: the size of the corpus's blobs (0.55-0.7). The study's unit sphere is the
# normalisation sphere (1 / (1 + ingest.margin) here), but a field decoded from a cloud that large reaches
# past the decoding cube and is cut open there: --radius 0.97 reproduces it.
RADIUS = 0.6


@dataclass
class PhaseSettings:
    space: str = "cloud"
    start: str = ""  # --from: a shape id or category ("" in space cloud: the Fibonacci sphere)
    end: str = ""  # --to
    steps: int = 101
    seeds: int = 5
    points: int = 1000
    radius: float = RADIUS  # the spheres' radius in the normalised frame
    sigma: float = 0.3
    resolution: int = 64
    encoders: int = 1  # space cloud: encoders of seeds encoder.seed, +1, ... (each path through each)

    def check(self) -> None:
        if self.space not in SPACES:
            raise ProbeError(f"--space {self.space!r}: one of {', '.join(SPACES)}")
        if self.encoders < 1 or (self.encoders > 1 and self.space != "cloud"):
            raise ProbeError(f"--encoders {self.encoders}: at least 1, and more only with --space cloud")
        if self.steps < 2 or self.seeds < 1 or self.points < 8 or self.resolution < 8:
            raise ProbeError(f"--steps >= 2, --seeds >= 1, --points >= 8 and --resolution >= 8; got {self.steps}, "
                             f"{self.seeds}, {self.points}, {self.resolution}")
        if not (0 < self.radius < 1) or self.sigma <= 0:
            raise ProbeError(f"--radius in (0, 1) (the decoding cube is [-1, 1]^3) and --sigma > 0; got "
                             f"{self.radius}, {self.sigma}")
        if self.space == "weights" and not (self.start and self.end):
            raise ProbeError("--space weights needs --from and --to (shape ids or categories of fitted shapes)")
        if bool(self.start) != bool(self.end):
            raise ProbeError("--from and --to go together")


# ------------------------------------------------------------------------------------ paths

def fibonacci_sphere(n: int, radius: float = 1.0) -> np.ndarray:
    """(n, 3) points evenly spread on the sphere (the golden spiral)."""
    i = np.arange(n) + 0.5
    y = 1 - 2 * i / n
    r = np.sqrt(1 - y * y)
    theta = math.pi * (3 - math.sqrt(5)) * i
    return (radius * np.stack([r * np.cos(theta), y, r * np.sin(theta)], axis=1)).astype(np.float32)


def noisy_sphere(a: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """B_i = (A_i / r + delta_i) / |A_i / r + delta_i| r, delta ~ N(0, sigma^2 I): on the same sphere, uneven."""
    r = np.linalg.norm(a, axis=1, keepdims=True)
    b = a / r + sigma * rng.normal(size=a.shape)
    return (b / np.linalg.norm(b, axis=1, keepdims=True) * r).astype(np.float32)


def slerp(a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
    """Per point, along the great circle from a_i to b_i (both on one sphere about the origin)."""
    r = np.linalg.norm(a, axis=1, keepdims=True)
    ua, ub = a / r, b / np.linalg.norm(b, axis=1, keepdims=True)
    omega = np.arccos(np.clip((ua * ub).sum(1, keepdims=True), -1.0, 1.0))
    s = np.sin(omega)
    small = s < 1e-6  # (nearly) the same point: linear is exact enough
    wa = np.where(small, 1 - alpha, np.sin((1 - alpha) * omega) / np.where(small, 1, s))
    wb = np.where(small, alpha, np.sin(alpha * omega) / np.where(small, 1, s))
    return ((wa * ua + wb * ub) * r).astype(np.float32)


def lerp(a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
    return ((1 - alpha) * a + alpha * b).astype(a.dtype)


def transition(alphas: np.ndarray, counts: np.ndarray) -> dict[str, Any]:
    """The module docstring's per-seed figures of one path's counts."""
    counts = np.asarray(counts)
    changes = np.flatnonzero(counts[1:] != counts[:-1]) + 1  # indices where the count changes
    out = {"start": int(counts[0]), "end": int(counts[-1]), "max": int(counts.max()), "changes": int(len(changes)),
           "alpha_star": math.nan, "width": math.nan}
    if len(changes):
        step = float(alphas[1] - alphas[0])
        out["alpha_star"] = float(alphas[changes[0]])
        out["width"] = float(alphas[changes[-1]] - alphas[changes[0]] + step)
    return out


# ------------------------------------------------------------------------------------ the probe

def _paths(cfg: Config, training: Training, s: PhaseSettings, encoder_plans: Sequence[tuple[Config, C.Plan]]
           ) -> tuple[Callable[[int, int, np.ndarray], np.ndarray], str]:
    """(rows_of(encoder, seed, alphas) -> (len(alphas), P) rows along the path of that seed through that
    encoder, what the path is)."""
    if s.space == "weights":
        def ends(seed: int) -> tuple[int, int]:
            pick = [_nth(training, key, seed) for key in (s.start, s.end)]
            return pick[0], pick[1]

        def rows_of(_: int, seed: int, alphas: np.ndarray) -> np.ndarray:
            a, b = training.weights(list(ends(seed)))
            return np.stack([lerp(a, b, float(t)) for t in alphas])
        return rows_of, f"weights: {s.start} -> {s.end}, linear"

    from raywsl.encoder import load_encoder  # the point-cloud encoder's artifact (raywsl train-encoder)

    encoders = [load_encoder(c, p, decode_device(cfg.fit.device)) for c, p in encoder_plans or [(cfg, training.plan)]]
    if any(e.field.layout != training.field.layout for e in encoders):
        raise ProbeError("the encoder's field is not the run's field: retrain it (`raywsl train-encoder`)")

    def clouds(seed: int) -> tuple[np.ndarray, np.ndarray, Callable]:
        rng = np.random.default_rng([cfg.seed, seed])
        if not s.start:
            a = fibonacci_sphere(s.points, s.radius)
            return a, noisy_sphere(a, s.sigma, rng), slerp
        surfaces = training.surfaces([_nth(training, key, 0) for key in (s.start, s.end)])
        pick = [rng.choice(len(c), s.points, replace=len(c) < s.points) for c in surfaces]
        return surfaces[0][pick[0]], surfaces[1][pick[1]], lerp

    def rows_of(j: int, seed: int, alphas: np.ndarray) -> np.ndarray:
        a, b, path = clouds(seed)
        batch = np.stack([path(a, b, float(t)) for t in alphas])
        return encoders[j].rows(encoders[j].conditions(batch)).detach().cpu().numpy()

    what = (f"cloud: Fibonacci sphere ({s.points} points, radius {s.radius:.3g}) -> noisy (sigma {s.sigma:g}), slerp"
            if not s.start else f"cloud: {s.start} -> {s.end} surfaces ({s.points} points), linear per point")
    return rows_of, what


def _nth(training: Training, key: str, n: int) -> int:
    """Position of shape id `key`, or the n-th (cyclically) shape of category `key`."""
    if key in training.ids:
        return training.find(key)
    picked = training.select(key)
    return int(picked[n % len(picked)])


def run_phase(cfg: Config, plan: C.Plan, s: PhaseSettings,
              encoder_plans: Sequence[tuple[Config, C.Plan]] = ()) -> dict[str, Any]:
    """Run the probe (module docstring); returns the summary it writes. `encoder_plans`: (config, plan)
    of each of the s.encoders encoders (space cloud; default: the run's own)."""
    s.check()
    training = Training.load(cfg, plan, 2 if s.space == "weights" else 1, "the phase probe")
    rows_of, what = _paths(cfg, training, s, encoder_plans)
    device = decode_device(cfg.fit.device)
    alphas = np.linspace(0.0, 1.0, s.steps)
    out = plan.run.probe_folder(C.PHASE, s.space)
    path_rows, per_seed, curves, first_meshes = [], [], {}, []
    for j in range(s.encoders):
        for seed in range(s.seeds):
            topo, meshes = decode(training.field, rows_of(j, seed, alphas), s.resolution, device)
            counts = np.array([t["major_components"] if t["ok"] else 0 for t in topo])
            genus = np.array([-1 if t["genus"] is None else t["genus"] for t in topo])  # -1: open, or no surface
            path_rows += [{"encoder": j, "seed": seed, "alpha": float(a), **t} for a, t in zip(alphas, topo)]
            per_seed.append({"encoder": j, "seed": seed, **transition(alphas, counts),
                             **{f"genus_{k}": v for k, v in transition(alphas, genus).items()}})
            curves[f"seed {seed}" if s.encoders == 1 else f"encoder {j} seed {seed}"] = (alphas, counts)
            if not first_meshes:
                first_meshes = meshes
            log.info("phase: encoder %d seed %d: %s", j, seed, per_seed[-1])

    stars = [t["alpha_star"] for t in per_seed]
    summary = {
        "path": what, "space": s.space, "settings": dataclasses.asdict(s),
        "field_type": training.field.type_name, "parameterisation": training.label,
        "alpha_star": interval(stars), "width": interval([t["width"] for t in per_seed]),
        "transition_share": float(np.mean([math.isfinite(a) for a in stars])),
        "genus_alpha_star": interval([t["genus_alpha_star"] for t in per_seed]),
        "genus_transition_share": float(np.mean([math.isfinite(t["genus_alpha_star"]) for t in per_seed])),
        "start_components": interval([t["start"] for t in per_seed]),
        "end_components": interval([t["end"] for t in per_seed]),
        "max_components": max(t["max"] for t in per_seed), "seeds": per_seed,
    }
    # The first seed's shapes at 0, just before and at its onset, and 1 (or 0, 1/2, 1 with no onset).
    first = per_seed[0]
    marks = [0.0, 0.5, 1.0]
    if math.isfinite(first["alpha_star"]):
        j = int(np.searchsorted(alphas, first["alpha_star"]))
        marks = sorted({0.0, float(alphas[max(j - 1, 0)]), float(alphas[j]), 1.0})
    picks = [int(np.argmin(np.abs(alphas - m))) for m in marks]
    counts0 = next(iter(curves.values()))[1]
    figure = figures.plot_with_renders(
        curves, [first_meshes[i] for i in picks], [f"α={alphas[i]:.3f}: {counts0[i]} part(s)" for i in picks],
        C.join(out, C.PHASE_FIGURE), xlabel="α", ylabel="major components", marks=[alphas[i] for i in picks[1:-1]],
        title=f"{training.label}: {what}")
    scalars = {"alpha_star": summary["alpha_star"]["mean"], "alpha_star_lo": summary["alpha_star"]["lo"],
               "alpha_star_hi": summary["alpha_star"]["hi"], "width": summary["width"]["mean"],
               "transition_share": summary["transition_share"], "genus_alpha_star": summary["genus_alpha_star"]["mean"],
               "genus_transition_share": summary["genus_transition_share"]}
    tables = {C.PHASE_PATH: path_rows, C.PHASE_TRANSITIONS: per_seed}
    publish(out, f"{C.PHASE}_{s.space}", summary, tables, [figure], scalars)
    return summary
