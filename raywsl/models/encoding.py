"""The positional encoding the coordinate fields share (MLP fields, the modulated base field)."""

from __future__ import annotations

import torch
from torch import Tensor


def positional_encoding(x: Tensor, bands: int) -> Tensor:
    """[x, sin(2^k x), cos(2^k x)] for k < bands: (..., 3) -> (..., 3 + 6 bands)."""
    if bands == 0:
        return x
    freqs = 2.0 ** torch.arange(bands, device=x.device, dtype=x.dtype)
    xf = (x.unsqueeze(-1) * freqs).flatten(-2)  # (..., 3 * bands), x-major
    return torch.cat([x, torch.sin(xf), torch.cos(xf)], dim=-1)
