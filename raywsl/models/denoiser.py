"""The denoiser of weight rows and its checkpoints.

    denoiser = build_denoiser(cfg, layout)      # tokenizer (rows <-> tokens) around a DiT
    pred = denoiser(x_t, t)                      # (B, P) standardised noisy rows, (B,) steps -> (B, P)

The tokenizer is chosen by diffusion.tokenizer and driven by the weight store's layout; the DiT size
by diffusion.model. Rows are standardised per parameter (diffusion.standardize) before the denoiser
sees them; the Standardizer is saved in the checkpoint beside the weights.

A checkpoint folder holds `state.pt` (tensors and numbers only, loaded with weights_only=True: the
denoiser, its EMA, the optimiser, the step, the standardiser) and `info.json` (the config sections
that rebuild the model, the layout, the loss history): runtime.save_checkpoint / load_checkpoint.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from raywsl.config import Config
from raywsl.models.dit import MODELS, make_dit
from raywsl.models.gaussian import DiffusionSettings, GaussianDiffusion
from raywsl.models.tokenizers import make_tokenizer
from raywsl.store.standardize import Standardizer
from raywsl.store.layout import Layout
from raywsl.runtime import load_checkpoint


class Denoiser(nn.Module):
    def __init__(self, tokenizer: nn.Module, dit: nn.Module):
        super().__init__()
        self.tokenizer, self.dit = tokenizer, dit

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.tokenizer.decode(self.dit(self.tokenizer.encode(x), t))


def tokenizer_options(cfg: Config) -> dict[str, Any]:
    """diffusion.token_size as the tokenizer's own option name (0: its default)."""
    d = cfg.diffusion
    if not d.token_size:
        return {}
    return {"token_size" if d.tokenizer == "latent" else "chunk_size": d.token_size}


def diffusion_seed(cfg: Config) -> int:
    """The seed of the denoiser's init, batches and sampling: `seed` itself when diffusion.seed is 0, else a
    seed mixed from both (a sweep's seeds vary the diffusion run, not the data split or the fits)."""
    if cfg.diffusion.seed == 0:
        return cfg.seed
    return int(np.random.default_rng([cfg.seed, cfg.diffusion.seed]).integers(2**31))


def build_denoiser(cfg: Config, layout: Layout) -> Denoiser:
    """A fresh denoiser (seeded: every Ray Train worker builds the same one)."""
    torch.manual_seed(diffusion_seed(cfg))
    if cfg.diffusion.model not in MODELS:
        raise ValueError(f"diffusion.model {cfg.diffusion.model!r}: known sizes {sorted(MODELS)}")
    tokenizer = make_tokenizer(cfg.diffusion.tokenizer, layout, MODELS[cfg.diffusion.model]["dim"],
                               **tokenizer_options(cfg))
    return Denoiser(tokenizer, make_dit(cfg.diffusion.model, tokenizer.n_tokens))


def make_diffusion(cfg: Config) -> GaussianDiffusion:
    d = cfg.diffusion
    return GaussianDiffusion(DiffusionSettings(steps=d.timesteps, schedule=d.schedule, prediction=d.prediction))


def load_for_sampling(cfg: Config, folder: str, ema: bool = True) -> tuple[Denoiser, Standardizer, dict[str, Any]]:
    """The trained denoiser (its EMA weights unless ema=False), the standardiser and the info."""
    state, info = load_checkpoint(folder, "run `raywsl train` first")
    denoiser = build_denoiser(cfg, Layout.from_json(info["layout"]))
    denoiser.load_state_dict(state["ema"] if ema else state["model"])
    return denoiser.eval().requires_grad_(False), Standardizer.from_state(state["standardizer"]), info
