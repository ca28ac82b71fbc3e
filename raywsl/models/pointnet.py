"""Point-cloud encoders: a surface point cloud -> a condition c -> a field's weight row.

    net = make_encoder("pointnet", width=256, params=10_177)
    c = net.encode(clouds)            # clouds (n, S, 3), any S -> c (n, 256)
    z = net.head(c)                   # c -> (n, 10_177): a standardised row of the field's layout
    z = net(clouds)                   # both at once (what training differentiates)

This is the study's map (papers/000 §2): a condition c in R^C reconfigures the field's effective weights
theta_c = Phi(c); here Phi is the head followed by the weight store's de-standardisation (raywsl/encoder/),
and theta_c is one row of the field type the store was fitted with (MLP weights, LoRA / mLoRA adapters on
the frozen base, a DeepSDF latent).

Registered encoders (ENCODERS, config key encoder.arch):
    pointnet  PointNet's shared per-point MLP (Qi et al. 2017) 3 -> 64 -> 128 -> width, ReLU between the
              layers and none after the last, then the maximum over the points: c does not depend on the
              order of the points, and any number of points (>= 1) gives a c of the same size. No batch
              norm (small batches, several DDP workers). Head: width -> width -> params, ReLU between; its
              last layer starts at zero, so a fresh encoder predicts the standardised mean row (z = 0).
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn


class PointNetEncoder(nn.Module):
    arch = "pointnet"

    def __init__(self, width: int, params: int, hidden: Sequence[int] = (64, 128)):
        super().__init__()
        self.width, self.params = width, params
        dims = [3, *hidden, width]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims, dims[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(dims) - 2:
                layers.append(nn.ReLU())
        self.points = nn.Sequential(*layers)  # applied to every point alike
        self.head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, params))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def encode(self, clouds: Tensor) -> Tensor:
        """Clouds (n, S, 3), S >= 1 -> conditions (n, width)."""
        if clouds.dim() != 3 or clouds.shape[-1] != 3 or clouds.shape[1] < 1:
            raise ValueError(f"point clouds must be (n, S, 3) with S >= 1 points, got shape {tuple(clouds.shape)}")
        return self.points(clouds).amax(dim=1)

    def forward(self, clouds: Tensor) -> Tensor:
        """Clouds (n, S, 3) -> standardised rows (n, params)."""
        return self.head(self.encode(clouds))


ENCODERS: dict[str, type[nn.Module]] = {cls.arch: cls for cls in (PointNetEncoder,)}


def make_encoder(arch: str, width: int, params: int) -> nn.Module:
    """A fresh encoder `arch` with conditions of `width` values and a head to rows of `params` values
    (seed torch first: every Ray Train worker must build the same one)."""
    if arch not in ENCODERS:
        raise ValueError(f"encoder.arch {arch!r}: known encoders {sorted(ENCODERS)}")
    return ENCODERS[arch](width, params)
