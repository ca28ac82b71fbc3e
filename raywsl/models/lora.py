"""LoRA field types: per-shape low-rank adapters on the frozen, trained base field (`raywsl train-base`).

    lora   W'_l = W_l + B_l A_l        (additive, Hu et al.)
    mlora  W'_l = W_l * (B_l A_l)      (multiplicative: the LoRA paper's)

on every modulated synthesis layer l of the base (models/modulated.py), with the base's weights, biases,
input/output layers and mapping frozen. A shape's style is fixed: the styles of the mean training
latent (the base was trained with one latent per shape; a new shape is represented by its adapters
alone). The row holds, per layer, the rank pairs (a_i, b_i), i < rank, as entries `<layer>.a<i>` (d_in)
and `<layer>.b<i>` (d_out): B A = sum_i b_i a_i^T, and the diffusion tokenizer can read the pairs.

Start (shared by all shapes): b_i = 0 and a_i ~ N(0, 1/d_in) for lora, so W' = W; for mlora
a_0 = b_0 = 1 (B A = 1) and b_i = 0 for i > 0, so W' = W as well. Both start as the base field at the
mean latent.

Asymmetric masks (asym) act on the layer's effective weight W': ceil(sqrt(d_out)) entries per row are
fixed at shared positions, to N(0, kappa x var(W)) for lora and to 0 for mlora (the paper's scheme);
the adapters stay whole in the row, and the fixed entries cannot change whatever they hold.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor

from raywsl.models.bases import BaseError, load_trained
from raywsl.models.fields import Field, FieldError, make_masks, register
from raywsl.store.layout import Layout


class LoRAField(Field):
    PRESETS = {"default": {}}
    multiplicative = False
    base_model = "modulated"

    def __init__(self, base: str, rank: int | list[int] = 4, **common: Any):
        super().__init__(base=base, rank=rank, **common)
        try:
            self.net, latents, _ = load_trained(base, self.base_model)
        except BaseError as e:
            raise FieldError(str(e)) from e
        self.net.requires_grad_(False)
        self.mean_latent = latents.mean(0)
        with torch.no_grad():
            self.styles = {n: s[0] for n, s in self.net.styles(self.mean_latent[None]).items()}
        names = self.net.layer_names
        ranks = [rank] * len(names) if isinstance(rank, int) else list(rank)
        if len(ranks) != len(names) or min(ranks) < 1:
            raise FieldError(f"field.rank: one positive rank, or one per synthesis layer ({len(names)}), got {rank}")
        self.ranks = dict(zip(names, ranks))
        base_w = self.net.base_weights()
        entries = []
        for n in names:
            d_out, d_in = base_w[n].shape
            for i in range(self.ranks[n]):
                entries += [(f"{n}.a{i}", (d_in,)), (f"{n}.b{i}", (d_out,))]
        self.shapes = self.layout = Layout(tuple(entries))
        if self.asym:  # masks on the effective weights W' (not in the row)
            std = {n: math.sqrt(self.kappa) * float(w.std()) for n, w in base_w.items()}
            self.masks_w = make_masks({n: tuple(w.shape) for n, w in base_w.items()}, std, self.multiplicative,
                                      self.mask_seed)
        else:
            self.masks_w = {}

    @classmethod
    def options_from(cls, fc: Any) -> dict[str, Any]:
        return {"rank": fc.rank}

    def init_rows(self, n: int, generator: torch.Generator) -> Tensor:
        params = {}
        for name, (d,) in self.layout.entries:
            layer, which = name.rsplit(".", 1)
            i = int(which[1:])
            if which[0] == "a":
                params[name] = torch.ones(n, d) if self.multiplicative and i == 0 else \
                    torch.randn(n, d, generator=generator) / math.sqrt(d)
            else:
                params[name] = torch.ones(n, d) if self.multiplicative and i == 0 else torch.zeros(n, d)
        return self.layout.flatten(params)

    def effective_weights(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """{layer: W' (B, d_out, d_in)} from the adapters."""
        out = {}
        for n, w in self.net.base_weights().items():
            a = torch.stack([params[f"{n}.a{i}"] for i in range(self.ranks[n])], 1)  # (B, r, d_in)
            b = torch.stack([params[f"{n}.b{i}"] for i in range(self.ranks[n])], 2)  # (B, d_out, r)
            ba = torch.bmm(b, a)
            eff = w * ba if self.multiplicative else w + ba
            if n in self.masks_w:
                m = self.masks_w[n]
                eff = eff.scatter(2, m.fixed.expand(len(eff), -1, -1), m.values.to(eff.dtype).expand(len(eff), -1, -1))
            out[n] = eff
        return out

    def full(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return dict(params)

    def _forward(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        styles = {n: s.expand(len(x), -1) for n, s in self.styles.items()}
        return self.net(x, styles, self.effective_weights(params))

    def frozen(self) -> dict[str, Tensor]:
        out = {f"base.{k}": v for k, v in self.net.state_dict().items()}
        out["mean_latent"] = self.mean_latent
        for n, m in self.masks_w.items():
            out[f"{n}.fixed"], out[f"{n}.values"] = m.fixed, m.values
        return out


@register("lora")
class AdditiveLoRAField(LoRAField):
    multiplicative = False


@register("mlora")
class MultiplicativeLoRAField(LoRAField):
    multiplicative = True

