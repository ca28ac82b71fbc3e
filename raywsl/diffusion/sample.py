"""`raywsl sample`: new weight rows from the trained denoiser, decoded to meshes.

    checkpoints/diffusion_final --DDIM (sample.steps) or ancestral--> standardised rows
        --un-standardise--> weight rows (sample.count, P) --the store's field (frozen base and
        masks included)--> marching cubes at sample.resolution
    --> generated/rows.npy, generated/<k>.ply (normalised frame), generated/generated.png, MLflow

Rows are drawn from one generator seeded by `seed` (on the CPU), so a seed and the sampler settings
give the same rows on any device. A row whose field has no surface is still written to
rows.npy and listed with its reason in generated/summary.json; it has no mesh file, and `raywsl eval`
counts it against the generator (valid_share).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import fsspec
import numpy as np
import torch

from raywsl import layout as L
from raywsl import tracking
from raywsl.config import Config, fingerprint, to_dict
from raywsl.eval import figures
from raywsl.eval.extract import extract_meshes
from raywsl.fit.recon import DECODE_BATCH
from raywsl.store.rows import StoreError
from raywsl.store.weights import field_of, open_weights

log = logging.getLogger(__name__)

SAMPLE_BATCH = 256  # rows denoised at once
ROWS_FILE = "rows.npy"
SUMMARY_FILE = "summary.json"


def sample(cfg: Config) -> dict[str, Any]:
    from raywsl.diffusion.model import load_for_sampling, make_diffusion

    run = L.RunLayout(cfg.run_dir)
    sc = cfg.sample
    try:
        store = open_weights(run.weights)
    except StoreError as e:
        raise StoreError(f"{e}: run `raywsl fit` with this run.dir first") from e
    denoiser, std, info = load_for_sampling(cfg, L.join(run.checkpoints, L.DIFFUSION_FINAL), ema=sc.ema)
    if info["layout"] != store.attrs["layout"]:
        raise StoreError(f"{L.DIFFUSION_FINAL} was trained on another weight layout than {store.path}: "
                         f"run `raywsl train` again")
    fp = fingerprint("sample", info.get("fingerprint", ""), cfg.seed, to_dict(cfg.sample, fingerprint_only=True))
    fs, out = fsspec.core.url_to_fs(run.generated)
    summary_path = L.join(out, SUMMARY_FILE)
    if fs.exists(summary_path):
        previous = json.loads(fs.cat_file(summary_path))
        if previous.get("fingerprint") == fp:
            log.info("sample: %s is up to date (same denoiser and settings); nothing to do", run.generated)
            return previous
    field = field_of(store)
    device = "cuda" if torch.cuda.is_available() and cfg.fit.device != "cpu" else "cpu"
    denoiser.to(device)
    diffusion = make_diffusion(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    P = field.layout.size
    parts = []
    for start in range(0, sc.count, SAMPLE_BATCH):
        n = min(SAMPLE_BATCH, sc.count - start)
        if sc.sampler == "ddim":
            z = diffusion.ddim_sample(denoiser, (n, P), steps=sc.steps, eta=sc.eta, generator=gen, device=device)
        else:
            z = diffusion.ancestral_sample(denoiser, (n, P), generator=gen, device=device)
        parts.append(std.inverse(z.cpu()))
    rows = torch.cat(parts).float()
    log.info("sample: %d rows (%s, %s steps) from %s", len(rows), sc.sampler,
             sc.steps if sc.sampler == "ddim" else diffusion.T, L.DIFFUSION_FINAL)

    if fs.exists(out):  # a new sample set replaces the old one whole
        fs.rm(out, recursive=True)
    fs.makedirs(out, exist_ok=True)
    with fs.open(L.join(out, ROWS_FILE), "wb") as f:
        np.save(f, rows.numpy())
    meshes, entries = [], []
    for start in range(0, len(rows), DECODE_BATCH):
        chunk = rows[start:start + DECODE_BATCH].to(device)
        with torch.no_grad():
            extracted = extract_meshes(field.bind(chunk), len(chunk), sc.resolution, device=device)
        for k, ex in enumerate(extracted, start):
            name = f"sample_{k:05d}"
            if ex.mesh is not None:
                with fs.open(L.join(out, f"{name}.ply"), "wb") as f:
                    f.write(ex.mesh.export(file_type="ply"))
            meshes.append(ex.mesh)
            entries.append({"id": name, "surface": ex.mesh is not None, "reason": ex.reason})
    no_surface = sum(not e["surface"] for e in entries)
    summary = {"fingerprint": fp, "count": len(rows), "no_surface": no_surface, "sampler": sc.sampler,
               "steps": sc.steps, "eta": sc.eta, "ema": sc.ema, "seed": cfg.seed, "samples": entries}
    with fs.open(L.join(out, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2)
    grid = L.join(run.generated, "generated.png")
    if "://" not in grid:
        os.makedirs(os.path.dirname(grid), exist_ok=True)
    shown = cfg.eval.render or 16
    figures.render_meshes(meshes[:shown], grid, titles=[e["id"] for e in entries][:shown])
    tracking.log_figure(grid)
    tracking.log_metrics({"sample_count": len(rows), "sample_no_surface": no_surface})
    log.info("sample: %d meshes (%d without a surface) -> %s", len(rows) - no_surface, no_surface, run.generated)
    return summary
