"""Losses between a field's output and the true signed distances, by name (`fit.loss`, `base.loss`).

Each maps (prediction, sdf, clamp) to per-point losses of the same shape; callers take the means.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def _l1(pred: Tensor, sdf: Tensor, clamp: float) -> Tensor:
    return (pred - sdf).abs()


def _clamped_l1(pred: Tensor, sdf: Tensor, clamp: float) -> Tensor:
    return (pred.clamp(-clamp, clamp) - sdf.clamp(-clamp, clamp)).abs()


def _mse(pred: Tensor, sdf: Tensor, clamp: float) -> Tensor:
    return (pred - sdf).square()


def _bce(logits: Tensor, sdf: Tensor, clamp: float) -> Tensor:
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, (sdf < 0).to(logits.dtype),
                                                                reduction="none")


LOSSES: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "l1": _l1, "clamped_l1": _clamped_l1, "mse": _mse, "bce": _bce}
