"""Per-parameter standardisation of weight rows (the diffusion model sees z = (row - mean) / std),
fitted over a store's training rows shard by shard and saved beside the denoiser as plain tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor

STD_FLOOR = 1e-8


@dataclass
class Standardizer:
    """Per-parameter standardisation z = (rows - mean) / std, fitted over the training rows.

    std is the population std (ddof 0), floored at eps (default 1e-8): a parameter constant over the
    store (a frozen-looking entry) maps to z = 0 and back to its constant, never to inf / NaN; any real
    spread of float32 weights is far above the floor. mean / std are float32 (P,) and follow the
    rows' device and dtype."""

    mean: Tensor  # (P,)
    std: Tensor  # (P,)

    def __post_init__(self) -> None:
        if self.mean.dim() != 1 or self.mean.shape != self.std.shape:
            raise ValueError(f"Standardizer: mean and std must be (P,), got {tuple(self.mean.shape)} and "
                             f"{tuple(self.std.shape)}")

    @property
    def size(self) -> int:
        return len(self.mean)

    @classmethod
    def fit(cls, rows: Tensor | np.ndarray | Iterable[Tensor | np.ndarray], eps: float = STD_FLOOR) -> "Standardizer":
        """Mean / std per parameter of rows (n, P), or of an iterable of (n_i, P) blocks (a store read
        shard by shard: only one block is in memory). Blocks merge by Chan et al.'s pairwise update in
        float64, so the result is that of the whole at once to rounding, however many blocks."""
        blocks = [rows] if isinstance(rows, (Tensor, np.ndarray)) else rows
        n, mean, m2 = 0, None, None
        for k, block in enumerate(blocks):
            x = torch.as_tensor(np.asarray(block) if not isinstance(block, Tensor) else block)
            x = x.detach().to("cpu", torch.float64)
            if x.dim() != 2 or (mean is not None and x.shape[1] != len(mean)):
                want = f"(n, {len(mean)})" if mean is not None else "(n, P)"
                raise ValueError(f"Standardizer.fit: block {k} must be {want}, got {tuple(x.shape)}")
            if not len(x):
                continue
            if not torch.isfinite(x).all():
                bad = int((~torch.isfinite(x)).any(dim=1).sum())
                raise ValueError(f"Standardizer.fit: block {k} has {bad} row(s) with NaN / Inf values")
            nb, mb = len(x), x.mean(dim=0)
            m2b = ((x - mb) ** 2).sum(dim=0)
            if mean is None:
                n, mean, m2 = nb, mb, m2b
                continue
            delta, total = mb - mean, n + nb
            mean = mean + delta * (nb / total)
            m2 = m2 + m2b + delta ** 2 * (n * nb / total)
            n = total
        if mean is None:
            raise ValueError("Standardizer.fit: no rows")
        std = (m2 / n).sqrt().clamp_min(eps)
        return cls(mean.float(), std.float())

    @classmethod
    def identity(cls, size: int) -> "Standardizer":
        return cls(torch.zeros(size), torch.ones(size))

    def _check(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.size:
            raise ValueError(f"Standardizer of {self.size} parameters: got rows of {x.shape[-1]}")
        return x

    def forward(self, rows: Tensor) -> Tensor:
        """rows (..., P) -> (rows - mean) / std, on the rows' device and in their dtype."""
        rows = self._check(rows)
        return (rows - self.mean.to(rows)) / self.std.to(rows)

    def inverse(self, z: Tensor) -> Tensor:
        z = self._check(z)
        return z * self.std.to(z) + self.mean.to(z)

    def state(self) -> dict[str, Tensor]:
        """Plain tensors (torch.save, loaded back with weights_only=True)."""
        return {"mean": self.mean.detach().cpu().clone(), "std": self.std.detach().cpu().clone()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Standardizer":
        return cls(torch.as_tensor(state["mean"], dtype=torch.float32).cpu(),
                   torch.as_tensor(state["std"], dtype=torch.float32).cpu())
