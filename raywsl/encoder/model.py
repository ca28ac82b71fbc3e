"""The trained point-cloud encoder, as the probes use it: a cloud -> a condition c -> a field's row.

    plan = plan_for(cfg, encoder=True)           # raywsl.stages: the plan with the train-encoder stage
    enc = load_encoder(cfg, plan)                # its published artifact (checkpoints/encoder_final)
    c = enc.conditions(clouds)                   # (n, S, 3) float32 array or tensor, any S >= 1 -> (n, C)
    rows = enc.rows(c)                           # (n, C) -> (n, P) rows of the weight store's field
    meshes = decode_rows(enc.field.bind, rows, 64)   # raywsl.geometry.extract

`enc.field` is the field the weight store's rows belong to (`field_of(store)`: the frozen base and the
asymmetric masks included), so a row of `enc.rows` is decoded exactly as a fitted row is. c is the
study's condition (papers/000 §2): the map theta_c = Phi(c) is the encoder's head followed by the
store's de-standardisation (`enc.standardizer`: per-parameter mean / std over the training rows).

Clouds are in the normalised frame (the unit sphere, as ingest stores SURFACE). The encoder was trained
on random subsets of `enc.points` surface points per shape (uniform, and for a share `encoder.uneven` of
them denser towards a random direction); the max over points makes c independent of their order and
defined for any count, but clouds of about `enc.points` points are what it knows best.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from raywsl import cache
from raywsl import contract as C
from raywsl.config import Config
from raywsl.models.fields import Field, field_of
from raywsl.models.pointnet import make_encoder
from raywsl.store.layout import Layout
from raywsl.store.standardize import Standardizer
from raywsl.store.weights import open_weights
from raywsl.runtime import load_checkpoint

UNEVEN_BETA = 3.0  # an uneven subset's density grows up to e^(2 x 3) ~ 400-fold across the shape
BATCH = 64  # clouds encoded at once


class EncoderError(RuntimeError):
    """No trained encoder where one is needed, or one that does not fit the weight store."""


def encoder_seed(cfg: Config) -> int:
    """The seed of the encoder's init, subsets and batches: `seed` itself when encoder.seed is 0, else one
    mixed from both (several encoders on one data split and one set of fits)."""
    if cfg.encoder.seed == 0:
        return cfg.seed
    return int(np.random.default_rng([cfg.seed, cfg.encoder.seed, 2]).integers(2**31))


def draw_subsets(clouds: Tensor, k: int, uneven: float, generator: torch.Generator) -> Tensor:
    """A random subset of min(k, S) points of each cloud (b, S, 3) -> (b, k, 3), without replacement. A
    share `uneven` of the clouds (each drawn with that probability) are sampled with probability ~
    exp(beta <p, d>), d a random direction and beta ~ U(0, UNEVEN_BETA) per cloud; the rest uniformly.
    (Weighted sampling without replacement as the top k of log-weights plus Gumbel noise.)"""
    b, s, _ = clouds.shape
    k = min(k, s)
    u = torch.rand(b, s, generator=generator).clamp_min(1e-12)
    gumbel = -torch.log(-torch.log(u))
    direction = torch.nn.functional.normalize(torch.randn(b, 3, generator=generator), dim=1)
    beta = torch.rand(b, generator=generator) * UNEVEN_BETA * (torch.rand(b, generator=generator) < uneven)
    logits = beta[:, None] * (clouds.cpu() @ direction[:, :, None])[..., 0]
    idx = (logits + gumbel).topk(k, dim=1).indices.to(clouds.device)
    return clouds.gather(1, idx[..., None].expand(-1, -1, 3))


def eval_cloud(surface: np.ndarray, k: int, seed: int, shape_id: str) -> np.ndarray:
    """The cloud of one shape the reconstruction figures encode: a uniform subset of min(k, S) of its
    surface points (S, 3), seeded by (seed, shape id) alone."""
    digest = hashlib.sha256(f"encoder/{shape_id}".encode()).digest()
    rng = np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])
    return surface[np.sort(rng.choice(len(surface), min(k, len(surface)), replace=False))]


@dataclass
class PointCloudEncoder:
    """A trained encoder with the weight store's field and standardiser (see the module doc)."""

    net: torch.nn.Module  # clouds -> standardised rows (models/pointnet.py), in eval mode, no gradients
    standardizer: Standardizer
    field: Field
    info: dict[str, Any]  # the artifact's info.json (arch, width, points, layout, history, metrics)
    device: torch.device

    @property
    def width(self) -> int:
        """C: the size of a condition."""
        return int(self.info["width"])

    @property
    def points(self) -> int:
        """The cloud size the encoder was trained on (encoder.points)."""
        return int(self.info["points"])

    def conditions(self, clouds: np.ndarray | Tensor) -> Tensor:
        """Point clouds (n, S, 3), any S >= 1, in the normalised frame -> conditions (n, C), float32 on the CPU."""
        x = torch.as_tensor(np.asarray(clouds, np.float32) if not isinstance(clouds, Tensor) else clouds)
        if x.dim() != 3 or x.shape[-1] != 3 or x.shape[1] < 1:
            raise EncoderError(f"conditions: point clouds must be (n, S, 3) with S >= 1, got shape {tuple(x.shape)}")
        with torch.no_grad():
            return torch.cat([self.net.encode(x[i:i + BATCH].to(self.device, torch.float32)).cpu()
                              for i in range(0, len(x), BATCH)]) if len(x) else torch.zeros(0, self.width)

    def rows(self, c: np.ndarray | Tensor) -> Tensor:
        """Conditions (n, C) -> rows (n, P) of `field`'s layout (de-standardised), float32 on the CPU."""
        c = torch.as_tensor(np.asarray(c, np.float32) if not isinstance(c, Tensor) else c)
        if c.dim() != 2 or c.shape[1] != self.width:
            raise EncoderError(f"rows: conditions must be (n, {self.width}), got shape {tuple(c.shape)}")
        with torch.no_grad():
            z = torch.cat([self.net.head(c[i:i + BATCH].to(self.device, torch.float32)).cpu()
                           for i in range(0, len(c), BATCH)]) if len(c) else torch.zeros(0, self.field.layout.size)
        return self.standardizer.inverse(z)

    def encode(self, clouds: np.ndarray | Tensor) -> Tensor:
        """Clouds (n, S, 3) -> rows (n, P): `rows(conditions(clouds))`."""
        return self.rows(self.conditions(clouds))


def from_folder(folder: str, field: Field, device: str | torch.device = "cpu") -> PointCloudEncoder:
    """The encoder of a checkpoint or artifact folder, for rows of `field` (checked against its layout)."""
    try:
        state, info = load_checkpoint(folder, "run `raywsl train-encoder` with this config first")
    except FileNotFoundError as e:
        raise EncoderError(str(e)) from None
    if Layout.from_json(info["layout"]) != field.layout:
        raise EncoderError(f"{folder}: the encoder was trained for another row layout than the {field.type_name} "
                           f"field's ({field.layout.size} parameters)")
    net = make_encoder(info["arch"], int(info["width"]), field.layout.size)
    net.load_state_dict(state["model"])
    device = torch.device(device)
    net = net.to(device).eval().requires_grad_(False)
    return PointCloudEncoder(net, Standardizer.from_state(state["standardizer"]), field, info, device)


def load_encoder(cfg: Config, plan: C.Plan, device: str | torch.device = "cpu") -> PointCloudEncoder:
    """The published encoder of the plan's train-encoder stage (`plan_for(cfg, encoder=True)`), with the
    field of the plan's weight store. EncoderError when the plan has no such stage or it is not trained."""
    if "train-encoder" not in plan:
        raise EncoderError("this plan has no train-encoder stage: make it with raywsl.stages.plan_for(cfg, "
                           "encoder=True)")
    art = plan["train-encoder"]
    if not cache.is_complete(art.path):
        raise EncoderError(f"no trained encoder for this config ({art.path}): run `raywsl train-encoder` with this "
                           f"config first")
    return from_folder(art.path, field_of(open_weights(plan.weights)), device)


def r_squared(pred: Tensor, target: Tensor) -> float:
    """1 - SSE / SST over every entry of (n, P) standardised rows, SST around each parameter's mean (the
    share of the rows' variance the prediction explains; 1 is exact, 0 is as good as the mean row)."""
    sst = float((target - target.mean(0)).square().sum())
    return 1.0 - float((pred - target).square().sum()) / sst if sst > 0 else math.nan
