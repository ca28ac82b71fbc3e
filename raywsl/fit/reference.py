"""The one-shape-at-a-time loop of today's weight-space diffusion code, kept as a reference.

It fits one field with torch.optim.Adam and a LambdaLR schedule, drawing the same point windows as
the batched engine, so the two must agree (tests/test_fit_engine.py) and the benchmark can measure
what batching buys (benchmarks/fit). It has no early stop, divergence handling or slots.
"""

from __future__ import annotations

import torch

from raywsl.config import FitConfig
from raywsl.fit.engine import ADAM_BETAS, ADAM_EPS, SCHEDULES, FitResult, ShapeData, shuffled
from raywsl.models.losses import LOSSES
from raywsl.models.fields import Field


def fit_one(field: Field, shape: ShapeData, cfg: FitConfig, device: str = "cpu") -> FitResult:
    points, sdf = (torch.from_numpy(a).to(device) for a in shuffled(shape))
    row = torch.nn.Parameter(shape.init.to(device, torch.float32).clone().unsqueeze(0))
    opt = torch.optim.Adam([row], lr=cfg.lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    end = cfg.lr_end / cfg.lr if cfg.lr > 0 else 1.0
    schedule = SCHEDULES[cfg.schedule]
    # The engine's factor for step t (1-based) is schedule(t / steps); LambdaLR passes t - 1.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: float(schedule(torch.tensor(min((i + 1) / cfg.steps, 1.0)), end)))
    window = torch.arange(cfg.points_per_step, device=device)
    loss_fn, losses = LOSSES[cfg.loss], []
    for t in range(cfg.steps):
        idx = (t * cfg.points_per_step + window) % len(sdf)
        pred = field.forward(field.layout.unflatten(row), points[idx].unsqueeze(0))
        loss = loss_fn(pred, sdf[idx].unsqueeze(0), cfg.clamp).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    tail = losses[-(cfg.steps % cfg.check_every or cfg.check_every):]
    return FitResult(shape.key, shape.shape_id, row.detach()[0].cpu().numpy(), sum(tail) / len(tail), cfg.steps)
