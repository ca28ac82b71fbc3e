"""`raywsl train-base`: a base network and one latent per shape, trained under Ray Train.

The base is the one the configured field type needs (models/bases.py): the modulated base field for
lora / mlora, the DeepSDF decoder for deepsdf_latent. It is trained on the first base.shapes training
shapes of the source (store/split.py; by default the run's data.shapes), never on held-out ones.

    samples.zarr --RowStore Datasource--> Ray Train workers (base.workers; gloo on CPU; with scaling.use_gpu
                 one GPU each, nccl)
        each worker: its shard of shapes (read once and kept in memory up to base.cache_gb, else
                     streamed epoch after epoch), S shapes x K random points, one AutoDecoder step;
                     gradients (network and latents) averaged across workers with all_reduce
        rank 0: a checkpoint every base.checkpoint_every steps, reported with ray.train.report (with the
                mean loss and gradient norm since the last one, and the steps skipped so far for a NaN / inf
                loss or gradient; base.max_bad_steps of those in a row fail the run: autodecoder.py)
    --> <cache>/train-base/<fp>.work/ (Ray Train's run folder, resumable) until the last step, then
        the final state published as the artifact <cache>/train-base/<fp>/ (state.pt, info.json,
        shape_ids.json: the shape of each latent), shown in the run folder as checkpoints/base_final

Every worker holds the whole network and the whole latent table, and the gradient averaging keeps
them identical (what DDP does; done by hand because the latents are not part of a module). A
killed run resumes from its latest checkpoint when the same command is run again (Ray Train
restores a run by its storage path and name), with the step count intact.
"""

from __future__ import annotations

import logging
import math
import tempfile
from typing import Any

import numpy as np
import torch

from raywsl import cache
from raywsl import contract as C
from raywsl.base.autodecoder import AutoDecoder, AutoDecoderSettings
from raywsl.config import Config, build, to_dict
from raywsl.models.bases import make_base
from raywsl.models.registry import base_model
from raywsl.runtime import copy_checkpoint, fit_torch_trainer, ray_session, report_progress
from raywsl.store.datasource import cache_shard, stream_shard
from raywsl.store.rows import DONE, PENDING, RowStore, StoreError
from raywsl.store.split import shards_of, training_range

log = logging.getLogger(__name__)


def make_trainer(cfg: Config, n_shapes: int) -> AutoDecoder:
    torch.manual_seed(cfg.seed)  # the network's init: the same on every worker
    net = make_base(base_model(cfg) or "modulated", cfg.base.preset)  # modulated: the default base
    b = cfg.base
    settings = AutoDecoderSettings(steps=b.steps, lr=b.lr, latent_lr=b.latent_lr, lr_end=b.lr_end,
                                   latent_reg=b.latent_reg, latent_std=b.latent_std, ema=b.ema,
                                   loss=net.default_loss if b.loss == "auto" else b.loss, clamp=cfg.fit.clamp,
                                   stages=[list(s) for s in b.stages], seed=cfg.seed, grad_clip=b.grad_clip,
                                   max_bad_steps=b.max_bad_steps)
    return AutoDecoder(net, lambda net, x, z: net.decode(x, z), n_shapes, net.config["latent"], settings)


def base_rows(cfg: Config, plan: C.Plan) -> tuple[RowStore, range]:
    """The sample store and the rows the base trains on; refused (StoreError) unless they are ingested."""
    try:
        samples = RowStore.open(plan.samples, kind="samples")
    except StoreError as e:
        raise StoreError(f"{e}: the samples of this config are not ingested; run `raywsl ingest` with this "
                         f"config first") from e
    rows = training_range(samples, cfg.base_shapes)
    status = samples.status()[rows.start:rows.stop]
    if (status == PENDING).any():
        raise StoreError(f"{samples.path}: {int((status == PENDING).sum())} of the shapes the base trains on are "
                         f"not ingested yet: run `raywsl ingest` with this config to finish them first")
    if not (status == DONE).any():
        raise StoreError(f"{samples.path}: no ingested training shape to train the base on")
    return samples, rows


def train_base(cfg: Config, plan: C.Plan, out: str, restart: bool = False) -> dict[str, Any]:
    """Train (or resume training) the base of `plan` and write its final state into `out`; returns
    the final metrics."""
    from raywsl.store.datasource import read_rows

    samples, rows = base_rows(cfg, plan)
    keep = np.zeros(samples.n_rows, bool)
    keep[rows.start:rows.stop] = samples.status()[rows.start:rows.stop] == DONE
    n_shapes = int(keep.sum())
    work = cache.absolute(cache.work_dir(plan["train-base"]))
    if restart:
        cache.remove(work)
    log.info("train-base: the %s base (preset %s) on %d shapes, %d steps, %d workers", plan.base_model,
             cfg.base.preset, n_shapes, cfg.base.steps, cfg.base.workers)
    ranges = [(samples.shard_rows(k).start, samples.shard_rows(k).stop) for k in shards_of(samples, rows)]
    with ray_session(cfg.ray.address, cfg.ray.num_cpus or None):
        data = read_rows(samples.path, [C.POINTS, C.SDF], row_ranges=ranges).map_batches(
            _select, fn_kwargs={"keep": keep}, batch_size=None)
        result = fit_torch_trainer(_train_loop, {"cfg": to_dict(cfg), "n_shapes": n_shapes,
                                                 "latent_of_row": np.cumsum(keep).tolist(),
                                                 "progress": C.join(work, C.TRAIN_PROGRESS)},
                                   dataset=data, storage=work, workers=cfg.base.workers,
                                   use_gpu=cfg.scaling.use_gpu, progress=("train-base", cfg.base.steps))
    copy_checkpoint(result, out)
    # latent i is the i-th shape kept
    cache.write_json(C.join(out, C.SHAPE_IDS), [str(i) for i in samples.row_meta()[C.SHAPE_ID][keep]])
    cache.update_json(C.join(out, C.CHECKPOINT_INFO), {"metrics": dict(result.metrics)})
    log.info("train-base: %s -> %s", result.metrics, plan["train-base"].path)
    return dict(result.metrics)


def _select(batch: dict[str, np.ndarray], keep: np.ndarray) -> dict[str, np.ndarray]:
    """Only the rows the base trains on (ingested, in its training range)."""
    mask = keep[batch["row"]]
    return {name: values[mask] for name, values in batch.items()}


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
    columns = ["row", C.POINTS, C.SDF]
    cached = cache_shard(shard, columns, int(cfg.base.cache_gb * 2**30))
    if cached:  # every step draws from the worker's whole shard, by the auto-decoder's staged schedule
        draws = ((cached["row"][idx.numpy()], pts, sdf)
                 for idx, pts, sdf in trainer.batches(cached[C.POINTS], cached[C.SDF]))
    else:  # too big to keep: (up to) `shapes` rows of the next batch of the stream
        draws = _streamed(trainer, stream_shard(shard, columns, max(int(st[1]) for st in trainer.s.stages)),
                          np.random.default_rng([cfg.seed, rank, trainer.step_count]))
    loss_sum, norm_sum, n = 0.0, 0.0, 0  # over the steps taken (not skipped) since the last report
    for rows, pts, sdf in draws:
        # every worker takes exactly one step per iteration: the all_reduce in `sync` stays in lockstep
        loss = trainer.step(torch.from_numpy(latent_of_row[rows]), pts, sdf, sync)
        if not math.isnan(loss):  # NaN: the step was skipped
            loss_sum, norm_sum, n = loss_sum + loss, norm_sum + trainer.grad_norm, n + 1
        step = trainer.step_count
        if step % cfg.base.checkpoint_every == 0 or step == trainer.s.steps:
            metrics = {"step": step, "loss": loss_sum / n if n else math.nan, "resumed_from": resumed_from,
                       "grad_norm": norm_sum / n if n else math.nan, "skipped_steps": trainer.skipped_steps}
            loss_sum, norm_sum, n = 0.0, 0.0, 0
            if rank == 0:
                report_progress(config["progress"], step, trainer.s.steps, metrics["loss"])
                with tempfile.TemporaryDirectory() as folder:
                    trainer.save(folder)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
            else:
                ray.train.report(metrics)


def _streamed(trainer: AutoDecoder, stream, rng: np.random.Generator):
    """(rows, points, sdf) per step from a worker's stream of rows, points drawn by `rng`."""
    while trainer.step_count < trainer.s.steps:
        shapes, points = trainer.stage()
        batch = next(stream)
        rows, pts, sdf = (batch[c][:shapes] for c in ("row", C.POINTS, C.SDF))
        cols = rng.integers(0, sdf.shape[1], (len(rows), min(points, sdf.shape[1])))
        yield rows, torch.from_numpy(np.take_along_axis(pts, cols[..., None], 1)), \
            torch.from_numpy(np.take_along_axis(sdf, cols, 1))
