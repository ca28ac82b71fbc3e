"""Typed configs: dataclasses whose defaults are the laptop setup, loaded from YAML with dotted
command-line overrides, validated before any work starts.

    cfg = load_config("configs/quickstart.yaml", ["ingest.points=4096", "run.name=try"])

Every field carries its help text and constraints in `metadata`, so `raywsl <verb> --help` can list
every key with its default. Fields marked `fp=False` (where to run, how to show progress) do not
decide a stage's output and are left out of its fingerprint (raywsl/contract.py says which stage
reads which keys). Checks that need a registry of a layer above (field types, tokenizers, SDF
backends) live with the registries: `raywsl.models.registry.check_config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raywsl.contract import default_cache_dir

# Ingest's query-point defaults (DeepSDF's; see geometry/sampling.py): near-surface noise std (fine,
# coarse) and the mix of near fine, near coarse and uniform points.
DEFAULT_NEAR_SIGMAS: tuple[float, float] = (math.sqrt(0.0005), math.sqrt(0.005))
DEFAULT_MIX: tuple[float, float, float] = (0.25, 0.25, 0.5)
SET_DISTANCES = ("cd", "emd")
CORPUS_SCHEME = "corpus:"  # data.source "corpus:32": the built-in procedural generator

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config key, value or file is wrong; the message names it and what is allowed."""


def opt(default: Any, help: str, *, fp: bool = True, choices: typing.Sequence[Any] | None = None,
        min: float | None = None, max: float | None = None) -> Any:
    """A config field with its help text and constraints."""
    meta = {"help": help, "fp": fp, "choices": choices, "min": min, "max": max}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------
# Sections. Defaults are the laptop setup; configs/*.yaml override them.
# --------------------------------------------------------------------------------------------

@dataclass
class RunConfig:
    name: str = opt("default", "run name; the run folder is runs/<name> unless run.dir is set", fp=False)
    dir: str = opt("", "run folder (local path or fsspec URL); empty means runs/<run.name>", fp=False)


@dataclass
class DataConfig:
    source: str = opt("", "meshes to ingest: a folder, a glob, or a manifest (.csv/.jsonl with a "
                          "'path' column and optional 'id', 'category'); local path or fsspec URL; "
                          "corpus:N for N shapes of the built-in procedural generator, corpus:N:cat1,cat2 for "
                          "N shapes of the named categories only (e.g. corpus:40:bracket; the opt-in bracket "
                          "category is generated only when named)")
    shapes: int = opt(0, "training shapes this run uses: the first N of the source's fixed training order "
                         "(nested: N=20 is part of N=50; store/split.py); 0: all of them. The held-out "
                         "reference shapes do not depend on it", min=0)


@dataclass
class IngestConfig:
    points: int = opt(200_000, "SDF query points per shape", min=1)
    surface_points: int = opt(16_384, "surface points (with normals) per shape, for evaluation", min=1)
    backend: str = opt("igl", "SDF backend: igl (exact distance + winding-number sign) or "
                              "mesh_to_sdf (slow reference)")
    near_sigmas: list[float] = opt(list(DEFAULT_NEAR_SIGMAS), "std of the Gaussian noise of the fine "
                                   "and coarse near-surface samples (DeepSDF's; see geometry/sampling.py)")
    mix: list[float] = opt(list(DEFAULT_MIX), "fractions of query points: near fine, near coarse, "
                                              "uniform in the cube [-1,1]^3 (sum to 1)")
    margin: float = opt(0.03, "normalised mesh fits in a sphere of radius 1/(1+margin)", min=0.0)
    max_faces: int = opt(2_000_000, "meshes with more faces fail with a clear reason", min=1)
    max_file_mb: float = opt(1024.0, "mesh files larger than this (MB, 10^6 bytes) fail with a clear reason, "
                                     "unread; 0: no limit", min=0.0)
    shard_size: int = opt(8, "shapes per Zarr shard: the unit of work, of writing and of resume", min=1)
    memory_gb: float = opt(2.0, "memory reserved per ingest task (Ray's `memory` resource): the scheduler "
                                "packs no more tasks on a node than its memory holds; a mesh that is "
                                "killed for memory even alone fails with that reason", min=0.0, fp=False)
    test_fraction: float = opt(0.2, "share of shapes held out as the reference set of generation metrics: a "
                                    "shape is held out when a hash of (seed, shape id) says so (store/split.py), "
                                    "fixed by the source at ingest time (recorded in samples.zarr); held-out "
                                    "shapes are ingested, never fitted", min=0.0, max=0.9)

    @property
    def max_bytes(self) -> int:
        """max_file_mb in bytes (0: no limit), as data/meshes.py `load_mesh` takes it."""
        return int(self.max_file_mb * 1e6)


@dataclass
class FieldConfig:
    type: str = opt("mlp", "field type: mlp, fourier, lora, mlora, deepsdf_latent (see raywsl/models/fields.py, "
                           "models/lora.py, models/deepsdf_latent.py)")
    preset: str = opt("decoder54k", "size preset of the field type (mlp: decoder54k, hyperdiffusion, small, tiny; "
                                    "fourier: shapenet, small, tiny; lora, mlora, deepsdf_latent: default)")
    asym: bool = opt(False, "asymmetric masks: freeze ceil(sqrt(d_out)) entries per row of each trained matrix "
                            "(mlp / fourier: hidden layers; lora / mlora: the factors a_i, b_i) at positions "
                            "shared by all shapes (breaks permutation symmetry; see models/fields.py)")
    kappa: float = opt(6.0, "variance of the frozen entries relative to the trainable entries' init (the LoRA "
                            "paper's 6); mlora freezes them to zero", min=0.0)
    mask_seed: int = opt(0, "seed of the asymmetric masks' positions and values")
    rank: int | list[int] = opt(4, "lora / mlora: adapter rank of every synthesis layer, or a list with one "
                                   "rank per layer (e.g. [8,4,4,2])")
    base: str = opt("", "lora / mlora / deepsdf_latent: a trained base (a `raywsl train-base` checkpoint "
                        "folder) to use; empty: the one train-base makes for this config (trained by `raywsl "
                        "fit` if missing)", fp=False)


@dataclass
class FitConfig:
    # Defaults are sized for a laptop CPU; the papers fit 10,000 steps of 8,192 points at lr 1e-2 -> 1e-5.
    samples: str = opt("store", "where the SDF samples come from: store (samples.zarr from `raywsl ingest`) or "
                                "stream (data.source sampled inside the fit job, never stored)",
                       choices=["store", "stream"], fp=False)
    init: str = opt("shared", "initialisation: warm (every shape starts from one fitted anchor shape), "
                              "shared (one seeded random init), random (a seeded init per shape), trained "
                              "(deepsdf_latent: a shape the decoder was trained on starts from its trained "
                              "latent, others from the shared init)",
                    choices=["warm", "shared", "random", "trained"])
    warm_shape: str = opt("", "shape id of the warm-start anchor; empty: the first shape ingested")
    steps: int = opt(2000, "Adam steps per shape (fewer when it stops early)", min=1)
    batch_size: int = opt(16, "shapes fitted at once per actor (B)", min=1)
    points_per_step: int = opt(4096, "SDF samples per shape per step", min=1)
    lr: float = opt(1e-2, "initial learning rate", min=0.0)
    lr_end: float = opt(1e-5, "final learning rate of the exp / cosine schedules", min=0.0)
    schedule: str = opt("exp", "learning-rate schedule per shape: exp (lr -> lr_end geometrically), "
                               "cosine, constant, plateau (x0.1 when the loss stops improving)",
                        choices=["exp", "cosine", "constant", "plateau"])
    loss: str = opt("l1", "l1, clamped_l1 (DeepSDF's, with fit.clamp), mse on the SDF; bce on occupancy "
                          "(inside = 1; the field outputs logits)", choices=["l1", "clamped_l1", "mse", "bce"])
    clamp: float = opt(0.1, "delta of clamped_l1", min=0.0)
    target_loss: float = opt(0.0, "stop a shape once its loss is at or below this (0: never)", min=0.0)
    patience: int = opt(0, "stop a shape (or, with schedule plateau, lower its lr) after this many steps "
                           "without a 1% improvement (0: never)", min=0)
    check_every: int = opt(50, "steps between per-shape checks (stop, divergence, slot refill)", min=1)
    max_restarts: int = opt(2, "restarts of a diverging shape (each at lr x lr_backoff) before it fails", min=0)
    lr_backoff: float = opt(0.1, "learning-rate factor of each restart", min=0.0, max=1.0)
    shard_size: int = opt(64, "shapes per weight-store shard: the unit of work, writing and resume", min=1)
    actors: int = opt(1, "fitting actors (each with fit.gpus_per_actor GPUs when scaling.use_gpu)", min=1, fp=False)
    gpus_per_actor: float = opt(1.0, "GPUs each fitting actor (and each fitting task: the warm-start anchor, crash "
                                     "probes, stability's variants) asks Ray for when scaling.use_gpu: a fraction "
                                     "in (0, 1] packs several actors on one GPU (0.25: four), else a whole number",
                                fp=False)
    device: str = opt("auto", "torch device of fitting (and of sample / recon): auto (cuda when the process doing "
                              "the work has a GPU), cpu, cuda (needs scaling.use_gpu)", fp=False)
    precision: str = opt("fp32", "fp32; tf32 (fp32 weights, TF32 matmuls) or bf16 autocast on a GPU (fp32 on CPU)",
                         choices=["fp32", "tf32", "bf16"])
    cpus_per_actor: int = opt(1, "CPUs (and torch threads) of each fitting actor", min=1, fp=False)
    kernel: str = opt("torch", "the batched step's gradient: torch (autograd over batched matmuls, any field type) "
                               "or triton (raywsl/kernels/mlp.py, one fused forward-backward kernel; mlp fields "
                               "without asym, on a GPU). The same step to float rounding, so not fingerprinted",
                      choices=["torch", "triton"], fp=False)
    compile: bool = opt(False, "torch.compile the training step (one graph; costs ~10-60 s of compiling "
                               "per actor, pays off on long fits and on GPUs)", fp=False)
    recon_count: int = opt(8, "fitted shapes decoded to meshes in recon/ and compared with the truth", min=0,
                           fp=False)
    recon_resolution: int = opt(128, "grid resolution of the reconstructions", min=8, fp=False)


@dataclass
class BaseConfig:
    # The paper trains 350k steps (lr 1e-3 -> 1e-5, lambda_r 1e-4, EMA) with staged batches; defaults are CPU-sized.
    preset: str = opt("small", "preset of the base network field.type needs (the modulated base field for lora / "
                               "mlora, the DeepSDF decoder for deepsdf_latent): shapenet (the papers'), small, tiny",
                      choices=["shapenet", "small", "tiny"])
    shapes: int = opt(0, "training shapes the base is trained on: the first N of the source's training order "
                         "(0: the run's data.shapes); pin it to share one base across runs of several sizes", min=0)
    steps: int = opt(2000, "training steps", min=1)
    lr: float = opt(1e-3, "network learning rate (decays geometrically to base.lr_end)", min=0.0)
    latent_lr: float = opt(1e-3, "latent codes' learning rate", min=0.0)
    lr_end: float = opt(1e-5, "final learning rate", min=0.0)
    latent_reg: float = opt(1e-4, "lambda_r: weight of |z|^2 in the loss", min=0.0)
    latent_std: float = opt(0.01, "std of the initial latent codes", min=0.0)
    ema: float = opt(0.999, "decay of the exponential moving average of the network", min=0.0, max=1.0)
    grad_clip: float = opt(1.0, "clip the gradient (network and latents together) to this global L2 norm before "
                                "each update (0: no clipping); the norm before clipping is logged as grad_norm",
                           min=0.0)
    max_bad_steps: int = opt(10, "a step whose loss or gradient is NaN / inf is skipped (no update, counted in "
                                 "skipped_steps); this many in a row abort train-base with an error", min=1, fp=False)
    loss: str = opt("auto", "reconstruction loss: l1, clamped_l1 (delta fit.clamp), mse; auto: the base's own "
                            "(l1 for the modulated base, clamped_l1 for DeepSDF)",
                    choices=["auto", "l1", "clamped_l1", "mse"])
    stages: list[list[float]] = opt([[0.5, 16, 1024], [0.3, 8, 4096], [0.2, 4, 8192]],
                                    "staged schedule: [fraction of steps, shapes per step, points per shape], "
                                    "many shapes x few points first")
    checkpoint_every: int = opt(200, "steps between checkpoints (reported to Ray Train)", min=1, fp=False)
    workers: int = opt(2, "Ray Train workers of train-base (DDP; gloo on CPU; nccl and one GPU each with "
                          "scaling.use_gpu)", min=1, fp=False)
    cache_gb: float = opt(2.0, "a worker keeps its shard of samples in memory up to this size (else it "
                               "streams them epoch after epoch)", min=0.0, fp=False)


@dataclass
class EncoderConfig:
    # `raywsl train-encoder` (raywsl/encoder/): surface point cloud -> condition c -> the fitted row. Defaults train
    # in about a minute on the quickstart's 32 shapes on a laptop CPU.
    arch: str = opt("pointnet", "point-cloud encoder (raywsl/models/pointnet.py ENCODERS): pointnet (a shared "
                                "per-point MLP 3 -> 64 -> 128 -> width, max over the points)", choices=["pointnet"])
    width: int = opt(256, "size C of the condition c the encoder maps a cloud to (the head maps c to a row)", min=1)
    points: int = opt(512, "surface points per shape per step, a fresh random subset each step (and the size of "
                           "the clouds the reconstruction figures encode)", min=1)
    uneven: float = opt(0.5, "share of the shapes of each step whose subset is drawn unevenly (denser towards a "
                             "random direction), so the encoder sees uneven samplings too", min=0.0, max=1.0)
    steps: int = opt(800, "optimiser steps", min=1)
    batch_size: int = opt(16, "shapes per step (over all workers)", min=1)
    lr: float = opt(1e-3, "Adam learning rate (cosine decay to 0 over the steps)", min=0.0)
    grad_clip: float = opt(1.0, "clip the gradient to this global L2 norm before each update (0: no clipping)",
                           min=0.0)
    seed: int = opt(0, "seed of the encoder's init, subsets and batches, with `seed` (0: `seed` alone)", min=0)
    eval_count: int = opt(8, "held-out shapes (and as many training shapes) encoded, decoded and compared with "
                             "their surface points in the artifact's figures", min=1)
    resolution: int = opt(64, "marching-cubes grid of those decodes", min=8)
    workers: int = opt(1, "Ray Train workers of train-encoder (DDP; gloo on CPU; nccl and one GPU each with "
                          "scaling.use_gpu), each with scaling.cpus_per_worker CPUs", min=1, fp=False)
    max_bad_steps: int = opt(10, "a step whose loss or gradient is NaN / inf is skipped (no update, counted in "
                                 "skipped_steps); this many in a row abort train-encoder with an error", min=1,
                             fp=False)
    checkpoint_every: int = opt(200, "steps between checkpoints (reported to Ray Train)", min=1, fp=False)
    log_every: int = opt(20, "steps between logged losses", min=1, fp=False)


@dataclass
class DiffusionConfig:
    tokenizer: str = opt("layer", "weight row -> tokens: layer (one token per layer, long layers chunked; "
                                  "HyperDiffusion), chunk (equal chunks), lora_hier (the LoRA paper's "
                                  "hierarchical rank-pair encoder), latent (DeepSDF latents)")
    token_size: int = opt(0, "values per token of layer / chunk / latent (0: the tokenizer's default)", min=0)
    model: str = opt("tiny", "denoiser size (raywsl/models/dit.py MODELS): tiny (CPU), small, base, "
                             "hyperdiffusion (the papers': hidden 2880, 12 layers, 16 heads), latent (the small-data "
                             "study's latent DiT: 384, 4 layers, 6 heads)")
    prediction: str = opt("eps", "what the denoiser predicts: eps (noise; the papers'), x0, v",
                          choices=["eps", "x0", "v"])
    schedule: str = opt("linear", "beta schedule: linear (1e-4 -> 2e-2, the papers'), cosine",
                        choices=["linear", "cosine"])
    timesteps: int = opt(500, "diffusion steps T", min=2)
    standardize: bool = opt(True, "standardise every parameter by its mean / std over the training rows "
                                  "(saved with the model)")
    seed: int = opt(0, "seed of the denoiser's init, batches, noise and sampling, with `seed` (a sweep's seeds: "
                       "one data split and one set of fits, several diffusion runs)")


@dataclass
class TrainConfig:
    steps: int = opt(2000, "denoiser optimiser steps", min=1)
    batch_size: int = opt(64, "rows per step (over all workers)", min=1)
    lr: float = opt(2e-4, "AdamW learning rate", min=0.0)
    weight_decay: float = opt(0.0, "AdamW weight decay", min=0.0)
    ema: float = opt(0.9999, "decay of the denoiser's exponential moving average (with warm-up)", min=0.0, max=1.0)
    grad_clip: float = opt(1.0, "clip the denoiser's gradient to this global L2 norm before each update (0: no "
                                "clipping); the norm before clipping is logged as grad_norm", min=0.0)
    max_bad_steps: int = opt(10, "a step whose loss or gradient is NaN / inf is skipped (no update, counted in "
                                 "skipped_steps); this many in a row abort train with an error", min=1, fp=False)
    checkpoint_every: int = opt(500, "steps between checkpoints (reported to Ray Train)", min=1, fp=False)
    log_every: int = opt(50, "steps between logged losses (and per-timestep-bucket losses)", min=1, fp=False)


@dataclass
class SampleConfig:
    count: int = opt(16, "weight rows to sample and decode to meshes", min=1)
    sampler: str = opt("ddim", "ddim or ancestral (all T steps)", choices=["ddim", "ancestral"])
    steps: int = opt(100, "DDIM steps", min=1)
    eta: float = opt(0.0, "DDIM eta (0: deterministic)", min=0.0)
    resolution: int = opt(64, "marching-cubes grid of the generated meshes", min=8)
    ema: bool = opt(True, "sample with the EMA denoiser")


@dataclass
class ScalingConfig:
    num_workers: int = opt(1, "Ray Train workers of `raywsl train` (DDP; gloo on CPU; nccl and one GPU each with "
                              "scaling.use_gpu)", min=1, fp=False)
    cpus_per_worker: int = opt(1, "CPUs (and torch threads) of each Ray Train worker of `raywsl train` and "
                                  "`raywsl train-encoder`", min=1, fp=False)
    use_gpu: bool = opt(False, "the run's GPU switch, asked of Ray from the config (never from the cluster's state, "
                               "so an autoscaler can add GPU nodes): each fitting actor fit.gpus_per_actor GPUs, each "
                               "Ray Train worker (train-base, train) one, and sample / recon / eval run as one Ray "
                               "task with one GPU (the driver can be a CPU head); work waits for GPUs, never falls "
                               "back to CPUs. false: no GPU asked anywhere, sample / recon / eval run in the driver",
                        fp=False)
    cpus_per_task: int = opt(2, "CPUs of the one Ray task that runs sample, recon or eval when scaling.use_gpu",
                             min=1, fp=False)


@dataclass
class EvalConfig:
    generated: str = opt("", "meshes to evaluate (folder, glob or manifest); empty: <run.dir>/generated")
    reference: str = opt("", "reference meshes (folder, glob or manifest) for MMD / COV / 1-NNA")
    training: str = opt("", "training meshes for novelty and memorisation (optional)")
    points: int = opt(2048, "surface points per shape for Chamfer / EMD (area-weighted, seeded)", min=16)
    distances: list[str] = opt(["cd", "emd"], "set-metric distances: cd (Chamfer), emd (Earth mover's)")
    emd_eps: float = opt(1e-3, "EMD auction accuracy: exact <= approx <= exact + emd_eps (smaller is "
                               "slower); 0 computes the exact assignment (slow)", min=0.0)
    normalise: bool = opt(True, "normalise every mesh into the unit sphere (as ingest does) first")
    memorisation_threshold: float = opt(0.0, "a generated shape closer than this (Chamfer) to a training "
                                             "shape counts as memorised; 0 calibrates it: the 95th percentile "
                                             "of CD between two samplings of each training shape", min=0.0)
    render: int = opt(16, "meshes of each set rendered into PNG grids", min=0)
    device: str = opt("auto", "torch device for distance matrices: auto (cuda when the process doing the work has "
                              "a GPU), cpu, cuda (needs scaling.use_gpu)", fp=False)


@dataclass
class MlflowConfig:
    enabled: bool = opt(True, "record the run folder in one MLflow run (params, metrics, figures)", fp=False)
    tracking_uri: str = opt("", "MLflow store; empty: sqlite next to the run folders (runs/mlflow.db)", fp=False)
    experiment: str = opt("raywsl", "MLflow experiment name", fp=False)
    parent_run: str = opt("", "id of the MLflow run this run is a child of (a sweep's parent run; set by "
                              "`raywsl sweep`)", fp=False)


@dataclass
class CacheConfig:
    dir: str = opt("", "the artifact cache that runs and sweep trials share (local folder or fsspec URL); "
                       "empty: 'cache' beside the run folders (runs/cache)", fp=False)


@dataclass
class RayConfig:
    address: str = opt("", "Ray cluster address; empty uses $RAY_ADDRESS or starts a local Ray", fp=False)
    num_cpus: int = opt(0, "logical CPUs of the local Ray; 0 picks 2x the cores (see runtime.py)",
                        fp=False, min=0)


@dataclass
class Config:
    seed: int = opt(0, "seed of every random choice (sampling is seeded per shape from it)")
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    ingest: IngestConfig = dataclasses.field(default_factory=IngestConfig)
    field: FieldConfig = dataclasses.field(default_factory=FieldConfig)
    fit: FitConfig = dataclasses.field(default_factory=FitConfig)
    base: BaseConfig = dataclasses.field(default_factory=BaseConfig)
    encoder: EncoderConfig = dataclasses.field(default_factory=EncoderConfig)
    diffusion: DiffusionConfig = dataclasses.field(default_factory=DiffusionConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    scaling: ScalingConfig = dataclasses.field(default_factory=ScalingConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    cache: CacheConfig = dataclasses.field(default_factory=CacheConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    mlflow: MlflowConfig = dataclasses.field(default_factory=MlflowConfig)

    def validate(self) -> "Config":
        """Checks this module can make alone; registry names: raywsl.models.registry.check_config."""
        _check_fields(self)
        _require("ingest.near_sigmas", len(self.ingest.near_sigmas) == 2
                 and all(s > 0 for s in self.ingest.near_sigmas), self.ingest.near_sigmas,
                 "two positive numbers [fine, coarse]")
        mix = self.ingest.mix
        _require("ingest.mix", len(mix) == 3 and all(f >= 0 for f in mix) and abs(sum(mix) - 1) < 1e-6,
                 mix, "three non-negative fractions [near_fine, near_coarse, uniform] summing to 1")
        rank = self.field.rank
        _require("field.rank", (rank if isinstance(rank, int) else min(rank, default=0)) >= 1, rank,
                 "a positive integer, or a non-empty list of positive integers (one per layer)")
        _require("fit.init", self.fit.init != "trained" or self.field.type == "deepsdf_latent", self.fit.init,
                 f"warm, shared or random for field.type {self.field.type} (trained: deepsdf_latent only)")
        _require("base.stages", self.base.stages and all(len(st) == 3 and st[0] > 0 and st[1] >= 1 and st[2] >= 1
                                                         for st in self.base.stages),
                 self.base.stages, "a non-empty list of [fraction > 0, shapes >= 1, points >= 1]")
        bad = sorted(set(self.eval.distances) - set(SET_DISTANCES))
        _require("eval.distances", self.eval.distances and not bad, self.eval.distances,
                 f"a non-empty list from {list(SET_DISTANCES)}")
        g = self.fit.gpus_per_actor
        _require("fit.gpus_per_actor", g > 0 and (g <= 1 or g == int(g)), g,
                 "a fraction in (0, 1] (several actors share a GPU) or a whole number of GPUs")
        for key, device in (("fit.device", self.fit.device), ("eval.device", self.eval.device)):
            if device.startswith("cuda") and not self.scaling.use_gpu:
                raise ConfigError(f"config key '{key}' is {device!r} but scaling.use_gpu is false, so no GPU is asked "
                                  f"of Ray: set scaling.use_gpu=true (GPUs for the fitting actors, the Ray Train "
                                  f"workers and the sample / recon / eval task), or {key}=auto")
        _require("fit.kernel", self.fit.kernel != "triton" or (self.field.type == "mlp" and not self.field.asym),
                 self.fit.kernel, f"torch for field.type {self.field.type}{' with field.asym' * self.field.asym} "
                 "(the fused kernel computes mlp fields without asymmetric masks)")
        # The fused kernel runs on a GPU; on a CPU only in Triton's interpreter (the tests' correctness checks).
        _require("fit.kernel", self.fit.kernel != "triton" or self.scaling.use_gpu
                 or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), self.fit.kernel,
                 "torch without a GPU: set scaling.use_gpu=true for the fused kernel")
        source = self.data.source
        if source.startswith(CORPUS_SCHEME):
            n, sep, categories = source[len(CORPUS_SCHEME):].partition(":")
            names = categories.split(",")
            _require("data.source", n.isdigit() and int(n) >= 1 and (not sep or all(c.strip() for c in names)),
                     source, "corpus:N (N a positive number of shapes) or corpus:N:cat1,cat2 (only those corpus "
                     "categories) for the built-in generator, or meshes")
        return self

    @property
    def fit_gpus(self) -> float:
        """GPUs each fitting actor and each fitting task (warm-start anchor, crash probes, stability's
        variants) asks Ray for: from the config alone, never from the cluster's state at launch (a
        cluster whose GPU nodes autoscale from 0 has none then)."""
        return self.fit.gpus_per_actor if self.scaling.use_gpu and self.fit.device != "cpu" else 0.0

    @property
    def run_dir(self) -> str:
        return self.run.dir or f"runs/{self.run.name}"

    @property
    def cache_dir(self) -> str:
        return self.cache.dir or default_cache_dir(self.run_dir)

    @property
    def corpus_size(self) -> int | None:
        """N of data.source "corpus:N" or "corpus:N:cat1,cat2" (the built-in generator), else None."""
        source = self.data.source
        return int(source[len(CORPUS_SCHEME):].split(":")[0]) if source.startswith(CORPUS_SCHEME) else None

    @property
    def corpus_categories(self) -> list[str] | None:
        """The categories of data.source "corpus:N:cat1,cat2"; None for "corpus:N" (the generator's default
        selection) and for meshes. Names are checked against the generator's when the run is planned."""
        source = self.data.source
        if not source.startswith(CORPUS_SCHEME):
            return None
        _, sep, categories = source[len(CORPUS_SCHEME):].partition(":")
        return [c.strip() for c in categories.split(",")] if sep else None

    @property
    def ingest_shapes(self) -> int:
        """Training shapes ingest must cover for this run (0: all): data.shapes, or base.shapes if larger."""
        return max(self.data.shapes, self.base.shapes) if self.data.shapes else 0

    @property
    def base_shapes(self) -> int:
        """Training shapes the base is trained on (0: all of the source's)."""
        return self.base.shapes or self.data.shapes


# --------------------------------------------------------------------------------------------
# Loading, overrides, validation
# --------------------------------------------------------------------------------------------

# Keys that moved: {old dotted key: new one}. Files and overrides that name the old key still load.
MOVED_KEYS = {"base.use_gpu": "scaling.use_gpu"}  # one GPU switch for the whole run, train-base included


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- `key.sub=value` overrides (values parsed as YAML), then validated."""
    raw = _move_keys(read_yaml_mapping(path), str(path)) if path else {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        node = raw
        *parents, leaf = MOVED_KEYS.get(key.strip(), key.strip()).split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{p}' is not a section")
        node[leaf] = yaml.safe_load(value) if value.strip() else ""
    return build(Config, raw).validate()


def _move_keys(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """A file's mapping with the keys of MOVED_KEYS under their new names. When a file names both (a
    config.yaml saved before the move lists every key), the new key decides."""
    for old, new in MOVED_KEYS.items():
        (section, leaf), (new_section, new_leaf) = old.split("."), new.split(".")
        node = raw.get(section)
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node.pop(leaf)
        target = raw.setdefault(new_section, {})
        if not isinstance(target, dict):
            continue  # build() names the bad section
        if new_leaf in target:
            if target[new_leaf] != value:
                log.warning("%s: '%s: %r' is ignored: '%s' (%r) now decides for the whole run", where, old, value,
                            new, target[new_leaf])
        else:
            log.info("%s: '%s' is now '%s'", where, old, new)
            target[new_leaf] = value
    return raw


def read_yaml_mapping(path: str | Path, what: str = "config file",
                      error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """The mapping a YAML file holds; `error` names `what` and the file when it is missing, is not
    YAML or holds something else than a mapping."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} '{path}' does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise error(f"{what} '{path}' is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise error(f"{what} '{path}' must hold a mapping of keys, got {type(raw).__name__}")
    return raw


def build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a plain mapping: unknown keys and wrong types are errors."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.')}' must be a section (mapping), got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}; "
                              f"allowed here: {', '.join(fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(f"{prefix}{key}", value, tp)
    return cls(**kwargs)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if ok is None:
        raise TypeError(f"config type {tp} of '{key}' is not supported")
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e4 (no dot, no sign) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not ok:
        raise ConfigError(f"config key '{key}': expected {tp.__name__}, got {value!r} "
                          f"({type(value).__name__})")
    return float(value) if tp is float else value


def _check_fields(obj: Any, prefix: str = "") -> None:
    """Range and choice constraints declared in each field's metadata."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_fields(value, key + ".")
            continue
        m = f.metadata
        if m.get("choices") is not None:
            _require(key, value in m["choices"], value, f"one of {list(m['choices'])}")
        if m.get("min") is not None:
            _require(key, value >= m["min"], value, f">= {m['min']}")
        if m.get("max") is not None:
            _require(key, value <= m["max"], value, f"<= {m['max']}")


def _require(key: str, ok: bool, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': bad value {value!r}; allowed: {allowed}")


# --------------------------------------------------------------------------------------------
# Saving, help, fingerprints
# --------------------------------------------------------------------------------------------

def to_dict(obj: Any, fingerprint_only: bool = False) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = to_dict(value, fingerprint_only)
        elif f.metadata.get("fp", True) or not fingerprint_only:
            out[f.name] = value
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(key, default, help) for every field, for `--help`."""
    rows = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, f"{prefix}{f.name}.")
        else:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            rows.append((f"{prefix}{f.name}", default, f.metadata.get("help", "")))
    return rows
