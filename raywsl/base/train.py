"""`raywsl train-base`: a base network and one latent per shape, trained under Ray Train.

The base is the one the configured field type needs (base/models.py): the modulated base field for
lora / mlora, the DeepSDF decoder for deepsdf_latent (the modulated one for field types without one).

    samples.zarr --RowStore Datasource--> Ray Train workers (base.workers; gloo on CPU, nccl on GPU)
        each worker: its shard of shapes (read once and kept in memory up to base.cache_gb, else
                     streamed epoch after epoch), S shapes x K random points, one AutoDecoder step;
                     gradients (network and latents) averaged across workers with all_reduce
        rank 0: a checkpoint every base.checkpoint_every steps, reported with ray.train.report
    --> checkpoints/<base>/ (Ray Train's run folder) and checkpoints/<base>_final/ (the last state,
        with shape_ids.json: the shape of each latent), <base> = base (modulated) or deepsdf

Every worker holds the whole network and the whole latent table, and the gradient averaging keeps
them identical (what DDP does; done by hand because the latents are not part of a module). A
killed run resumes from its latest checkpoint when the same command is run again (Ray Train
restores a run by its storage path and name), with the step count intact.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Any

import numpy as np
import torch

from raywsl import layout as L
from raywsl.base.autodecoder import AutoDecoder, AutoDecoderSettings
from raywsl.base.models import make_base
from raywsl.config import Config, build, to_dict
from raywsl.runtime import fit_torch_trainer, keep_final, ray_session
from raywsl.store.datasource import cache_shard, stream_shard
from raywsl.store.rows import DONE, RowStore, StoreError

log = logging.getLogger(__name__)

def base_model(cfg: Config) -> str:
    """The base network cfg.field.type is fitted on (modulated when it needs none)."""
    from raywsl.fit.fields import FIELDS

    return FIELDS[cfg.field.type].base_model or "modulated"


def ensure_base(cfg: Config) -> None:
    """Train the base network cfg.field.type needs when none is given (field.base) and the run
    folder has none yet: what `raywsl fit` does before fitting a lora / mlora / deepsdf_latent field."""
    from raywsl.fit.fields import FIELDS

    model = FIELDS[cfg.field.type].base_model
    final = L.RunLayout(cfg.run_dir).base_final(model) if model else ""
    if not model or cfg.field.base or os.path.exists(os.path.join(final, L.CHECKPOINT_STATE)):
        return
    log.info("field.type %s needs a trained %s base and %s has none: training it first (raywsl train-base)",
             cfg.field.type, model, cfg.run_dir)
    train_base(cfg)


def make_trainer(cfg: Config, n_shapes: int) -> AutoDecoder:
    torch.manual_seed(cfg.seed)  # the network's init: the same on every worker
    net = make_base(base_model(cfg), cfg.base.preset)
    b = cfg.base
    settings = AutoDecoderSettings(steps=b.steps, lr=b.lr, latent_lr=b.latent_lr, lr_end=b.lr_end,
                                   latent_reg=b.latent_reg, latent_std=b.latent_std, ema=b.ema,
                                   loss=net.default_loss if b.loss == "auto" else b.loss, clamp=cfg.fit.clamp,
                                   stages=[list(s) for s in b.stages], seed=cfg.seed)
    return AutoDecoder(net, lambda net, x, z: net.decode(x, z), n_shapes, net.config["latent"], settings)


def train_base(cfg: Config, restart: bool = False) -> dict[str, Any]:
    """Train (or resume training) the base field of `cfg.run_dir`; returns the final metrics."""
    from raywsl.store.datasource import read_rows

    run = L.RunLayout(cfg.run_dir)
    try:
        samples = RowStore.open(run.samples, kind="samples")
    except StoreError as e:
        raise StoreError(f"{e}: run `raywsl ingest` with this run.dir first") from e
    status = samples.status()
    n_done = int((status == DONE).sum())
    if n_done == 0:
        raise StoreError(f"{samples.path}: no ingested shape to train on")
    model = base_model(cfg)
    storage, name = os.path.abspath(run.checkpoints), L.BASE_RUNS[model]
    if restart and os.path.exists(os.path.join(storage, name)):
        shutil.rmtree(os.path.join(storage, name))
    log.info("train-base: the %s base (preset %s) on %d shapes, %d steps, %d workers", model, cfg.base.preset,
             n_done, cfg.base.steps, cfg.base.workers)
    with ray_session(cfg.ray.address, cfg.ray.num_cpus or None):
        data = read_rows(samples.path, [L.POINTS, L.SDF]).map_batches(_ingested, batch_size=None)
        data.context.enable_progress_bars = False  # one bar per epoch per worker otherwise
        result = fit_torch_trainer(_train_loop, {"cfg": to_dict(cfg), "n_shapes": n_done,
                                                 "latent_of_row": np.cumsum(status == DONE).tolist()},
                                   dataset=data, name=name, storage=storage, workers=cfg.base.workers,
                                   use_gpu=cfg.base.use_gpu)
    final = run.base_final(model)
    keep_final(result, final)
    with open(os.path.join(final, L.SHAPE_IDS), "w") as f:  # latent i is the i-th ingested shape
        json.dump([str(i) for i in samples.row_meta()[L.SHAPE_ID][status == DONE]], f)
    log.info("train-base: %s -> %s", result.metrics, final)
    return dict(result.metrics)


def _ingested(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Only the rows ingest sampled (failed meshes have no samples)."""
    keep = batch[L.STATUS] == DONE
    return {name: values[keep] for name, values in batch.items()}


def _train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker."""
    import ray.train
    import torch.distributed as dist

    cfg = build(Config, config["cfg"])
    latent_of_row = np.asarray(config["latent_of_row"]) - 1  # row -> index among the ingested shapes
    trainer = make_trainer(cfg, config["n_shapes"])
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            trainer.load_state(folder)
    resumed_from = trainer.step_count
    world = dist.get_world_size() if dist.is_initialized() else 1

    def sync(grads: list[torch.Tensor]) -> None:
        if world > 1:
            for g in grads:
                dist.all_reduce(g)
                g /= world

    shard = ray.train.get_dataset_shard("train")
    rank = ray.train.get_context().get_world_rank()
    sampler = np.random.default_rng([cfg.seed, rank, trainer.step_count])  # per worker and resume point
    columns = ["row", L.POINTS, L.SDF]
    cached = cache_shard(shard, columns, int(cfg.base.cache_gb * 2**30))
    streamed = None if cached else stream_shard(shard, columns, max(int(stage[1]) for stage in trainer.s.stages))
    loss_sum, n = 0.0, 0
    while trainer.step_count < trainer.s.steps:
        shapes, points = trainer.stage()
        if cached:  # every step draws its shapes from the worker's whole shard
            pick = sampler.choice(len(cached["row"]), min(shapes, len(cached["row"])), replace=False)
            rows, pts, sdf = (cached[c][pick] for c in columns)
        else:  # too big to keep: (up to) `shapes` rows of the next batch of the stream
            batch = next(streamed)
            rows, pts, sdf = (batch[c][:shapes] for c in columns)
        cols = sampler.integers(0, sdf.shape[1], (len(rows), min(points, sdf.shape[1])))
        # every worker takes exactly one step per iteration: the all_reduce in `sync` stays in lockstep
        loss_sum += trainer.step(torch.from_numpy(latent_of_row[rows]),
                                 torch.from_numpy(np.take_along_axis(pts, cols[..., None], 1)),
                                 torch.from_numpy(np.take_along_axis(sdf, cols, 1)), sync)
        n += 1
        step = trainer.step_count
        if step % cfg.base.checkpoint_every == 0 or step == trainer.s.steps:
            metrics = {"step": step, "loss": loss_sum / max(n, 1), "resumed_from": resumed_from}
            loss_sum = 0.0
            if rank == 0:
                with tempfile.TemporaryDirectory() as folder:
                    trainer.save(folder)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
            else:
                ray.train.report(metrics)

