"""The networks trained across shapes as auto-decoders, by name, and their checkpoints.

    BASES["modulated"]  the LoRA paper's modulated base field (LoRA / mLoRA fields adapt it)
    BASES["deepsdf"]    the DeepSDF decoder (deepsdf_latent fields are its latents)

Every base has `from_preset(name)`, `config` (its constructor arguments), `decode(x, z)` and a
`default_loss`. A field type names the base it needs (`Field.base_model`); `raywsl train-base`
trains that one: the train-base stage's artifact (checkpoints/base_final in a run folder).
"""

from __future__ import annotations

from torch import Tensor, nn

from raywsl.models.deepsdf import DeepSDFDecoder
from raywsl.models.modulated import ModulatedField
from raywsl import cache
from raywsl import contract as C
from raywsl.contract import SHAPE_IDS
from raywsl.runtime import load_checkpoint

BASES: dict[str, type[nn.Module]] = {cls.model_name: cls for cls in (ModulatedField, DeepSDFDecoder)}


class BaseError(ValueError):
    """No trained base where one is needed, or the wrong kind of base."""


def make_base(model: str, preset: str) -> nn.Module:
    if model not in BASES:
        raise BaseError(f"unknown base model {model!r}; known: {sorted(BASES)}")
    if preset not in BASES[model].PRESETS:
        raise BaseError(f"base.preset {preset!r} is not a preset of the {model} base; "
                        f"known: {sorted(BASES[model].PRESETS)}")
    return BASES[model].from_preset(preset)


def load_trained(folder: str, model: str) -> tuple[nn.Module, Tensor, list[str] | None]:
    """The EMA network of a `raywsl train-base` checkpoint folder, its trained latents (N, d_z) and
    the shape id of each latent (None when the checkpoint does not say)."""
    try:
        state, info = load_checkpoint(folder)
    except FileNotFoundError:
        raise BaseError(f"no trained {model} base at {folder}: run `raywsl train-base` with this run.dir "
                        f"and field.type first, or set field.base to a checkpoint folder") from None
    found = info.get("model", "modulated")  # checkpoints before the registry were all modulated
    if found != model:
        raise BaseError(f"{folder} holds a {found} base; this field type needs a {model} base")
    net = BASES[model](**info["net"])
    net.load_state_dict(state["ema"])
    ids = cache.read_json(C.join(folder, SHAPE_IDS))
    return net, state["latents"], ids
