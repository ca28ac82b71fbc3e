"""The DeepSDF decoder (Park et al. 2019) as the small-data study builds it (papers/002, section 5.2).

    input = [z, PE(p)]  (latent d_z + positional encoding of the point)
    h = ReLU(FC(h)) x layers, the input re-injected (concatenated) at layer `inject`  --> FC --> sdf

Layer `inject` reads [h, input] (width + |input| wide; DeepSDF's own code narrows the layer before
instead, the study's 1.95 M count says it does not). No weight normalisation or dropout (the study
does not mention them); no output tanh (the clamped L1 loss already ignores values beyond +-delta).

Trained as an auto-decoder with one latent per shape (`raywsl train-base` with field.type
deepsdf_latent); a new shape is a latent optimised against the frozen decoder (models/deepsdf_latent.py).

Presets: shapenet (the study's: d_z 64, PE 39, 8 x 512, input re-injected at layer 4,
~1.95 M parameters), small and tiny for CPUs and tests.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from raywsl.models.encoding import positional_encoding


class DeepSDFDecoder(nn.Module):
    model_name: ClassVar[str] = "deepsdf"
    default_loss: ClassVar[str] = "clamped_l1"  # DeepSDF's, delta = fit/base clamp (0.1)
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "shapenet": {"latent": 64, "bands": 6, "width": 512, "layers": 8, "inject": 4},
        "small": {"latent": 32, "bands": 4, "width": 128, "layers": 4, "inject": 2},
        "tiny": {"latent": 8, "bands": 2, "width": 32, "layers": 4, "inject": 2},
    }

    def __init__(self, latent: int, bands: int, width: int, layers: int, inject: int):
        super().__init__()
        self.config = {"latent": latent, "bands": bands, "width": width, "layers": layers, "inject": inject}
        self.bands, self.inject = bands, inject
        d_in = latent + 3 + 6 * bands
        if not 0 < inject < layers:
            raise ValueError(f"DeepSDF decoder: need 0 < inject ({inject}) < layers ({layers})")
        ins = [d_in] + [width + d_in if i == inject else width for i in range(1, layers)]
        self.layers = nn.ModuleList(nn.Linear(a, width) for a in ins)
        self.output = nn.Linear(width, 1)
        # start at sdf = 0 everywhere: the clamped L1 loss has no gradient where both the prediction and
        # the target are beyond +-delta on opposite sides, and a random output layer puts most points there
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    @classmethod
    def from_preset(cls, preset: str) -> "DeepSDFDecoder":
        return cls(**cls.PRESETS[preset])

    def decode(self, x: Tensor, z: Tensor) -> Tensor:
        """x (S, K, 3) points, z (S, d_z) latents -> sdf (S, K)."""
        inp = torch.cat([z.unsqueeze(1).expand(-1, x.shape[1], -1), positional_encoding(x, self.bands)], -1)
        h = inp
        for i, layer in enumerate(self.layers):
            if i == self.inject:
                h = torch.cat([h, inp], -1)
            h = torch.relu(layer(h))
        return self.output(h).squeeze(-1)
