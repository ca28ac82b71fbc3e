"""The weight-row contract: a field's trainable parameters as ordered (name, shape) entries, and a
row as their flat concatenation. The same layout drives fitting, the weight store (its `layout`
attribute), decoding and the diffusion tokenizers; flat <-> structured round trips are exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Mapping

import torch
from torch import Tensor


class LayoutError(ValueError):
    """A row or a parameter set that does not fit a layout."""


@dataclass(frozen=True)
class Layout:
    """Ordered (name, shape) of a field's trainable parameters; a row is their flat concatenation."""

    entries: tuple[tuple[str, tuple[int, ...]], ...]

    @cached_property
    def shape_of(self) -> dict[str, tuple[int, ...]]:
        """{name: shape}, for lookups by name."""
        return dict(self.entries)

    @cached_property
    def sizes(self) -> list[int]:
        return [math.prod(shape) for _, shape in self.entries]

    @property
    def size(self) -> int:
        return sum(self.sizes)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.entries]

    def unflatten(self, rows: Tensor) -> dict[str, Tensor]:
        """rows (..., P) -> {name: (..., *shape)}, views of `rows` (gradients flow back into it)."""
        if rows.shape[-1] != self.size:
            raise LayoutError(f"a row of this layout has {self.size} values, got {rows.shape[-1]}")
        lead = rows.shape[:-1]
        parts = torch.split(rows, self.sizes, dim=-1)
        return {name: p.reshape(*lead, *shape) for (name, shape), p in zip(self.entries, parts)}

    def flatten(self, params: Mapping[str, Tensor]) -> Tensor:
        """{name: (..., *shape)} -> rows (..., P): the inverse of `unflatten`."""
        missing = set(self.names) - set(params)
        if missing:
            raise LayoutError(f"parameters missing from the layout: {sorted(missing)}")
        parts = []
        for name, shape in self.entries:
            p = params[name]
            lead = p.shape[: p.dim() - len(shape)]
            if tuple(p.shape[len(lead):]) != shape:
                raise LayoutError(f"parameter {name}: expected shape (..., {shape}), got {tuple(p.shape)}")
            parts.append(p.reshape(*lead, -1))
        return torch.cat(parts, dim=-1)

    def to_json(self) -> list[list[Any]]:
        return [[name, list(shape)] for name, shape in self.entries]

    @classmethod
    def from_json(cls, entries: list[list[Any]]) -> "Layout":
        return cls(tuple((str(name), tuple(int(s) for s in shape)) for name, shape in entries))
