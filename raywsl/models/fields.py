"""Field types: what a per-shape neural field computes, and how its weights lie in a row.

Every field type declares a `Layout`: the ordered (name, shape) of its trainable parameters. A weight
row is their flat concatenation, and the same layout drives fitting, the weight store, decoding and
the diffusion tokenizers. Fields are batched over shapes: `forward(params, x)` takes parameters with
a leading shape axis B and points x (B, M, 3), and returns (B, M) values (SDF, or occupancy logits).

    field = make_field("mlp", "decoder54k")           # 39 -> 128x4 -> 1, 54,785 parameters
    rows = field.init_rows(16, torch.Generator().manual_seed(0))    # (16, 54785)
    sdf = field.forward(field.layout.unflatten(rows), points)       # points (16, M, 3) -> (16, M)

Registered types (FIELDS) and their presets (`<class>.PRESETS`):
    mlp      ReLU MLP on a positional encoding [x, sin(2^k x), cos(2^k x)], k < bands (NeRF's
             encoding, as HyperDiffusion's code). decoder54k: 6 bands, 39 -> 128x4 -> 1 (the
             small-data study's decoder, 54,785 parameters); hyperdiffusion: 4 bands, 27 -> 128x3 -> 1
             (HyperDiffusion's MLP, 36,737 parameters).
    fourier  sin(w0 (W p + b)), then two linear layers with a ReLU between (the LoRA paper's
             standalone MLP; ShapeNet preset: hidden 99, w0 = 1; 10,396 parameters).

Weights follow torch.nn.Linear's convention (W is (out, in); default init U(-1/sqrt(in), 1/sqrt(in))
for W and b), so a row maps one to one onto a plain nn.Module's state dict.

A field may own frozen shared parts (asymmetric masks, `asym=True`; a base network for the LoRA
fields of the next stage) that are not in the row; `frozen()` returns them, they are fingerprinted
with the weight store and saved in it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import Tensor

from raywsl import contract as C
from raywsl.models.encoding import positional_encoding
from raywsl.store.layout import Layout, LayoutError


class FieldError(LayoutError):
    """An unknown field type or preset, a missing base, or a row that does not fit a layout."""


@dataclass(frozen=True)
class Mask:
    """The frozen entries of one weight matrix (asymmetric mask): in every output row the same k
    input positions in every shape, with fixed values."""

    fixed: Tensor  # (d_out, k) int64 column of each frozen entry
    free: Tensor  # (d_out, d_in - k) int64 columns of the trainable entries, ascending
    values: Tensor  # (d_out, k) float32 the frozen values

    def assemble(self, free_values: Tensor) -> Tensor:
        """(B, d_out, d_in - k) trainable entries -> (B, d_out, d_in) full weights."""
        b, d_out, n_free = free_values.shape
        full = free_values.new_zeros(b, d_out, n_free + self.fixed.shape[1])
        full = full.scatter(2, self.free.to(full.device).expand(b, -1, -1), free_values)
        fixed = self.values.to(full.device, full.dtype).expand(b, -1, -1)
        return full.scatter(2, self.fixed.to(full.device).expand(b, -1, -1), fixed)


def make_masks(weights: Mapping[str, tuple[int, int]], std: Mapping[str, float], zero: bool,
               seed: int) -> dict[str, Mask]:
    """Asymmetric masks of weight matrices {name: (d_out, d_in)}: per row ceil(sqrt(d_out)) frozen
    positions (at most d_in - 1), values N(0, std[name]^2) or zero."""
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for name, (d_out, d_in) in weights.items():
        k = min(math.ceil(math.sqrt(d_out)), d_in - 1)
        order = torch.argsort(torch.rand(d_out, d_in, generator=gen), dim=1)
        fixed, free = order[:, :k].sort(dim=1).values, order[:, k:].sort(dim=1).values
        values = torch.zeros(d_out, k) if zero else torch.randn(d_out, k, generator=gen) * std[name]
        masks[name] = Mask(fixed, free, values)
    return masks


class Field:
    """Base of the field types. A subclass sets PRESETS, builds the Layout of the parameters its
    `_forward` uses and passes it to `_build`; `init_rows` draws nn.Linear's init.

    Common options: asym (asymmetric masks, Lim et al. 2024, as the LoRA paper uses them): in every
    2-D `*.weight` of the layout, ceil(sqrt(d_out)) entries of each row are frozen at positions shared
    by every shape (drawn from `mask_seed`). Their values are drawn N(0, kappa x the variance of the
    trainable entries' init) -- the paper's "N(0, kappa) against N(0, 1)" as a ratio, so the scale fits
    the layer -- or are zero when `zero_masked` (multiplicative fields). Frozen entries are not in the
    row: its layout names them `<name>_free`, shape (d_out, d_in - k)."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    type_name: ClassVar[str] = ""
    zero_masked: ClassVar[bool] = False
    base_model: ClassVar[str | None] = None  # the trained base network it needs (models/bases.py), if any
    layout: Layout  # the row: trainable parameters only
    shapes: Layout  # every parameter `_forward` uses

    def __init__(self, *, asym: bool = False, kappa: float = 1.0, mask_seed: int = 0, **config: Any):
        # the constructor arguments, recorded in the store's attributes (field_of rebuilds from them)
        self.config = {**config, "asym": asym, "kappa": kappa, "mask_seed": mask_seed}
        self.asym, self.kappa, self.mask_seed = asym, kappa, mask_seed
        self.masks: dict[str, Mask] = {}

    def _build(self, shapes: Layout) -> None:
        self.shapes = shapes
        if not self.asym:
            self.layout = shapes
            return
        weights = {name: shape for name, shape in shapes.entries if name.endswith(".weight") and len(shape) == 2}
        # kappa x the variance of nn.Linear's init U(-1/sqrt(d_in), 1/sqrt(d_in))
        self.masks = make_masks(weights, {name: math.sqrt(self.kappa / (3 * s[1])) for name, s in weights.items()},
                                self.zero_masked, self.mask_seed)
        self.layout = Layout(tuple((f"{name}_free", (s[0], s[1] - self.masks[name].fixed.shape[1]))
                                   if name in self.masks else (name, s) for name, s in shapes.entries))

    def full(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Row parameters -> every parameter `_forward` uses (frozen entries put back)."""
        if not self.masks:
            return dict(params)
        out = {name: p for name, p in params.items() if not name.endswith("_free")}
        for name, mask in self.masks.items():
            out[name] = mask.assemble(params[f"{name}_free"])
        return out

    def forward(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """Row parameters (B, ...) and points (B, M, 3) -> values (B, M)."""
        return self._forward(self.full(params), x)

    def _forward(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        raise NotImplementedError

    def frozen(self) -> dict[str, Tensor]:
        """Shared parts that are not trained per shape: the masks' positions and values."""
        out: dict[str, Tensor] = {}
        for name, mask in self.masks.items():
            out[f"{name}.fixed"], out[f"{name}.values"] = mask.fixed, mask.values
        return out

    def frozen_fingerprint(self) -> str:
        h = hashlib.sha256()
        for name, t in sorted(self.frozen().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def init_rows(self, n: int, generator: torch.Generator) -> Tensor:
        """(n, P) float32 rows drawn from nn.Linear's init: W and b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        shapes = dict(self.shapes.entries)
        params = {}
        for name, shape in self.shapes.entries:
            fan_in = shapes[name.rsplit(".", 1)[0] + ".weight"][-1]
            params[name] = (torch.rand((n, *shape), generator=generator) * 2 - 1) / math.sqrt(fan_in)
        for name, mask in self.masks.items():  # keep the trainable entries of masked weights
            params[f"{name}_free"] = params.pop(name).gather(2, mask.free.expand(n, -1, -1))
        return self.layout.flatten(params)

    @classmethod
    def options_from(cls, fc: Any) -> dict[str, Any]:
        """Constructor arguments of this type taken from the `field:` config section, beyond the
        common ones (LoRA types: rank)."""
        return {}

    def trained_row(self, shape_id: str) -> Tensor | None:
        """The row a shape already has from training the base (DeepSDF latents; fit.init=trained),
        or None."""
        return None

    def bind(self, rows: Tensor) -> Callable[[Tensor], Tensor]:
        """The batch of fields of `rows` (B, P) as a callable (B, M, 3) -> (B, M), for extraction."""
        params = self.full(self.layout.unflatten(rows))
        return lambda x: self._forward(params, x)


FIELDS: dict[str, type[Field]] = {}


def register(name: str):
    def add(cls: type[Field]) -> type[Field]:
        cls.type_name = name
        FIELDS[name] = cls
        return cls
    return add


def make_field(type_name: str, preset: str, **overrides: Any) -> Field:
    """The field `type_name` with the keyword arguments of `preset`, updated by `overrides`."""
    if type_name not in FIELDS:
        raise FieldError(f"unknown field type {type_name!r}; known: {sorted(FIELDS)}")
    cls = FIELDS[type_name]
    if preset not in cls.PRESETS:
        raise FieldError(f"unknown preset {preset!r} of field type {type_name!r}; known: {sorted(cls.PRESETS)}")
    return cls(**{**cls.PRESETS[preset], **overrides})


def field_from_config(cfg: Any, base: str = "") -> Field:
    """The field of a config's `field:` section; a type on a trained base reads it from `base` (a
    `raywsl train-base` checkpoint folder: field.base, or the plan's train-base artifact)."""
    fc = cfg.field
    if fc.type not in FIELDS:
        raise FieldError(f"unknown field type {fc.type!r}; known: {sorted(FIELDS)}")
    cls = FIELDS[fc.type]
    options: dict[str, Any] = {"asym": fc.asym, "kappa": fc.kappa, "mask_seed": fc.mask_seed,
                               **cls.options_from(fc)}
    if cls.base_model:
        options["base"] = base or fc.base
    return make_field(fc.type, fc.preset, **options)


def field_of(store: Any) -> Field:
    """The field a weight store's (a RowStore's) rows belong to, rebuilt from its attributes (and checked against the
    stored layout, so a changed field definition cannot silently misread old rows)."""
    attrs = store.attrs
    A = C.Attr
    field = FIELDS[attrs[A.FIELD_TYPE]](**attrs[A.FIELD_CONFIG])
    if field.layout != Layout.from_json(attrs[A.LAYOUT]) or field.frozen_fingerprint() != attrs[A.FROZEN_FINGERPRINT]:
        raise FieldError(f"{store.path}: the {attrs[A.FIELD_TYPE]} field of this raywsl version has another "
                         f"layout or other frozen parts than the one the store was fitted with")
    return field


def linear(params: Mapping[str, Tensor], name: str, h: Tensor) -> Tensor:
    """Batched nn.Linear: h (B, M, in) @ W^T (B, in, out) + b (B, 1, out)."""
    return torch.baddbmm(params[f"{name}.bias"].unsqueeze(1), h, params[f"{name}.weight"].transpose(1, 2))


@register("mlp")
class MLPField(Field):
    PRESETS = {
        "decoder54k": {"bands": 6, "hidden": 128, "layers": 4},
        "hyperdiffusion": {"bands": 4, "hidden": 128, "layers": 3},
        "small": {"bands": 4, "hidden": 64, "layers": 3},  # 10,177 parameters: the CPU quickstart
        "tiny": {"bands": 2, "hidden": 32, "layers": 2},  # 1,601 parameters: tests
    }

    def __init__(self, bands: int, hidden: int, layers: int, **common: Any):
        super().__init__(bands=bands, hidden=hidden, layers=layers, **common)
        self.bands = bands
        dims = [3 + 6 * bands] + [hidden] * layers + [1]
        self.n_linear = len(dims) - 1
        entries = []
        for i, (d_in, d_out) in enumerate(zip(dims, dims[1:])):
            entries += [(f"l{i}.weight", (d_out, d_in)), (f"l{i}.bias", (d_out,))]
        self._build(Layout(tuple(entries)))

    def _forward(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        h = positional_encoding(x, self.bands)
        for i in range(self.n_linear):
            h = linear(params, f"l{i}", h)
            if i < self.n_linear - 1:
                h = torch.relu(h)
        return h.squeeze(-1)


@register("fourier")
class FourierField(Field):
    PRESETS = {
        "shapenet": {"hidden": 99, "omega": 1.0},
        "tiny": {"hidden": 24, "omega": 1.0},
    }

    def __init__(self, hidden: int, omega: float, **common: Any):
        super().__init__(hidden=hidden, omega=omega, **common)
        self.omega = omega
        self._build(Layout((("l0.weight", (hidden, 3)), ("l0.bias", (hidden,)),
                            ("l1.weight", (hidden, hidden)), ("l1.bias", (hidden,)),
                            ("l2.weight", (1, hidden)), ("l2.bias", (1,)))))

    def _forward(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        h = torch.sin(self.omega * linear(params, "l0", x))
        h = torch.relu(linear(params, "l1", h))
        return linear(params, "l2", h).squeeze(-1)


# The field types on a trained base live in their own modules; importing them here registers them,
# so FIELDS is complete wherever fields.py is imported.
from raywsl.models import deepsdf_latent, lora  # noqa: E402,F401
