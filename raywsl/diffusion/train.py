"""`raywsl train`: the diffusion denoiser on the weight store's training rows, under Ray Train.

    weights.zarr --driver--> training rows: fitted (status done) and not held out (data/splits.py);
                             per-parameter mean / std over them (the Standardizer)
                 --RowStore Datasource--> Ray Train workers (scaling.num_workers; DDP: gloo on CPU,
                             nccl on GPU), each with its shard of rows (kept in memory up to
                             train.cache_gb, else streamed)
        each step: batch_size / workers rows per worker, standardised, one DDPM loss (t uniform);
                   AdamW, gradients averaged by DDP; EMA of the denoiser
        rank 0: a checkpoint every train.checkpoint_every steps (reported with ray.train.report),
                with the loss history (overall and per timestep bucket)
    --> checkpoints/diffusion/ (Ray Train's run folder), checkpoints/diffusion_final/ (the last state),
        recon/diffusion_loss.png, and the losses in MLflow

A killed run resumes from its latest checkpoint when the same command runs again (Ray Train
restores a run by its storage path and name), with the step count intact; every step's rows, t and
noise are drawn from generators seeded by (seed, worker, step), so a resumed run equals an
uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import torch

from raywsl import layout as L
from raywsl.config import Config, build, fingerprint, to_dict
from raywsl.data.splits import DEFAULT_TEST_FRACTION, held_out
from raywsl.diffusion.tokenizers import Standardizer
from raywsl.runtime import fit_torch_trainer, keep_final, ray_session
from raywsl.store.rows import DONE, RowStore, StoreError
from raywsl.store.weights import open_weights

log = logging.getLogger(__name__)

RUN_NAME = L.DIFFUSION_RUN  # Ray Train's run folder under checkpoints/
CACHE_BYTES = 2 << 30  # a worker keeps its shard of rows in memory up to this size, else streams it
BUCKETS = 10  # timestep buckets of the logged loss


def split_settings(cfg: Config) -> tuple[int, float]:
    """(seed, test fraction) fixed when the run's samples.zarr was made (the config's without one)."""
    try:
        attrs = RowStore.open(L.RunLayout(cfg.run_dir).samples, kind="samples").attrs
        return int(attrs.get("seed", cfg.seed)), float(attrs.get("test_fraction", DEFAULT_TEST_FRACTION))
    except StoreError:
        return cfg.seed, cfg.ingest.test_fraction


def training_rows(store: RowStore, cfg: Config) -> np.ndarray:
    """Indices of the rows diffusion trains on: fitted, and in the training split."""
    seed, fraction = split_settings(cfg)
    test = held_out(store.row_meta()[L.SHAPE_ID], seed, fraction)
    return np.flatnonzero((store.status() == DONE) & ~test)


def fit_standardizer(store: RowStore, keep: np.ndarray, enabled: bool) -> Standardizer:
    """Per-parameter mean / std over the rows where `keep` (N,) holds, read shard by shard (never the
    whole store at once)."""
    if not enabled:
        return Standardizer.identity(store.group[L.ROW_WEIGHTS].shape[1])

    def shards():
        for k in range(store.n_shards):
            span = store.shard_rows(k)
            if keep[span].any():
                yield store.group[L.ROW_WEIGHTS][span][keep[span]]

    return Standardizer.fit(shards())


def train(cfg: Config, restart: bool = False, replace_stale: bool = False) -> dict[str, Any]:
    """Train (or resume training) the denoiser of `cfg.run_dir`; returns the final metrics. Nothing
    to do when checkpoints/diffusion_final was trained on the same store with the same settings; an
    interrupted training of other settings is refused unless restart (or replace_stale: `raywsl run`)."""
    from raywsl.store.datasource import read_rows

    run = L.RunLayout(cfg.run_dir)
    try:
        store = open_weights(run.weights)
    except StoreError as e:
        raise StoreError(f"{e}: run `raywsl fit` with this run.dir first") from e
    rows = training_rows(store, cfg)
    if len(rows) < max(2, cfg.scaling.num_workers):
        raise StoreError(f"{store.path}: {len(rows)} fitted training rows; diffusion needs at least "
                         f"max(2, scaling.num_workers)")
    fp = train_fingerprint(cfg, store)
    storage, final = os.path.abspath(run.checkpoints), L.join(run.checkpoints, L.DIFFUSION_FINAL)
    done = _info(final)
    if done.get("fingerprint") == fp and not restart:
        log.info("train: %s is up to date (same weights and settings); nothing to do", final)
        return done["metrics"]
    marker = os.path.join(storage, RUN_NAME + ".fingerprint")  # what the Ray Train run folder belongs to
    previous = open(marker).read() if os.path.exists(marker) else None
    if previous not in (None, fp) and not (restart or replace_stale):
        raise StoreError(f"{os.path.join(storage, RUN_NAME)} holds the training of another config or weight "
                         f"store: rerun with --restart to start it again")
    if restart or previous != fp:  # else: resume the interrupted run
        shutil.rmtree(os.path.join(storage, RUN_NAME), ignore_errors=True)
    os.makedirs(storage, exist_ok=True)
    with open(marker, "w") as f:
        f.write(fp)
    keep = np.zeros(store.n_rows, bool)
    keep[rows] = True
    std = fit_standardizer(store, keep, cfg.diffusion.standardize)
    log.info("train: %d training rows of %d parameters (%s field), tokenizer %s, DiT %s, %d steps of %d rows, "
             "%d workers", len(rows), store.group[L.ROW_WEIGHTS].shape[1], store.attrs["field_type"],
             cfg.diffusion.tokenizer, cfg.diffusion.model, cfg.train.steps, cfg.train.batch_size,
             cfg.scaling.num_workers)
    with ray_session(cfg.ray.address, cfg.ray.num_cpus or None):
        data = read_rows(store.path, [L.ROW_WEIGHTS]).map_batches(
            _select, fn_kwargs={"keep": keep}, batch_size=None)
        data.context.enable_progress_bars = False
        config = {"cfg": to_dict(cfg), "layout": store.attrs["layout"], "fingerprint": fp,
                  "standardizer": {k: v.tolist() for k, v in std.state().items()}}
        result = fit_torch_trainer(_train_loop, config, dataset=data, name=RUN_NAME, storage=storage,
                                   workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu)
    keep_final(result, final)
    info = _info(final)
    info["metrics"] = dict(result.metrics)
    with open(os.path.join(final, L.CHECKPOINT_INFO), "w") as f:
        json.dump(info, f, indent=2)
    _report(cfg, final)
    log.info("train: %s -> %s", result.metrics, final)
    return dict(result.metrics)


def train_fingerprint(cfg: Config, store: RowStore) -> str:
    """What the trained denoiser depends on: the weight store, the split, the seed and the settings."""
    return fingerprint("diffusion", store.fingerprint, split_settings(cfg), cfg.seed,
                       to_dict(cfg.diffusion, fingerprint_only=True), to_dict(cfg.train, fingerprint_only=True))


def _info(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, L.CHECKPOINT_INFO)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _select(batch: dict[str, np.ndarray], keep: np.ndarray) -> dict[str, np.ndarray]:
    """Only the training rows (fitted, not held out)."""
    mask = keep[batch["row"]]
    return {name: values[mask] for name, values in batch.items()}


def _report(cfg: Config, final: str) -> None:
    """The loss history of the final checkpoint as curves (recon/diffusion_loss.png) and MLflow metrics."""
    from raywsl import tracking
    from raywsl.eval import figures

    history = _info(final)["history"]
    if not history:
        return
    steps = [h["step"] for h in history]
    curves = {"loss (all t)": (steps, [h["loss"] for h in history])}
    for name in history[-1]["buckets"]:
        curves[f"t {name}"] = (steps, [h["buckets"].get(name, float("nan")) for h in history])
    path = L.join(L.RunLayout(cfg.run_dir).recon, "diffusion_loss.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    figures.plot_curves(curves, path, xlabel="step", ylabel=f"{cfg.diffusion.prediction} MSE",
                        title="denoiser training loss, per timestep bucket")
    tracking.log_figure(path)
    for h in history:
        tracking.log_metrics({"diffusion_loss": h["loss"],
                              **{f"diffusion_loss_{k}": v for k, v in h["buckets"].items()}}, step=h["step"])


# ------------------------------------------------------------------------------------ one worker

def _train_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from raywsl.diffusion.dit import EMA
    from raywsl.diffusion.gaussian import bucket_losses
    from raywsl.diffusion.model import build_denoiser, load_checkpoint, make_diffusion, save_checkpoint
    from raywsl.fit.fields import Layout
    from raywsl.store.datasource import cache_shard, stream_shard

    cfg = build(Config, config["cfg"])
    tc = cfg.train
    layout = Layout.from_json(config["layout"])
    std = Standardizer.from_state({k: torch.tensor(v) for k, v in config["standardizer"].items()})
    denoiser = build_denoiser(cfg, layout)
    ema = EMA(denoiser, tc.ema)
    opt = torch.optim.AdamW(denoiser.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    step, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state, info = load_checkpoint(folder)
        history = info["history"]
        denoiser.load_state_dict(state["model"])
        ema.load_state_dict({"model": state["ema"], **state["ema_state"]})
        opt.load_state_dict(state["opt"])
        step = int(state["step"])
    resumed_from = step
    model = ray.train.torch.prepare_model(denoiser)  # DDP when there are several workers; to the device
    device = next(denoiser.parameters()).device
    ema.model.to(device)
    diffusion = make_diffusion(cfg)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    per_worker = max(1, tc.batch_size // world)

    shard = ray.train.get_dataset_shard("train")
    cached = cache_shard(shard, [L.ROW_WEIGHTS], CACHE_BYTES)
    streamed = None if cached else stream_shard(shard, [L.ROW_WEIGHTS], per_worker)
    window_loss, window_t = [], []
    clock, clock_step = time.perf_counter(), step
    while step < tc.steps:
        gen = torch.Generator().manual_seed(int(np.random.default_rng([cfg.seed, rank, step]).integers(2**62)))
        if cached:
            pick = torch.randint(0, len(cached[L.ROW_WEIGHTS]), (per_worker,), generator=gen).numpy()
            rows = cached[L.ROW_WEIGHTS][pick]
        else:
            rows = next(streamed)[L.ROW_WEIGHTS]
        x0 = std.forward(torch.from_numpy(np.asarray(rows, np.float32))).to(device)
        losses, t = diffusion.training_losses(model, x0, generator=gen)
        loss = losses.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(denoiser)
        step += 1
        window_loss.append(losses.detach().cpu())
        window_t.append(t.cpu())
        if step % tc.log_every == 0 or step == tc.steps:
            all_losses, all_t = torch.cat(window_loss), torch.cat(window_t)
            buckets = bucket_losses(all_t, all_losses, diffusion.T, BUCKETS)
            history.append({"step": step, "loss": float(all_losses.mean()),
                            "buckets": {k: v[0] for k, v in buckets.items() if v[1]}})
            window_loss, window_t = [], []
        if step % tc.checkpoint_every == 0 or step == tc.steps:
            rate = (step - clock_step) / (time.perf_counter() - clock)  # since the last checkpoint
            clock, clock_step = time.perf_counter(), step
            metrics = {"step": step, "loss": history[-1]["loss"] if history else float("nan"),
                       "resumed_from": resumed_from, "rows_per_s": rate * per_worker * world}
            if rank == 0:
                log.info("train: step %d/%d, loss %.4g, %.1f steps/s (%.0f rows/s)", step, tc.steps, metrics["loss"],
                         rate, metrics["rows_per_s"])
                with tempfile.TemporaryDirectory() as folder:
                    save_checkpoint(folder, {"model": denoiser.state_dict(), "ema": ema.state_dict()["model"],
                                             "ema_state": {"decay": ema.decay, "updates": ema.updates},
                                             "opt": opt.state_dict(), "step": step, "standardizer": std.state()},
                                    {"step": step, "fingerprint": config["fingerprint"], "layout": layout.to_json(),
                                     "diffusion": to_dict(cfg.diffusion),
                                     "train": to_dict(tc), "history": history})
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
            else:
                ray.train.report(metrics)
