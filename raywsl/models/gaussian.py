"""Gaussian diffusion over weight rows: the forward process, the training loss and two samplers.

    diffusion = GaussianDiffusion(DiffusionSettings(steps=500, prediction="eps"))
    losses, t = diffusion.training_losses(model, x0)          # x0 (B, P) -> per-sample MSE (B,), t (B,)
    rows = diffusion.ddim_sample(model, (16, P), steps=100, generator=torch.Generator().manual_seed(0))

Conventions (DDPM's): timesteps t are integers in [0, T), t = 0 the least noisy;
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,   abar_t = prod_{s <= t} (1 - beta_s),   eps ~ N(0, I)
so x_0 itself is never a model input and a sampler's last step returns the predicted x0.
`model(x_t, t)` maps rows (B, P) and long timesteps (B,) to a prediction (B, P) of
    "eps": the noise;  "x0": the clean row;  "v": sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho).
`split` turns any of them into the pair (x0_hat, eps_hat), which is all the samplers use.

The schedule is computed in float64 (abar_t spans orders of magnitude) and the samplers read their
per-step coefficients from it as Python floats; the batched paths (q_sample, target, split) use
float32 copies. Sampling runs under no_grad, its noise drawn from `generator` (a CPU
torch.Generator by default) and moved to `device`, so a seed gives the same rows on any device.

The linear schedule must reach noise by T - 1: abar_{T-1} = 4e-5 at T = 1000, 6e-3 at T = 500
(HyperDiffusion's), but 0.36 at T = 100, where the betas should be scaled by 1000 / T (improved DDPM)
or the cosine schedule used. Under cosine, abar_{T-1} ~ 1e-7, so eps prediction turns a small eps
error into a huge x0_hat = (x_t - b eps) / a at the first sampling step: pair it with x0 or v, or clip.

`bucket_losses` splits a batch's losses by timestep. A working model's loss depends strongly on t
(x0 prediction: lowest near t = 0; eps prediction: lowest near T); a loss flat across t means the model
ignores x_t and outputs a constant (eps: 0, x0: the mean row), i.e. a collapse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

Model = Callable[[Tensor, Tensor], Tensor]


@dataclass
class DiffusionSettings:
    steps: int = 500  # T (HyperDiffusion's)
    schedule: str = "linear"  # a key of SCHEDULES
    beta_start: float = 1e-4  # linear schedule (DDPM / HyperDiffusion)
    beta_end: float = 2e-2
    prediction: str = "eps"  # "eps", "x0" (HyperDiffusion's) or "v"


# ------------------------------------------------------------------------------- schedules

def linear_betas(steps: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> Tensor:
    return torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)


def cosine_betas(steps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal: abar(u) = f(u) / f(0), f(u) = cos^2((u + s) / (1 + s) pi / 2), u = t / T;
    betas clipped at max_beta so the last steps do not divide by abar ~ 0."""
    f = torch.cos((torch.arange(steps + 1, dtype=torch.float64) / steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


SCHEDULES: dict[str, Callable[[DiffusionSettings], Tensor]] = {
    "linear": lambda s: linear_betas(s.steps, s.beta_start, s.beta_end),
    "cosine": lambda s: cosine_betas(s.steps),
}
PREDICTIONS = ("eps", "x0", "v")


# ------------------------------------------------------------------------------- the process

class GaussianDiffusion:
    def __init__(self, settings: DiffusionSettings):
        if settings.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {settings.schedule!r}; known: {', '.join(SCHEDULES)}")
        if settings.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {settings.prediction!r}; known: {', '.join(PREDICTIONS)}")
        self.s, self.T = settings, settings.steps
        # float64 tables, indexed by t
        self.betas = SCHEDULES[settings.schedule](settings)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        # q(x_{t-1} | x_t, x0) = N(c0 x0 + ct x_t, var): DDPM's posterior, var = 0 at t = 0
        abar, prev = self.alphas_cumprod, self.alphas_cumprod_prev
        self.posterior_c0 = self.betas * prev.sqrt() / (1 - abar)
        self.posterior_ct = (1 - prev) * (1 - self.betas).sqrt() / (1 - abar)
        self.posterior_var = self.betas * (1 - prev) / (1 - abar)
        # float32 copies for the batched paths, moved to a device on first use
        self._f32 = {"a": abar.sqrt().float(), "b": (1 - abar).sqrt().float()}
        self._on: dict[tuple[str, torch.device], Tensor] = {}

    def _coef(self, name: str, t: Tensor, x: Tensor) -> Tensor:
        """Coefficient `name` at timesteps t (B,), shaped to broadcast against x (B, ...)."""
        key = (name, x.device)
        if key not in self._on:
            self._on[key] = self._f32[name].to(x.device)
        return self._on[key][t.to(x.device)].to(x.dtype).view(-1, *[1] * (x.dim() - 1))

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return self._coef("a", t, x0) * x0 + self._coef("b", t, x0) * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the model is trained to output, under settings.prediction."""
        p = self.s.prediction
        if p == "eps":
            return noise
        if p == "x0":
            return x0
        return self._coef("a", t, x0) * noise - self._coef("b", t, x0) * x0

    def split(self, model_out: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(x0_hat, eps_hat) from a model output of any prediction type (x_t = a x0 + b eps, a^2 + b^2 = 1)."""
        a, b, p = self._coef("a", t, x_t), self._coef("b", t, x_t), self.s.prediction
        if p == "eps":
            return (x_t - b * model_out) / a, model_out
        if p == "x0":
            return model_out, (x_t - a * model_out) / b
        return a * x_t - b * model_out, b * x_t + a * model_out

    def training_losses(self, model: Model, x0: Tensor, generator: torch.Generator | None = None
                        ) -> tuple[Tensor, Tensor]:
        """Per-sample MSE (B,) between model(x_t, t) and its target, and the t drawn (B,), uniform in [0, T).
        t and the noise come from `generator` (on its device) when given, else from x0's device."""
        dev = generator.device if generator is not None else x0.device
        t = torch.randint(0, self.T, (x0.shape[0],), generator=generator, device=dev).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype).to(x0.device)
        out = model(self.q_sample(x0, t, noise), t)
        return (out - self.target(x0, noise, t)).square().flatten(1).mean(1), t

    # --------------------------------------------------------------------------- sampling

    def _predict(self, model: Model, x: Tensor, t: int, clip: float | None) -> tuple[Tensor, Tensor]:
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        x0, eps = self.split(model(x, tt), x, tt)
        if clip is not None:  # clip x0_hat and make eps_hat agree with it (guided-diffusion's DDIM)
            x0 = x0.clamp(-clip, clip)
            eps = (x - self._coef("a", tt, x) * x0) / self._coef("b", tt, x)
        return x0, eps

    @staticmethod
    def _noise(shape, generator: torch.Generator | None, device) -> Tensor:
        return torch.randn(shape, generator=generator).to(device)

    @torch.no_grad()
    def ddim_sample(self, model: Model, shape: tuple[int, ...], steps: int = 100, eta: float = 0.0,
                    generator: torch.Generator | None = None, device=None, clip: float | None = None) -> Tensor:
        """DDIM (Song et al.) over `steps` timesteps evenly spaced from T - 1 down to 0 (rounded, so
        fewer if steps > T); eta = 0 is deterministic given the starting noise, eta = 1 has DDPM's
        posterior variance between the chosen steps."""
        device = device or "cpu"
        ts = torch.linspace(self.T - 1, 0, steps, dtype=torch.float64).round().long().unique().flip(0).tolist()
        x = self._noise(shape, generator, device)
        abar = self.alphas_cumprod.tolist()
        for i, t in enumerate(ts):
            a_t, a_prev = abar[t], (abar[ts[i + 1]] if i + 1 < len(ts) else 1.0)
            x0, eps = self._predict(model, x, t, clip)
            sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
            x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma ** 2, 0.0)) * eps
            if sigma > 0:
                x = x + sigma * self._noise(shape, generator, device)
        return x

    @torch.no_grad()
    def ancestral_sample(self, model: Model, shape: tuple[int, ...], generator: torch.Generator | None = None,
                         device=None, clip: float | None = None) -> Tensor:
        """DDPM: x_{t-1} ~ q(x_{t-1} | x_t, x0_hat) for t = T-1 .. 0, all T steps (posterior variance)."""
        device = device or "cpu"
        x = self._noise(shape, generator, device)
        for t in reversed(range(self.T)):
            x0, _ = self._predict(model, x, t, clip)
            x = float(self.posterior_c0[t]) * x0 + float(self.posterior_ct[t]) * x
            if t > 0:
                x = x + math.sqrt(float(self.posterior_var[t])) * self._noise(shape, generator, device)
        return x


def bucket_losses(t: Tensor, losses: Tensor, T: int, buckets: int = 10) -> dict[str, tuple[float, int]]:
    """{"t000-049": (mean loss, count), ...}: `buckets` equal ranges of [0, T), every one listed
    (an empty one as (nan, 0)), so the keys are the same from batch to batch."""
    t, losses = t.detach().cpu(), losses.detach().float().cpu()
    width, digits = -(-T // buckets), max(3, len(str(T - 1)))
    out = {}
    for lo in range(0, T, width):
        hi = min(lo + width, T)
        mask = (t >= lo) & (t < hi)
        n = int(mask.sum())
        out[f"t{lo:0{digits}d}-{hi - 1:0{digits}d}"] = (losses[mask].mean().item() if n else float("nan"), n)
    return out
