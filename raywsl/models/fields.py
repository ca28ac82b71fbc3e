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
    fourier  sin(w0 (W p + b)), then ReLU layers (the LoRA paper's standalone MLP, its appendix 8.1).
             shapenet: 3 -> 99, three 99 x 99 hidden layers, 99 -> 1, w0 = 1: 30,196 parameters, the
             count of its Table 1 (the text says "followed by 2 linear layers"; only three hidden
             layers give 30,196, and MLP-Asym's 27,226 = 30,196 - 3 x 99 x 10).

Weights follow torch.nn.Linear's convention (W is (out, in); default init U(-1/sqrt(in), 1/sqrt(in))
for W and b), so a row maps one to one onto a plain nn.Module's state dict.

A field may own frozen shared parts (asymmetric masks, `asym=True`; the trained base network of
the LoRA fields) that are not in the row; `frozen()` returns them, they are fingerprinted with the
weight store and saved in it.
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
    """The frozen entries of one trained matrix (asymmetric mask), seen as (rows, cols): in every row
    the same k positions in every shape, with fixed values. A vector entry is one row."""

    fixed: Tensor  # (rows, k) int64 column of each frozen entry
    free: Tensor  # (rows, cols - k) int64 columns of the trainable entries, ascending
    values: Tensor  # (rows, k) float32 the frozen values

    def assemble(self, free_values: Tensor) -> Tensor:
        """(B, rows, cols - k) trainable entries -> (B, rows, cols) with the frozen entries put back."""
        b, rows, n_free = free_values.shape
        full = free_values.new_zeros(b, rows, n_free + self.fixed.shape[1])
        full = full.scatter(2, self.free.to(full.device).expand(b, -1, -1), free_values)
        fixed = self.values.to(full.device, full.dtype).expand(b, -1, -1)
        return full.scatter(2, self.fixed.to(full.device).expand(b, -1, -1), fixed)


def make_masks(targets: Mapping[str, tuple[int, int, int]], std: Mapping[str, float], zero: bool,
               seed: int) -> dict[str, Mask]:
    """Asymmetric masks of matrices {name: (rows, cols, k)}: k frozen positions per row, drawn
    uniformly from one seeded generator in the order of `targets`; values N(0, std[name]^2) or zero."""
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for name, (rows, cols, k) in targets.items():
        order = torch.argsort(torch.rand(rows, cols, generator=gen), dim=1)
        fixed, free = order[:, :k].sort(dim=1).values, order[:, k:].sort(dim=1).values
        values = torch.zeros(rows, k) if zero else torch.randn(rows, k, generator=gen) * std[name]
        masks[name] = Mask(fixed, free, values)
    return masks


def frozen_per_row(d_out: int, cols: int) -> int:
    """The asymmetric mask's rule: ceil(sqrt(d_out)) frozen entries per row, d_out the output size of
    the layer the matrix belongs to, keeping at least one entry of the row trainable."""
    return min(math.ceil(math.sqrt(d_out)), cols - 1)


class Field:
    """Base of the field types. A subclass sets PRESETS, builds the Layout of the parameters its
    `_forward` uses and passes it to `_build`; `init_rows` draws nn.Linear's init.

    Common options: asym (asymmetric masks, Lim et al. 2024, as the LoRA paper uses them, §3.4): in
    every matrix `_mask_targets` names, ceil(sqrt(d_out)) entries of each row are frozen at positions
    shared by every shape (drawn from `mask_seed`). Standalone MLPs mask their hidden layers' weights
    (the paper's MLP-Asym count); the LoRA fields their trained factors a_i, b_i. Frozen values are
    N(0, kappa x the variance of the entry's init) -- the paper's "N(0, kappa) against N(0, 1)" as a
    ratio, so the scale fits the layer; kappa = 6 as the paper -- or zero when `zero_masked`
    (multiplicative fields). Frozen entries are not in the row: its layout names them `<name>_free`,
    shape (d_out, d_in - k) for a matrix, (d - k,) for a vector."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    type_name: ClassVar[str] = ""
    zero_masked: ClassVar[bool] = False
    base_model: ClassVar[str | None] = None  # the trained base network it needs (models/bases.py), if any
    layout: Layout  # the row: trainable parameters only
    shapes: Layout  # every parameter `_forward` uses

    def __init__(self, *, asym: bool = False, kappa: float = 6.0, mask_seed: int = 0, **config: Any):
        # the constructor arguments, recorded in the store's attributes (field_of rebuilds from them)
        self.config = {**config, "asym": asym, "kappa": kappa, "mask_seed": mask_seed}
        self.asym, self.kappa, self.mask_seed = asym, kappa, mask_seed
        self.masks: dict[str, Mask] = {}

    def _build(self, shapes: Layout) -> None:
        self.shapes = shapes
        if not self.asym:
            self.layout = shapes
            return
        targets = self._mask_targets()
        if not targets:
            raise FieldError(f"field.asym: the {self.type_name} field has no weight matrix to mask")
        dims = {name: _rows_cols(shape) for name, shape in shapes.entries if name in targets}
        self.masks = make_masks({name: (*dims[name], k) for name, k in targets.items()},
                                {name: math.sqrt(self.kappa) * self._init_std(name) for name in targets},
                                self.zero_masked, self.mask_seed)
        self.layout = Layout(tuple((f"{name}_free", _free_shape(s, self.masks[name])) if name in self.masks
                                   else (name, s) for name, s in shapes.entries))

    def _mask_targets(self) -> dict[str, int]:
        """{entry: frozen entries per row} of the asymmetric masks. Standalone MLPs: the weights of
        the hidden layers, neither the input layer (3 or a few encoded inputs per row) nor the output
        layer (one row): the LoRA paper's MLP-Asym count, 27,226 = 30,196 - 3 x 99 x 10."""
        weights = [(name, s) for name, s in self.shapes.entries if name.endswith(".weight") and len(s) == 2]
        return {name: frozen_per_row(d_out, d_in) for name, (d_out, d_in) in weights[1:-1]}

    def _init_std(self, name: str) -> float:
        """Standard deviation of the init of entry `name`: nn.Linear's U(-1/sqrt(d_in), 1/sqrt(d_in))."""
        return math.sqrt(1.0 / (3 * self.shapes.shape_of[name][-1]))

    def full(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Row parameters -> every parameter `_forward` uses (frozen entries put back)."""
        if not self.masks:
            return dict(params)
        out = {name: p for name, p in params.items() if not name.endswith("_free")}
        for name, mask in self.masks.items():
            free = params[f"{name}_free"]
            out[name] = mask.assemble(free.reshape(len(free), mask.free.shape[0], -1)).reshape(
                len(free), *self.shapes.shape_of[name])
        return out

    def _drop_frozen(self, params: dict[str, Tensor]) -> Tensor:
        """Full parameters {name: (n, *shape)} -> (n, P) rows: the trainable entries only."""
        for name, mask in self.masks.items():
            full = params.pop(name)
            n = len(full)
            params[f"{name}_free"] = full.reshape(n, *mask.fixed.shape[:1], -1).gather(
                2, mask.free.expand(n, -1, -1)).reshape(n, *self.layout.shape_of[f"{name}_free"])
        return self.layout.flatten(params)

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
        params = {}
        for name, shape in self.shapes.entries:
            fan_in = self.shapes.shape_of[name.rsplit(".", 1)[0] + ".weight"][-1]
            params[name] = (torch.rand((n, *shape), generator=generator) * 2 - 1) / math.sqrt(fan_in)
        return self._drop_frozen(params)

    def init_mean(self) -> Tensor:
        """(P,) the mean of `init_rows`' distribution: every entry is drawn around it (the stability
        experiment perturbs the deviations from it)."""
        return torch.zeros(self.layout.size)

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


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    """A matrix entry's (rows, cols); a vector is one row."""
    return (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])


def _free_shape(shape: tuple[int, ...], mask: Mask) -> tuple[int, ...]:
    cols = shape[-1] - mask.fixed.shape[1]
    return (shape[0], cols) if len(shape) == 2 else (cols,)


def linear(params: Mapping[str, Tensor], name: str, h: Tensor) -> Tensor:
    """Batched nn.Linear: h (B, M, in) @ W^T (B, in, out) + b (B, 1, out)."""
    return torch.baddbmm(params[f"{name}.bias"].unsqueeze(1), h, params[f"{name}.weight"].transpose(1, 2))


def linear_stack(dims: list[int]) -> Layout:
    """The layout of linear layers l0, l1, ... mapping dims[0] -> dims[1] -> ... -> dims[-1]."""
    entries = []
    for i, (d_in, d_out) in enumerate(zip(dims, dims[1:])):
        entries += [(f"l{i}.weight", (d_out, d_in)), (f"l{i}.bias", (d_out,))]
    return Layout(tuple(entries))


def relu_stack(params: Mapping[str, Tensor], h: Tensor, first: int, n_linear: int) -> Tensor:
    """Layers l<first> .. l<n_linear - 1> of a `linear_stack`, a ReLU after all but the last; (B, M)."""
    for i in range(first, n_linear):
        h = linear(params, f"l{i}", h)
        if i < n_linear - 1:
            h = torch.relu(h)
    return h.squeeze(-1)


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
        self.n_linear = layers + 1
        self._build(linear_stack([3 + 6 * bands] + [hidden] * layers + [1]))

    def _forward(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        return relu_stack(params, positional_encoding(x, self.bands), 0, self.n_linear)


@register("fourier")
class FourierField(Field):
    PRESETS = {
        "shapenet": {"hidden": 99, "layers": 3, "omega": 1.0},  # the LoRA paper's ShapeNet MLP: 30,196
        "small": {"hidden": 57, "layers": 3, "omega": 1.0},  # 10,204 parameters: the CPU comparisons
        "tiny": {"hidden": 24, "layers": 1, "omega": 1.0},  # 721 parameters: tests
    }

    def __init__(self, hidden: int, omega: float, layers: int = 3, **common: Any):
        super().__init__(hidden=hidden, layers=layers, omega=omega, **common)
        self.omega = omega
        self.n_linear = layers + 2
        self._build(linear_stack([3] + [hidden] * (layers + 1) + [1]))

    def _forward(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        h = torch.sin(self.omega * linear(params, "l0", x))  # the Fourier feature layer
        return relu_stack(params, h, 1, self.n_linear)


# The field types on a trained base live in their own modules; importing them here registers them,
# so FIELDS is complete wherever fields.py is imported.
from raywsl.models import deepsdf_latent, lora  # noqa: E402,F401
