"""`raywsl sample`: new weight rows from the trained denoiser, decoded to meshes.

    the train artifact (checkpoints/diffusion_final) --DDIM (sample.steps) or ancestral--> standardised
        rows --un-standardise--> weight rows (sample.count, P) --the weight store's field (frozen base
        and masks included)--> marching cubes at sample.resolution
    --> the sample artifact (generated/ in the run folder): rows.npy, sample_<k>.ply (normalised
        frame), generated.png and summary.json

Rows are drawn from one generator seeded by `seed` (on the CPU), so a seed and the sampler settings
give the same rows on any device. A row whose field has no surface is still written to rows.npy and
listed with its reason in summary.json; it has no mesh file, and `raywsl eval` counts it against the
generator (valid_share).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from raywsl import cache
from raywsl import contract as C
from raywsl import tracking
from raywsl.config import Config
from raywsl.geometry import figures
from raywsl.geometry.extract import decode_rows
from raywsl.models.denoiser import diffusion_seed, load_for_sampling, make_diffusion
from raywsl.models.fields import field_of
from raywsl.progress import Progress
from raywsl.store.rows import StoreError
from raywsl.store.weights import open_weights

log = logging.getLogger(__name__)

SAMPLE_BATCH = 256  # rows denoised at once


def check_inputs(cfg: Config, plan: C.Plan) -> None:
    if not cache.is_complete(plan["train"].path):
        raise StoreError(f"no trained denoiser for this config ({plan['train'].path}): run `raywsl train` "
                         f"with this config first")


def sample(cfg: Config, plan: C.Plan, out: str) -> dict[str, Any]:
    """Sample sample.count rows, decode them into `out`; returns the summary (also out/summary.json)."""
    check_inputs(cfg, plan)
    sc = cfg.sample
    store = open_weights(plan.weights)
    denoiser, std, info = load_for_sampling(cfg, plan["train"].path, ema=sc.ema)
    if info["layout"] != store.attrs[C.Attr.LAYOUT]:
        raise StoreError(f"{plan['train'].path} was trained on another weight layout than {store.path}")
    field = field_of(store)
    device = "cuda" if torch.cuda.is_available() and cfg.fit.device != "cpu" else "cpu"
    denoiser.to(device)
    diffusion = make_diffusion(cfg)
    gen = torch.Generator().manual_seed(diffusion_seed(cfg))
    P = field.layout.size
    parts = []
    with Progress("sample", total=sc.count, unit="rows") as progress:
        for start in range(0, sc.count, SAMPLE_BATCH):
            n = min(SAMPLE_BATCH, sc.count - start)
            if sc.sampler == "ddim":
                z = diffusion.ddim_sample(denoiser, (n, P), steps=sc.steps, eta=sc.eta, generator=gen, device=device)
            else:
                z = diffusion.ancestral_sample(denoiser, (n, P), generator=gen, device=device)
            parts.append(std.inverse(z.cpu()))
            progress.update(n)
    rows = torch.cat(parts).float()
    log.info("sample: %d rows (%s, %s steps) from %s", len(rows), sc.sampler,
             sc.steps if sc.sampler == "ddim" else diffusion.T, plan["train"].path)
    cache.write_bytes(C.join(out, C.ROWS), cache.npy_bytes(rows.numpy()))
    meshes, entries = [], []
    for k, ex in enumerate(decode_rows(field.bind, rows, sc.resolution, device)):
        name = f"sample_{k:05d}"
        if ex.mesh is not None:
            cache.write_bytes(C.join(out, f"{name}.ply"), ex.mesh.export(file_type="ply"))
        meshes.append(ex.mesh)
        entries.append({"id": name, "surface": ex.mesh is not None, "reason": ex.reason})
    no_surface = sum(not e["surface"] for e in entries)
    summary = {"count": len(rows), "no_surface": no_surface, "sampler": sc.sampler, "steps": sc.steps,
               "eta": sc.eta, "ema": sc.ema, "seed": diffusion_seed(cfg), "samples": entries}
    cache.write_json(C.join(out, C.SAMPLES_SUMMARY), summary)
    shown = cfg.eval.render or 16
    figures.render_meshes(meshes[:shown], C.join(out, C.GENERATED_GRID),
                          titles=[e["id"] for e in entries][:shown])
    log.info("sample: %d meshes (%d without a surface)", len(rows) - no_surface, no_surface)
    return summary


def log_sample(folder: str) -> dict[str, Any]:
    """The sample artifact's counts and picture, to the active MLflow run (also when it was reused)."""
    summary = cache.read_json(C.join(folder, C.SAMPLES_SUMMARY), {})
    tracking.log_figure(C.join(folder, C.GENERATED_GRID))
    tracking.log_metrics({"sample_count": summary.get("count", 0), "sample_no_surface": summary.get("no_surface", 0)})
    return summary
