"""`raywsl train`: the diffusion denoiser on the weight store's training rows, under Ray Train.

    weights.zarr --driver--> training rows: the run's training shapes (data.shapes; store/split.py),
                             fitted; per-parameter mean / std over them (the Standardizer)
                 --RowStore Datasource--> Ray Train workers (scaling.num_workers; DDP: gloo on CPU,
                             nccl on GPU), each with its shard of rows (kept in memory up to
                             CACHE_BYTES, else streamed)
        each step: batch_size / workers rows per worker, standardised, one DDPM loss (t uniform);
                   AdamW, gradients averaged by DDP and clipped to train.grad_clip; EMA of the denoiser.
                   A step whose loss or gradient is NaN / inf on any worker is skipped on every worker
                   and counted (skipped_steps); train.max_bad_steps in a row fail the run (DenoiserUpdate)
        rank 0: a checkpoint every train.checkpoint_every steps (reported with ray.train.report),
                with the loss history (overall and per timestep bucket)
    --> <cache>/train/<fp>.work/ (Ray Train's run folder, resumable) until the last step, then the
        final state published as the artifact <cache>/train/<fp>/ (state.pt, info.json and
        diffusion_loss.png), shown in the run folder as checkpoints/diffusion_final; losses in MLflow

A killed run resumes from its latest checkpoint when the same command runs again (Ray Train
restores a run by its storage path and name), with the step count intact; every step's rows, t and
noise are drawn from generators seeded by (seed, worker, step), so a resumed run equals an
uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from raywsl import cache
from raywsl import contract as C
from raywsl import tracking
from raywsl.config import Config, TrainConfig, build, to_dict
from raywsl.geometry import figures
from raywsl.runtime import copy_checkpoint, fit_torch_trainer, ray_session, report_progress
from raywsl.store.rows import RowStore
from raywsl.store.standardize import Standardizer
from raywsl.store.weights import fitted_training_rows, standardizer_of

log = logging.getLogger(__name__)

CACHE_BYTES = 2 << 30  # a worker keeps its shard of rows in memory up to this size, else streams it
BUCKETS = 10  # timestep buckets of the logged loss


def training_set(cfg: Config, plan: C.Plan) -> tuple[RowStore, np.ndarray]:
    """The weight store and the rows diffusion trains on; refused (StoreError) unless the run's
    training shapes are fitted."""
    return fitted_training_rows(plan.weights, cfg.data.shapes, max(2, cfg.scaling.num_workers),
                                "diffusion (max(2, scaling.num_workers))")


def train(cfg: Config, plan: C.Plan, out: str, restart: bool = False) -> dict[str, Any]:
    """Train (or resume training) the denoiser of `plan` and write its final state into `out`;
    returns the final metrics."""
    from raywsl.store.datasource import read_rows

    store, rows = training_set(cfg, plan)
    work = cache.absolute(cache.work_dir(plan["train"]))
    if restart:
        cache.remove(work)
    keep = np.zeros(store.n_rows, bool)
    keep[rows] = True
    std = standardizer_of(store, rows) if cfg.diffusion.standardize else Standardizer.identity(
        store.group[C.ROW_WEIGHTS].shape[1])
    log.info("train: %d training rows of %d parameters (%s field), tokenizer %s, DiT %s, %d steps of %d rows, "
             "%d workers", len(rows), store.group[C.ROW_WEIGHTS].shape[1], store.attrs[C.Attr.FIELD_TYPE],
             cfg.diffusion.tokenizer, cfg.diffusion.model, cfg.train.steps, cfg.train.batch_size,
             cfg.scaling.num_workers)
    with ray_session(cfg.ray.address, cfg.ray.num_cpus or None):
        data = read_rows(store.path, [C.ROW_WEIGHTS]).map_batches(
            _select, fn_kwargs={"keep": keep}, batch_size=None)
        config = {"cfg": to_dict(cfg), "layout": store.attrs[C.Attr.LAYOUT], "fingerprint": plan["train"].fingerprint,
                  "standardizer": {k: v.tolist() for k, v in std.state().items()},
                  "progress": C.join(work, C.TRAIN_PROGRESS)}
        result = fit_torch_trainer(_train_loop, config, dataset=data, storage=work, workers=cfg.scaling.num_workers,
                                   use_gpu=cfg.scaling.use_gpu, cpus_per_worker=cfg.scaling.cpus_per_worker,
                                   progress=("train", cfg.train.steps))
    copy_checkpoint(result, out)
    cache.update_json(C.join(out, C.CHECKPOINT_INFO), {"metrics": dict(result.metrics)})
    _report(cfg, out)
    log.info("train: %s -> %s", result.metrics, plan["train"].path)
    return dict(result.metrics)


def _select(batch: dict[str, np.ndarray], keep: np.ndarray) -> dict[str, np.ndarray]:
    """Only the training rows (fitted, in the run's training range)."""
    mask = keep[batch["row"]]
    return {name: values[mask] for name, values in batch.items()}


def _report(cfg: Config, folder: str) -> None:
    """The loss history of the final checkpoint as curves: diffusion_loss.png in the artifact."""
    history = cache.read_json(C.join(folder, C.CHECKPOINT_INFO), {}).get("history", [])
    if not history:
        return
    steps = [h["step"] for h in history]
    curves = {"loss (all t)": (steps, [h["loss"] for h in history])}
    for name in history[-1]["buckets"]:
        curves[f"t {name}"] = (steps, [h["buckets"].get(name, float("nan")) for h in history])
    figures.plot_curves(curves, C.join(folder, C.DIFFUSION_LOSS), xlabel="step",
                        ylabel=f"{cfg.diffusion.prediction} MSE", title="denoiser training loss, per timestep bucket")


def log_train(folder: str) -> dict[str, Any]:
    """The trained denoiser's losses and figure, to the active MLflow run (also when it was reused);
    returns its final metrics."""
    info = cache.read_json(C.join(folder, C.CHECKPOINT_INFO), {})
    for h in info.get("history", []):
        health = {f"diffusion_{k}": h[k] for k in ("grad_norm", "skipped_steps") if k in h}  # older checkpoints
        tracking.log_metrics({"diffusion_loss": h["loss"], **health,
                              **{f"diffusion_loss_{k}": v for k, v in h["buckets"].items()}}, step=h["step"])
    tracking.log_figure(C.join(folder, C.DIFFUSION_LOSS))
    return info.get("metrics", {})


# ------------------------------------------------------------------------------------ one step

class StepOutcome(NamedTuple):
    losses: Tensor  # (rows,) per-row DDPM losses of the step, detached
    t: Tensor  # (rows,) their timesteps
    grad_norm: float  # the global gradient norm before clipping
    taken: bool  # False: skipped (a non-finite loss or gradient somewhere), no update


class DenoiserUpdate:
    """One optimiser step of the denoiser: the DDPM loss of a batch, backward (DDP averages the
    gradients across workers), clipping to the global norm train.grad_clip, the optimiser and the
    EMA. A step whose loss or gradient is NaN / inf on any worker is skipped on every worker (the
    gradient norm is the averaged one, the loss flag is all-reduced: all workers decide alike and stay
    in lockstep); train.max_bad_steps of those in a row raise RuntimeError (tracking.StepGuard), which
    fails the Ray Train run on every worker at the same step."""

    def __init__(self, model: torch.nn.Module, denoiser: torch.nn.Module, ema, opt: torch.optim.Optimizer,
                 diffusion, tc: TrainConfig, skipped: int = 0):
        self.model, self.denoiser, self.ema, self.opt, self.diffusion = model, denoiser, ema, opt, diffusion
        self.grad_clip = tc.grad_clip
        self.params = [p for p in denoiser.parameters() if p.requires_grad]
        self.guard = tracking.StepGuard("train", "train.max_bad_steps", tc.max_bad_steps, skipped)
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    @property
    def skipped(self) -> int:
        return self.guard.skipped

    def __call__(self, x0: Tensor, generator: torch.Generator, step: int) -> StepOutcome:
        losses, t = self.diffusion.training_losses(self.model, x0, generator=generator)
        loss = losses.mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        flag = (~torch.isfinite(loss.detach())).float().reshape(1)
        if self.distributed:
            dist.all_reduce(flag)  # > 0: some worker's loss was not finite
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        loss_value, norm_value, any_bad = torch.stack([loss.detach().float(), norm.float(), flag[0]]).tolist()
        if not self.guard.healthy(step, loss_value, norm_value, bad_anywhere=any_bad > 0):
            self.opt.zero_grad(set_to_none=True)
            return StepOutcome(losses.detach(), t, norm_value, False)
        if self.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.grad_clip, norm)
        self.opt.step()
        self.ema.update(self.denoiser)
        return StepOutcome(losses.detach(), t, norm_value, True)


# ------------------------------------------------------------------------------------ one worker

def _train_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from raywsl.models.dit import EMA
    from raywsl.models.gaussian import bucket_losses
    from raywsl.models.denoiser import build_denoiser, diffusion_seed, make_diffusion
    from raywsl.runtime import load_checkpoint, save_checkpoint
    from raywsl.store.layout import Layout
    from raywsl.store.datasource import cache_shard, stream_shard

    cfg = build(Config, config["cfg"])
    torch.set_num_threads(cfg.scaling.cpus_per_worker)  # Ray sets OMP_NUM_THREADS; say it explicitly
    tc = cfg.train
    layout = Layout.from_json(config["layout"])
    std = Standardizer.from_state({k: torch.tensor(v) for k, v in config["standardizer"].items()})
    denoiser = build_denoiser(cfg, layout)
    ema = EMA(denoiser, tc.ema)
    opt = torch.optim.AdamW(denoiser.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    step, history, skipped = 0, [], 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state, info = load_checkpoint(folder)
        history = info["history"]
        denoiser.load_state_dict(state["model"])
        ema.load_state_dict({"model": state["ema"], **state["ema_state"]})
        opt.load_state_dict(state["opt"])
        step = int(state["step"])
        skipped = int(state.get("skipped_steps", 0))  # checkpoints from before it was kept: 0
    resumed_from = step
    model = ray.train.torch.prepare_model(denoiser)  # DDP when there are several workers; to the device
    device = next(denoiser.parameters()).device
    ema.model.to(device)
    diffusion = make_diffusion(cfg)
    update = DenoiserUpdate(model, denoiser, ema, opt, diffusion, tc, skipped)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    per_worker = max(1, tc.batch_size // world)

    shard = ray.train.get_dataset_shard("train")
    cached = cache_shard(shard, [C.ROW_WEIGHTS], CACHE_BYTES)
    streamed = None if cached else stream_shard(shard, [C.ROW_WEIGHTS], per_worker)
    window_loss, window_t, window_norm = [], [], []  # of the steps taken (not skipped) since the last log
    clock, clock_step = time.perf_counter(), step
    while step < tc.steps:
        seed = np.random.default_rng([diffusion_seed(cfg), rank, step]).integers(2**62)
        gen = torch.Generator().manual_seed(int(seed))
        if cached:
            pick = torch.randint(0, len(cached[C.ROW_WEIGHTS]), (per_worker,), generator=gen).numpy()
            rows = cached[C.ROW_WEIGHTS][pick]
        else:
            rows = next(streamed)[C.ROW_WEIGHTS]
        x0 = std.forward(torch.from_numpy(np.asarray(rows, np.float32))).to(device)
        outcome = update(x0, gen, step)  # a skipped step still counts: the next draws its own rows
        step += 1
        if outcome.taken:
            window_loss.append(outcome.losses.cpu())
            window_t.append(outcome.t.cpu())
            window_norm.append(outcome.grad_norm)
        if step % tc.log_every == 0 or step == tc.steps:
            # every step of the window skipped (fewer than max_bad_steps in a row): NaN, an alarm in MLflow
            all_losses = torch.cat(window_loss) if window_loss else torch.full((1,), math.nan)
            all_t = torch.cat(window_t) if window_t else torch.zeros(1, dtype=torch.long)
            buckets = bucket_losses(all_t, all_losses, diffusion.T, BUCKETS)
            history.append({"step": step, "loss": float(all_losses.mean()),
                            "buckets": {k: v[0] for k, v in buckets.items() if v[1]},
                            "grad_norm": float(np.mean(window_norm)) if window_norm else math.nan,
                            "skipped_steps": update.skipped})
            window_loss, window_t, window_norm = [], [], []
            if rank == 0:
                report_progress(config["progress"], step, tc.steps, history[-1]["loss"])
        if step % tc.checkpoint_every == 0 or step == tc.steps:
            rate = (step - clock_step) / (time.perf_counter() - clock)  # since the last checkpoint
            clock, clock_step = time.perf_counter(), step
            metrics = {"step": step, "loss": history[-1]["loss"] if history else float("nan"),
                       "resumed_from": resumed_from, "rows_per_s": rate * per_worker * world,
                       "grad_norm": history[-1].get("grad_norm", math.nan) if history else math.nan,
                       "skipped_steps": update.skipped}
            if rank == 0:
                log.info("train: step %d/%d, loss %.4g, %.1f steps/s (%.0f rows/s)", step, tc.steps, metrics["loss"],
                         rate, metrics["rows_per_s"])
                with tempfile.TemporaryDirectory() as folder:
                    save_checkpoint(folder, {"model": denoiser.state_dict(), "ema": ema.state_dict()["model"],
                                             "ema_state": {"decay": ema.decay, "updates": ema.updates},
                                             "opt": opt.state_dict(), "step": step, "standardizer": std.state(),
                                             "skipped_steps": update.skipped},
                                    {"step": step, "fingerprint": config["fingerprint"], "layout": layout.to_json(),
                                     "diffusion": to_dict(cfg.diffusion),
                                     "train": to_dict(tc), "history": history})
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
            else:
                ray.train.report(metrics)
