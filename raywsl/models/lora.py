"""LoRA field types: per-shape low-rank adapters on the frozen, trained base field (`raywsl train-base`).

    lora   W'_l = W_l + B_l A_l        (additive, Hu et al.)
    mlora  W'_l = W_l * (B_l A_l)      (multiplicative: the LoRA paper's)

on every modulated synthesis layer l of the base (models/modulated.py), with the base's weights, biases,
input/output layers and mapping frozen. A shape's style is fixed: the styles of the mean training
latent (the base was trained with one latent per shape; a new shape is represented by its adapters
alone). The row holds, per layer, the rank pairs (a_i, b_i), i < rank, as entries `<layer>.a<i>` (d_in)
and `<layer>.b<i>` (d_out): B A = sum_i b_i a_i^T, and the diffusion tokenizer can read the pairs.

Init (one distribution, shared by all shapes; the paper draws every entry, papers/004 §4.2): every
entry ~ N(mean, 1/d), d its vector's length, with mean 0, except mlora's a_0 = b_0 = 1. So B A ~ 0
(lora) or B A ~ 1 (mlora): a fit starts near the base field at the mean latent.

Asymmetric masks (asym, the paper's §3.4) act on the trained factors: in every a_i and b_i,
ceil(sqrt(d_out)) entries (d_out: the adapted layer's output size) are frozen at positions drawn per
vector and shared by all shapes, to N(0, kappa / d) for lora and to 0 for mlora, and leave the row
(`<layer>.a<i>_free`). Rank pairs then differ by their frozen patterns: swapping two of them changes
the field, which is how the mask breaks the r!-fold permutation symmetry of B A (the paper's
appendix, Theorems 1-2). (Masking the product W' instead leaves that symmetry intact.)
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor

from raywsl.models.bases import BaseError, load_trained
from raywsl.models.fields import Field, FieldError, frozen_per_row, register
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
        self.d_out = {}  # entry -> output size of its layer (the mask's rule)
        entries = []
        for n in names:
            d_out, d_in = base_w[n].shape
            for i in range(self.ranks[n]):
                entries += [(f"{n}.a{i}", (d_in,)), (f"{n}.b{i}", (d_out,))]
                self.d_out[f"{n}.a{i}"] = self.d_out[f"{n}.b{i}"] = d_out
        self._build(Layout(tuple(entries)))

    def _mask_targets(self) -> dict[str, int]:
        return {name: frozen_per_row(self.d_out[name], d) for name, (d,) in self.shapes.entries}

    def _init_std(self, name: str) -> float:
        return 1.0 / math.sqrt(self.shapes.shape_of[name][0])

    def _init_means(self) -> dict[str, float]:
        """The init's mean per entry: mlora's first rank pair is 1 (B A = 1), everything else 0."""
        return {name: 1.0 if self.multiplicative and name.rsplit(".", 1)[1][1:] == "0" else 0.0
                for name in self.shapes.names}

    @classmethod
    def options_from(cls, fc: Any) -> dict[str, Any]:
        return {"rank": fc.rank}

    def init_rows(self, n: int, generator: torch.Generator) -> Tensor:
        means = self._init_means()
        params = {name: means[name] + torch.randn(n, d, generator=generator) * self._init_std(name)
                  for name, (d,) in self.shapes.entries}
        return self._drop_frozen(params)

    def init_mean(self) -> Tensor:
        means = self._init_means()
        return self._drop_frozen({name: torch.full((1, d), means[name]) for name, (d,) in self.shapes.entries})[0]

    def effective_weights(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """{layer: W' (B, d_out, d_in)} from the full adapters (`full()`: frozen entries in place)."""
        out = {}
        for n, w in self.net.base_weights().items():
            a = torch.stack([params[f"{n}.a{i}"] for i in range(self.ranks[n])], 1)  # (B, r, d_in)
            b = torch.stack([params[f"{n}.b{i}"] for i in range(self.ranks[n])], 2)  # (B, d_out, r)
            ba = torch.bmm(b, a)
            out[n] = w * ba if self.multiplicative else w + ba
        return out

    def _forward(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        styles = {n: s.expand(len(x), -1) for n, s in self.styles.items()}
        return self.net(x, styles, self.effective_weights(params))

    def frozen(self) -> dict[str, Tensor]:
        out = {f"base.{k}": v for k, v in self.net.state_dict().items()}
        out["mean_latent"] = self.mean_latent
        return {**out, **super().frozen()}


@register("lora")
class AdditiveLoRAField(LoRAField):
    multiplicative = False


@register("mlora")
class MultiplicativeLoRAField(LoRAField):
    multiplicative = True
    zero_masked = True  # the paper's scheme: a frozen factor entry switches its channel off

