"""`raywsl train-encoder`: a point-cloud encoder to the fitted rows, trained under Ray Train.

    samples.zarr (SURFACE) + weights.zarr --driver--> the run's training shapes (data.shapes;
                 store/split.py) that are fitted; per-parameter mean / std over their rows (Standardizer)
                 --RowStore Datasource (the samples' shards) + their fitted rows--> Ray Train workers
                 (encoder.workers; DDP: gloo on CPU, nccl and one GPU each with scaling.use_gpu), each
                 holding its shard of (cloud, row) pairs in memory up to CACHE_BYTES, else streaming it
        each step: encoder.batch_size / workers shapes per worker, a fresh random subset of encoder.points
                   surface points each (a share encoder.uneven of them uneven: model.draw_subsets), the
                   encoder (models/pointnet.py) predicts the standardised row; MSE; Adam, cosine decay,
                   clipped to encoder.grad_clip. A step whose loss or gradient is NaN / inf on any worker is
                   skipped on every worker; encoder.max_bad_steps in a row fail the run
        rank 0: a checkpoint every encoder.checkpoint_every steps (ray.train.report), with the loss history
    --> <cache>/train-encoder/<fp>.work/ (Ray Train's run folder, resumable) until the last step, then the
        final state published as the artifact <cache>/train-encoder/<fp>/ (state.pt, info.json,
        encoder_loss.png, and the reconstruction figures of recon.py: metrics.json, encoder_recon.png),
        shown in the run folder as checkpoints/encoder_final

A killed run resumes from its latest checkpoint when the same command runs again, with the step count
intact; every step's shapes and subsets are drawn from a generator seeded by (encoder seed, worker,
step), so a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import logging
import math
import tempfile
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from raywsl import cache
from raywsl import contract as C
from raywsl import tracking
from raywsl.config import Config, build, to_dict
from raywsl.encoder.model import draw_subsets, encoder_seed
from raywsl.geometry import figures
from raywsl.runtime import (copy_checkpoint, fit_torch_trainer, load_checkpoint, ray_session, report_progress,
                            save_checkpoint)
from raywsl.store.rows import DONE, PENDING, RowStore, StoreError
from raywsl.store.split import shards_of
from raywsl.store.standardize import Standardizer
from raywsl.store.weights import fitted_training_rows, standardizer_of

log = logging.getLogger(__name__)

CACHE_BYTES = 2 << 30  # a worker keeps its shard of (cloud, row) pairs in memory up to this size, else streams it


def training_set(cfg: Config, plan: C.Plan) -> tuple[RowStore, RowStore, np.ndarray]:
    """(sample store, weight store, the rows the encoder trains on: the run's training shapes, fitted and
    ingested); refused (StoreError naming the command to run) when they are missing or too few."""
    need = max(2, cfg.encoder.workers)
    weights, rows = fitted_training_rows(plan.weights, cfg.data.shapes, need,
                                         "train-encoder (max(2, encoder.workers))")
    try:
        samples = RowStore.open(plan.samples, kind="samples")
    except StoreError as e:
        raise StoreError(f"{e}: the encoder reads the ingested surface points; run `raywsl ingest` with this "
                         f"config first") from e
    if samples.n_rows != weights.n_rows or (samples.read(C.SHAPE_ID, rows) != weights.read(C.SHAPE_ID, rows)).any():
        raise StoreError(f"{weights.path} and {samples.path} list other shapes: not the stores of one config")
    status = samples.status()[rows]
    if (status == PENDING).any():  # fitted from streamed samples (fit.samples=stream) and never ingested
        raise StoreError(f"{samples.path}: {int((status == PENDING).sum())} of the fitted training shapes are not "
                         f"ingested: run `raywsl ingest` with this config first")
    rows = rows[status == DONE]
    if len(rows) < need:
        raise StoreError(f"{samples.path}: {len(rows)} fitted training shapes have surface points; train-encoder "
                         f"needs at least {need}")
    return samples, weights, rows


def train_encoder(cfg: Config, plan: C.Plan, out: str, restart: bool = False) -> dict[str, Any]:
    """Train (or resume training) the encoder of `plan`, write its final state and its reconstruction
    figures into `out`; returns the figures and the final training metrics."""
    from raywsl.encoder.recon import reconstruct
    from raywsl.store.datasource import read_rows

    samples, weights, rows = training_set(cfg, plan)
    ec = cfg.encoder
    work = cache.absolute(cache.work_dir(plan["train-encoder"]))
    if restart:
        cache.remove(work)
    keep = np.zeros(samples.n_rows, bool)
    keep[rows] = True
    std = standardizer_of(weights, rows)
    layout = weights.attrs[C.Attr.LAYOUT]
    log.info("train-encoder: %s encoder (width %d) to %d fitted rows of %d parameters (%s field), %d steps of %d "
             "shapes x %d points, %d workers", ec.arch, ec.width, len(rows), std.size,
             weights.attrs[C.Attr.FIELD_TYPE], ec.steps, ec.batch_size, ec.points, ec.workers)
    span = range(int(rows.min()), int(rows.max()) + 1)
    ranges = [(samples.shard_rows(k).start, samples.shard_rows(k).stop) for k in shards_of(samples, span)]
    with ray_session(cfg.ray.address, cfg.ray.num_cpus or None):
        data = read_rows(samples.path, [C.SURFACE], row_ranges=ranges).map_batches(
            _with_rows, fn_kwargs={"keep": keep, "weights": weights.path}, batch_size=None)
        config = {"cfg": to_dict(cfg), "layout": layout, "fingerprint": plan["train-encoder"].fingerprint,
                  "field_type": weights.attrs[C.Attr.FIELD_TYPE],
                  "standardizer": {k: v.tolist() for k, v in std.state().items()},
                  "progress": C.join(work, C.TRAIN_PROGRESS)}
        result = fit_torch_trainer(_train_loop, config, dataset=data, storage=work, workers=ec.workers,
                                   use_gpu=cfg.scaling.use_gpu, cpus_per_worker=cfg.scaling.cpus_per_worker,
                                   progress=("train-encoder", ec.steps))
    copy_checkpoint(result, out)
    metrics = dict(result.metrics)
    cache.update_json(C.join(out, C.CHECKPOINT_INFO), {"metrics": metrics})
    _plot_loss(out)
    figures_ = reconstruct(cfg, plan, out, samples, weights, rows)
    log.info("train-encoder: %s -> %s", metrics, plan["train-encoder"].path)
    return {**figures_, **{f"encoder_{k}": v for k, v in metrics.items()}}


def _with_rows(batch: dict[str, np.ndarray], keep: np.ndarray, weights: str) -> dict[str, np.ndarray]:
    """Ray Data: the training rows of a block of the sample store, each surface cloud with its fitted row."""
    mask = keep[batch["row"]]
    rows = batch["row"][mask]
    store = RowStore.open(weights)
    values = store.group[C.ROW_WEIGHTS].get_orthogonal_selection((rows, slice(None))) if len(rows) else \
        np.zeros((0, store.group[C.ROW_WEIGHTS].shape[1]), np.float32)
    return {"row": rows, C.SURFACE: batch[C.SURFACE][mask], C.ROW_WEIGHTS: values}


def _plot_loss(folder: str) -> None:
    history = cache.read_json(C.join(folder, C.CHECKPOINT_INFO), {}).get("history", [])
    if history:
        figures.plot_curves({"training loss": ([h["step"] for h in history], [h["loss"] for h in history])},
                            C.join(folder, C.ENCODER_LOSS), xlabel="step", ylabel="MSE of the standardised rows",
                            title="point-cloud encoder: training loss")


def log_encoder(folder: str) -> dict[str, Any]:
    """The trained encoder's losses, figures and reconstruction figures, to the active MLflow run (also
    when it was reused); returns its figures (metrics.json's numbers)."""
    info = cache.read_json(C.join(folder, C.CHECKPOINT_INFO), {})
    for h in info.get("history", []):
        tracking.log_metrics({"encoder_loss": h["loss"], "encoder_grad_norm": h["grad_norm"]}, step=h["step"])
    for name in (C.ENCODER_LOSS, C.ENCODER_RECON):
        tracking.log_figure(C.join(folder, name))
    found = cache.read_json(C.join(folder, C.STAGE_METRICS), {})
    figures_ = {k: v for k, v in found.items() if not isinstance(v, (dict, list))}
    figures_.update({f"encoder_{k}": v for k, v in info.get("metrics", {}).items()})
    tracking.log_metrics(figures_)
    return figures_


# ------------------------------------------------------------------------------------ one worker

def _train_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from raywsl.models.pointnet import make_encoder
    from raywsl.store.datasource import cache_shard, stream_shard
    from raywsl.store.layout import Layout

    cfg = build(Config, config["cfg"])
    ec = cfg.encoder
    torch.set_num_threads(cfg.scaling.cpus_per_worker)
    layout = Layout.from_json(config["layout"])
    std = Standardizer.from_state({k: torch.tensor(v) for k, v in config["standardizer"].items()})
    seed = encoder_seed(cfg)
    torch.manual_seed(seed)  # the init: the same on every worker
    net = make_encoder(ec.arch, ec.width, layout.size)
    opt = torch.optim.Adam(net.parameters(), lr=ec.lr)
    step, history, skipped = 0, [], 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state, info = load_checkpoint(folder)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, skipped, history = int(state["step"]), int(state["skipped_steps"]), info["history"]
    resumed_from = step
    model = ray.train.torch.prepare_model(net)  # DDP when there are several workers; to the device
    device = next(net.parameters()).device
    guard = tracking.StepGuard("train-encoder", "encoder.max_bad_steps", ec.max_bad_steps, skipped)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    per_worker = max(1, ec.batch_size // world)
    columns = [C.SURFACE, C.ROW_WEIGHTS]
    shard = ray.train.get_dataset_shard("train")
    cached = cache_shard(shard, columns, CACHE_BYTES)
    streamed = None if cached else stream_shard(shard, columns, per_worker)
    window_loss, window_norm = [], []  # of the steps taken since the last log line
    while step < ec.steps:
        gen = torch.Generator().manual_seed(int(np.random.default_rng([seed, rank, step]).integers(2**62)))
        if cached:
            n = len(cached[C.ROW_WEIGHTS])
            pick = (torch.randperm(n, generator=gen)[:per_worker] if per_worker <= n
                    else torch.randint(0, n, (per_worker,), generator=gen)).numpy()
            batch = {c: cached[c][pick] for c in columns}
        else:
            batch = next(streamed)
        clouds = draw_subsets(torch.from_numpy(np.asarray(batch[C.SURFACE], np.float32)), ec.points, ec.uneven, gen)
        target = std.forward(torch.from_numpy(np.asarray(batch[C.ROW_WEIGHTS], np.float32)))
        for group in opt.param_groups:  # cosine decay to 0 over the run
            group["lr"] = ec.lr * 0.5 * (1 + math.cos(math.pi * step / ec.steps))
        loss = torch.nn.functional.mse_loss(model(clouds.to(device)), target.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients across workers
        flag = (~torch.isfinite(loss.detach())).float().reshape(1)
        if world > 1:
            dist.all_reduce(flag)  # > 0: some worker's loss was not finite
        params = [p for p in net.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        loss_value, norm_value, any_bad = torch.stack([loss.detach().float(), norm.float(), flag[0].to(norm)]).tolist()
        if guard.healthy(step, loss_value, norm_value, bad_anywhere=any_bad > 0):
            if ec.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(params, ec.grad_clip, norm)
            opt.step()
            window_loss.append(loss_value)
            window_norm.append(norm_value)
        step += 1  # a skipped step still counts: the next draws its own shapes
        if step % ec.log_every == 0 or step == ec.steps:
            history.append({"step": step, "loss": float(np.mean(window_loss)) if window_loss else math.nan,
                            "grad_norm": float(np.mean(window_norm)) if window_norm else math.nan,
                            "skipped_steps": guard.skipped})
            window_loss, window_norm = [], []
            if rank == 0:
                report_progress(config["progress"], step, ec.steps, history[-1]["loss"])
        if step % ec.checkpoint_every == 0 or step == ec.steps:
            last = history[-1] if history else {}
            metrics = {"step": step, "loss": last.get("loss", math.nan), "grad_norm": last.get("grad_norm", math.nan),
                       "resumed_from": resumed_from, "skipped_steps": guard.skipped}
            if rank == 0:
                with tempfile.TemporaryDirectory() as folder:
                    save_checkpoint(folder, {"model": net.state_dict(), "opt": opt.state_dict(), "step": step,
                                             "standardizer": std.state(), "skipped_steps": guard.skipped},
                                    {"step": step, "fingerprint": config["fingerprint"], "arch": ec.arch,
                                     "width": ec.width, "points": ec.points, "params": layout.size,
                                     "field_type": config["field_type"], "layout": layout.to_json(),
                                     "encoder": to_dict(ec), "history": history})
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
            else:
                ray.train.report(metrics)
