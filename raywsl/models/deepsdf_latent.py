"""The `deepsdf_latent` field type: a shape is a latent code of a frozen, trained DeepSDF decoder.

    row = z (d_z)           sdf(x) = decoder(x, z)          (models/deepsdf.py, trained by `raywsl train-base`)

Fitting a row is DeepSDF's inference: the latent optimised against the frozen decoder, from
N(0, latent_std^2) (the auto-decoder's own init; DeepSDF draws 0.01). With fit.init=trained, a shape
the decoder was trained on starts from its trained latent instead -- the latents the small-data
study diffuses -- and fitting refines it against the EMA decoder. The weight store then holds
latents exactly as it holds weights, so the diffusion stage trains on them unchanged.

Unlike DeepSDF's inference, fitting adds no |z|^2 penalty (the engine's loss is per point); with
DeepSDF's weight (1e-4 or less) it barely moves the optimum.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from raywsl.models.bases import BaseError, load_trained
from raywsl.models.fields import Field, FieldError, register
from raywsl.store.layout import Layout


@register("deepsdf_latent")
class DeepSDFLatentField(Field):
    PRESETS = {"default": {}}
    base_model = "deepsdf"

    def __init__(self, base: str, latent_std: float = 0.01, **common: Any):
        super().__init__(base=base, latent_std=latent_std, **common)
        if self.asym:
            raise FieldError("field.asym: a deepsdf_latent row is a latent code, it has no weight matrix to mask")
        try:
            self.net, latents, ids = load_trained(base, self.base_model)
        except BaseError as e:
            raise FieldError(str(e)) from e
        self.net.requires_grad_(False)
        self.latent_std = latent_std
        # shape id -> trained latent (N x d_z floats: 256 MB at 10^6 shapes of d_z 64)
        self.trained = dict(zip(ids, latents)) if ids else {}
        self._build(Layout((("latent", (int(latents.shape[1]),)),)))

    def init_rows(self, n: int, generator: torch.Generator) -> Tensor:
        return torch.randn(n, self.layout.size, generator=generator) * self.latent_std

    def trained_row(self, shape_id: str) -> Tensor | None:
        return self.trained.get(shape_id)

    def _forward(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        return self.net.decode(x, params["latent"])

    def frozen(self) -> dict[str, Tensor]:
        return {f"decoder.{k}": v for k, v in self.net.state_dict().items()}
