"""The modulated base neural field of the LoRA paper (papers/004, appendix 8.2, Figure 7b).

    z (d_z) --mapping MLP (ReLU)--> w --per layer affine--> s_l = A_l w + b_l
    p --positional encoding--> linear --> [block: h + ReLU(mod(ReLU(mod(h, s_2j)), s_2j+1))] x blocks --> linear --> sdf

A modulated fully connected layer scales the input channels of its weight by the layer's style,
W'_oi = W_oi s_i, then normalises every output channel ("demodulation"),
W''_oi = W'_oi / sqrt(sum_i W'_oi^2 + 1e-8), and computes W'' h + b. All modulated layers are
channels x channels, so per-shape LoRA adapters (models/lora.py) can replace W by W + BA or W * BA.

Presets: shapenet (the paper's ShapeNet size: d_z 128, mapping 4 x 256, 4 blocks x 512 channels),
small and tiny for CPUs and tests.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch
from torch import Tensor, nn

from raywsl.models.encoding import positional_encoding

DEMOD_EPS = 1e-8


def modulated_linear(h: Tensor, weight: Tensor, style: Tensor, bias: Tensor) -> Tensor:
    """h (B, M, in), weight (out, in) shared or (B, out, in) per shape, style (B, in), bias (out,)
    -> (B, M, out): the demodulated, style-modulated linear map."""
    w = weight * style.unsqueeze(1)  # (B, out, in): W diag(s)
    w = w * torch.rsqrt(w.square().sum(2, keepdim=True) + DEMOD_EPS)
    return torch.baddbmm(bias.expand(h.shape[0], 1, -1), h, w.transpose(1, 2))


class ModulatedField(nn.Module):
    model_name: ClassVar[str] = "modulated"
    default_loss: ClassVar[str] = "l1"  # the LoRA paper's reconstruction loss
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "shapenet": {"latent": 128, "mapping_layers": 4, "mapping_width": 256, "blocks": 4, "channels": 512,
                     "bands": 6},
        "small": {"latent": 32, "mapping_layers": 2, "mapping_width": 64, "blocks": 2, "channels": 64, "bands": 4},
        "tiny": {"latent": 8, "mapping_layers": 2, "mapping_width": 16, "blocks": 1, "channels": 16, "bands": 2},
    }

    def __init__(self, latent: int, mapping_layers: int, mapping_width: int, blocks: int, channels: int,
                 bands: int):
        super().__init__()
        self.config = {"latent": latent, "mapping_layers": mapping_layers, "mapping_width": mapping_width,
                       "blocks": blocks, "channels": channels, "bands": bands}
        self.bands = bands
        dims = [latent] + [mapping_width] * mapping_layers
        self.mapping = nn.Sequential(*[m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.ReLU())])
        self.layer_names = [f"block{j}.fc{k}" for j in range(blocks) for k in range(2)]
        self.affine = nn.ModuleDict({n.replace(".", "_"): nn.Linear(mapping_width, channels) for n in self.layer_names})
        for a in self.affine.values():
            nn.init.ones_(a.bias)  # styles start at 1: the layers start unmodulated (as StyleGAN2)
        self.weight = nn.ParameterDict({n.replace(".", "_"): nn.Parameter(torch.randn(channels, channels))
                                        for n in self.layer_names})
        self.bias = nn.ParameterDict({n.replace(".", "_"): nn.Parameter(torch.zeros(channels))
                                      for n in self.layer_names})
        self.input = nn.Linear(3 + 6 * bands, channels)
        self.output = nn.Linear(channels, 1)

    @classmethod
    def from_preset(cls, preset: str) -> "ModulatedField":
        return cls(**cls.PRESETS[preset])

    def decode(self, x: Tensor, z: Tensor) -> Tensor:
        """x (S, K, 3) points, z (S, d_z) latents -> sdf (S, K): the auto-decoder's view."""
        return self(x, self.styles(z))

    def styles(self, z: Tensor) -> dict[str, Tensor]:
        """z (B, d_z) -> {layer: s_l (B, channels)}."""
        w = self.mapping(z)
        return {n: self.affine[n.replace(".", "_")](w) for n in self.layer_names}

    def base_weights(self) -> dict[str, Tensor]:
        """{layer: W_l (channels, channels)}: the weights LoRA adapters act on."""
        return {n: self.weight[n.replace(".", "_")] for n in self.layer_names}

    def forward(self, x: Tensor, styles: Mapping[str, Tensor], weights: Mapping[str, Tensor] | None = None) -> Tensor:
        """x (B, M, 3), styles from `styles(z)`, weights: per-shape (B, C, C) replacements of the base
        weights (LoRA) or None -> sdf (B, M)."""
        weights = weights or self.base_weights()
        h = self.input(positional_encoding(x, self.bands))
        for j in range(len(self.layer_names) // 2):
            a, b = f"block{j}.fc0", f"block{j}.fc1"
            t = torch.relu(modulated_linear(h, weights[a], styles[a], self.bias[a.replace(".", "_")]))
            h = h + torch.relu(modulated_linear(t, weights[b], styles[b], self.bias[b.replace(".", "_")]))
        return self.output(h).squeeze(-1)
