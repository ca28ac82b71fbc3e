"""Auto-decoder training: one shared network and one latent code per shape, optimised jointly.

    trainer = AutoDecoder(net, n_shapes, settings)
    loss = trainer.step(idx, points, sdf)        # idx (S,) shapes, points (S, K, 3), sdf (S, K)
    trainer.save("checkpoints/base/step_000100") ; trainer = AutoDecoder.load(path, net, ...)

The objective is the LoRA paper's (and DeepSDF's): reconstruction of every shape's SDF from its
latent, plus latent_reg x |z_i|^2. Latents start N(0, latent_std^2); the network and the latents
have their own Adam learning rates, both decayed geometrically to lr_end over the run; an
exponential moving average (EMA) of the network weights, with a warm-up, is kept for use after training.
The gradient (network and latents together) is clipped to a global L2 norm of grad_clip; a step whose
loss or gradient is NaN / inf is skipped (no update, no EMA), and max_bad_steps of those in a row
raise (tracking.StepGuard): a diverged base never trains on to a "successful" end.

`batches` draws the staged schedule of the LoRA paper: early stages many shapes x few points,
late stages few shapes x many points, from a seeded generator whose state is checkpointed, so a
run resumed from a checkpoint continues exactly as an uninterrupted one.

Checkpoints are plain tensors and numbers (`torch.save`, read back with `weights_only=True`: no
pickled code), with a JSON file beside them saying what they hold.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from raywsl.models.losses import LOSSES
from raywsl.runtime import load_checkpoint, save_checkpoint
from raywsl.tracking import StepGuard


@dataclass
class AutoDecoderSettings:
    steps: int = 2000
    lr: float = 1e-3  # network
    latent_lr: float = 1e-3
    lr_end: float = 1e-5
    latent_reg: float = 1e-4  # lambda_r
    latent_std: float = 0.01
    ema: float = 0.999
    loss: str = "l1"
    clamp: float = 0.1
    # (fraction of the steps, shapes per step, points per shape): many shapes x few points first
    stages: list[list[float]] = field(default_factory=lambda: [[0.5, 16, 1024], [0.3, 8, 4096], [0.2, 4, 8192]])
    seed: int = 0
    grad_clip: float = 1.0  # max global L2 norm of the gradient (0: no clipping)
    max_bad_steps: int = 10  # non-finite steps in a row that abort the run


class AutoDecoder:
    """The training state: network, its EMA, latents, optimiser, step and sampling generator.
    `net(x, z)` must map points (S, K, 3) and latents (S, d_z) to SDF (S, K)."""

    def __init__(self, net: nn.Module, forward: Callable[[nn.Module, Tensor, Tensor], Tensor], n_shapes: int,
                 latent_dim: int, settings: AutoDecoderSettings):
        self.net, self.forward, self.s = net, forward, settings
        self.ema = copy.deepcopy(net).requires_grad_(False)
        gen = torch.Generator().manual_seed(settings.seed)
        self.latents = nn.Parameter(torch.randn(n_shapes, latent_dim, generator=gen) * settings.latent_std)
        self.opt = torch.optim.Adam([{"params": net.parameters(), "lr": settings.lr},
                                     {"params": [self.latents], "lr": settings.latent_lr}])
        self.base_lrs = [settings.lr, settings.latent_lr]
        self.step_count = 0
        self.sampler = torch.Generator().manual_seed(settings.seed + 1)
        self.loss_fn = LOSSES[settings.loss]
        self.guard = StepGuard("train-base", "base.max_bad_steps", settings.max_bad_steps)
        self.grad_norm = math.nan  # the last step's gradient norm before clipping

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite loss or gradient (checkpointed with the run)."""
        return self.guard.skipped

    def stage(self) -> tuple[int, int]:
        """(shapes per step, points per shape) of the stage the next step is in."""
        bounds = np.cumsum([stage[0] for stage in self.s.stages]) * self.s.steps
        k = min(int(np.searchsorted(bounds, self.step_count, side="right")), len(self.s.stages) - 1)
        return int(self.s.stages[k][1]), int(self.s.stages[k][2])

    def step(self, idx: Tensor, points: Tensor, sdf: Tensor,
             sync: Callable[[list[Tensor]], None] | None = None) -> float:
        """One Adam step on shapes `idx`; returns its reconstruction loss, NaN when the step was skipped
        (its loss or gradient was not finite: tracking.StepGuard). `sync` averages tensors across
        workers (Ray Train) between backward and the update: the gradients, and a flag saying that
        some worker's loss was not finite, so that every worker skips the same steps and holds the same
        network and latents."""
        s = self.s
        decay = (s.lr_end / s.lr) ** (self.step_count / max(s.steps, 1))
        for group, lr in zip(self.opt.param_groups, self.base_lrs):
            group["lr"] = lr * decay
        z = self.latents[idx]
        recon = self.loss_fn(self.forward(self.net, points, z), sdf, s.clamp).mean()
        loss = recon + s.latent_reg * z.square().sum(1).mean()
        self.opt.zero_grad()
        loss.backward()
        params = [p for p in (*self.net.parameters(), self.latents) if p.grad is not None]
        flag = (~torch.isfinite(loss.detach())).float().reshape(1)  # > 0 after sync: some worker's loss
        if sync is not None:
            sync([*(p.grad for p in params), flag])
        # The norm of the averaged gradient is the same on every worker, and so is the choice below.
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        loss_value, norm_value, any_bad = torch.stack([loss.detach().float(), norm.float(), flag[0]]).tolist()
        self.grad_norm = norm_value
        if not self.guard.healthy(self.step_count, loss_value, norm_value, bad_anywhere=any_bad > 0):
            self.opt.zero_grad()
            self.step_count += 1  # a skipped step still counts: the lr schedule and the sampler move on
            return math.nan
        if s.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, s.grad_clip, norm)
        self.opt.step()
        # EMA warm-up (decay (1 + t) / (10 + t) until it reaches s.ema): a short run's EMA would
        # otherwise still be mostly the random init (0.999^300 = 0.74)
        decay = min(s.ema, (1 + self.step_count) / (10 + self.step_count))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.net.parameters()):
                e.lerp_(p, 1 - decay)
        self.step_count += 1
        return recon.item()

    def batches(self, points: np.ndarray, sdf: np.ndarray) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """(idx, points, sdf) for the remaining steps of the staged schedule, drawn from the
        in-memory samples `points` (N, M, 3), `sdf` (N, M) by the checkpointed sampler (what a
        train-base worker whose shard fits in memory steps on)."""
        n, m = sdf.shape
        while self.step_count < self.s.steps:
            shapes, k = self.stage()
            shapes, k = min(shapes, n), min(k, m)
            idx = torch.randperm(n, generator=self.sampler)[:shapes]
            cols = torch.randint(0, m, (shapes, k), generator=self.sampler)
            yield idx, torch.from_numpy(points[idx.numpy()[:, None], cols.numpy()]), \
                torch.from_numpy(sdf[idx.numpy()[:, None], cols.numpy()])

    # ---------------------------------------------------------------- checkpoints

    def save(self, folder: str) -> None:
        state = {"net": self.net.state_dict(), "ema": self.ema.state_dict(), "latents": self.latents.detach(),
                 "opt": self.opt.state_dict(), "step": self.step_count, "sampler": self.sampler.get_state(),
                 "skipped_steps": self.guard.skipped}
        save_checkpoint(folder, state, {"step": self.step_count, "settings": asdict(self.s),
                                        "latents": list(self.latents.shape),
                                        "model": getattr(self.net, "model_name", None),
                                        "net": getattr(self.net, "config", None)})

    def load_state(self, folder: str) -> None:
        state, _ = load_checkpoint(folder)
        self.net.load_state_dict(state["net"])
        self.ema.load_state_dict(state["ema"])
        with torch.no_grad():
            self.latents.copy_(state["latents"])
        self.opt.load_state_dict(state["opt"])
        self.step_count = int(state["step"])
        self.sampler.set_state(state["sampler"])
        self.guard.skipped = int(state.get("skipped_steps", 0))  # checkpoints before it was kept: 0
