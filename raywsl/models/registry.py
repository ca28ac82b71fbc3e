"""Config checks that need the registries (field types and presets, tokenizers, denoiser sizes, SDF
backends): config.py sits below them and checks everything else. The CLI runs both before any work.
"""

from __future__ import annotations

from typing import Any

from raywsl.config import Config, _require
from raywsl.geometry.sdf import SDF_BACKENDS
from raywsl.models.dit import MODELS
from raywsl.models.fields import FIELDS
from raywsl.models.tokenizers import TOKENIZERS


def check_config(cfg: Config) -> Config:
    """Raise ConfigError naming the key, the value and what is allowed; return cfg."""
    _require("ingest.backend", cfg.ingest.backend in SDF_BACKENDS, cfg.ingest.backend, f"one of {sorted(SDF_BACKENDS)}")
    _require("field.type", cfg.field.type in FIELDS, cfg.field.type, f"one of {sorted(FIELDS)}")
    presets = FIELDS[cfg.field.type].PRESETS
    _require("field.preset", cfg.field.preset in presets, cfg.field.preset,
             f"for field.type {cfg.field.type}: one of {sorted(presets)}")
    _require("diffusion.tokenizer", cfg.diffusion.tokenizer in TOKENIZERS, cfg.diffusion.tokenizer,
             f"one of {sorted(TOKENIZERS)}")
    _require("diffusion.model", cfg.diffusion.model in MODELS, cfg.diffusion.model, f"one of {sorted(MODELS)}")
    return cfg


def base_model(cfg: Any) -> str | None:
    """The trained base network cfg.field.type is fitted on (models/bases.py), or None."""
    return FIELDS[cfg.field.type].base_model
