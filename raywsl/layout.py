"""Every on-disk name raywsl uses lives here (as DeepSDF's ws.py does): the run folder, its stores,
and the arrays inside them. Other modules ask this one for paths instead of spelling names.

    runs/<run.name>/
      config.yaml      the resolved config of the last command
      samples.zarr     ingest: SDF query points, surface clouds, per-row status
      weights.zarr     fit: one weight row per shape
      checkpoints/     base field, DeepSDF and diffusion checkpoints (safe formats)
      recon/           meshes decoded from fitted fields
      generated/       meshes decoded from sampled weights
      eval/            evaluation clouds and figures
      stability/       the weight-space stability experiment (`raywsl stability`)
      metrics.json     every figure of the run, with its convention
      report.html      the self-contained run report
      logs/            one log file per command
      mlflow_run_id    the run folder's MLflow run (runs/mlflow.db by default)
"""

from __future__ import annotations

from dataclasses import dataclass

CONFIG = "config.yaml"
SAMPLES = "samples.zarr"
WEIGHTS = "weights.zarr"
CHECKPOINTS = "checkpoints"
RECON = "recon"
GENERATED = "generated"
EVAL = "eval"
STABILITY = "stability"
METRICS = "metrics.json"
REPORT = "report.html"
LOGS = "logs"
MLFLOW_RUN = "mlflow_run_id"  # the id of the run folder's MLflow run (see raywsl/tracking.py)

# Stores found in a run folder, by kind (the `kind` attribute of each store).
STORES = {"samples": SAMPLES, "weights": WEIGHTS}

# Arrays every row store has: one entry per row, chunked per shard.
SHAPE_ID = "shape_id"
SOURCE = "source"
CATEGORY = "category"
STATUS = "status"
REASON = "reason"
SHARD_DONE = "shard_done"  # one chunk per shard; written last, it is the shard's commit marker

# Arrays of the sample store (written by ingest).
POINTS = "points"  # (N, M, 3) float32 query points in the normalised frame
SDF = "sdf"  # (N, M) float32 signed distance, negative inside
SURFACE = "surface"  # (N, S, 3) float32 surface points
NORMALS = "normals"  # (N, S, 3) float32 unit outward normals at the surface points
CENTER = "center"  # (N, 3) normalised = (v - center) * scale
SCALE = "scale"  # (N,)

# Arrays of the weight store (written by fit).
ROW_WEIGHTS = "weights"  # (N, P) float32, one flat weight row per shape (the field's layout)
FIT_LOSS = "loss"  # (N,) float32 training loss over the last check interval
FIT_STEPS = "steps"  # (N,) int32 steps of the final attempt
FIT_RESTARTS = "restarts"  # (N,) int32 divergence restarts
# A training-state checkpoint folder (base field, DeepSDF): tensors + a JSON description.
CHECKPOINT_STATE = "state.pt"  # torch.save of tensors and numbers; load with weights_only=True
CHECKPOINT_INFO = "info.json"
SHAPE_IDS = "shape_ids.json"  # in a final base checkpoint: the shape id of each trained latent, in order
# Networks trained across shapes (`raywsl train-base`), by base model (base/models.py): Ray Train's run
# folder under checkpoints/, and <name>_final, the last state, where fitting finds it.
BASE_RUNS = {"modulated": "base", "deepsdf": "deepsdf"}
BASE_FINAL = "base_final"  # checkpoints/base_final: the modulated base LoRA fields are fitted on
DIFFUSION_RUN = "diffusion"  # checkpoints/diffusion: Ray Train's run folder of `raywsl train`
DIFFUSION_FINAL = "diffusion_final"  # checkpoints/diffusion_final: the trained denoiser `raywsl sample` uses

FROZEN = "frozen"  # group of the field's frozen shared parts (asymmetric masks: <weight>.fixed, <weight>.values)
INIT_ROW = "init"  # (P,) float32 the shared start of every shape (warm and shared init); the driver writes it


def join(root: str, *names: str) -> str:
    """Join path parts for local paths and fsspec URLs alike."""
    return "/".join([root.rstrip("/"), *names])


@dataclass(frozen=True)
class RunLayout:
    """Paths inside one run folder."""

    root: str

    config = property(lambda self: join(self.root, CONFIG))
    samples = property(lambda self: join(self.root, SAMPLES))
    weights = property(lambda self: join(self.root, WEIGHTS))
    checkpoints = property(lambda self: join(self.root, CHECKPOINTS))
    recon = property(lambda self: join(self.root, RECON))
    generated = property(lambda self: join(self.root, GENERATED))
    eval = property(lambda self: join(self.root, EVAL))
    stability = property(lambda self: join(self.root, STABILITY))
    metrics = property(lambda self: join(self.root, METRICS))
    report = property(lambda self: join(self.root, REPORT))
    logs = property(lambda self: join(self.root, LOGS))
    mlflow_run = property(lambda self: join(self.root, MLFLOW_RUN))

    def base_run(self, model: str) -> str:
        return join(self.root, CHECKPOINTS, BASE_RUNS[model])

    def base_final(self, model: str) -> str:
        return join(self.root, CHECKPOINTS, f"{BASE_RUNS[model]}_final")

    def log_file(self, verb: str) -> str:
        return join(self.root, LOGS, f"{verb}.log")
