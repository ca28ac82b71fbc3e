"""The stage contract, and every on-disk name raywsl uses (as DeepSDF's ws.py owns its names).

A stage is a function of the config keys it reads and of the artifacts it consumes; its output is
one artifact, keyed by a fingerprint of exactly those things plus the stage's format version:

    stage          reads (config keys)                              consumes          produces
    corpus         seed, data.source (corpus:N[:categories])        -                 corpus/ (meshes, manifest)
    ingest         seed, ingest.*                                   the source        samples.zarr
    train-base     seed, base.*, base.shapes, fit.clamp             ingest            checkpoints/base_final
    fit            seed, field.*, fit.*                             ingest, [base]    weights.zarr
    recon          seed, fit.recon_*, data.shapes                   fit               recon/
    train-encoder  seed, encoder.*, data.shapes                     ingest, fit       checkpoints/encoder_final
    train          seed, diffusion.*, train.*, data.shapes          fit               checkpoints/diffusion_final
    sample         seed, sample.*                                   train             generated/
    eval           seed, eval.*, data.shapes, ingest.max_faces/...  sample            eval/
    report         -                                                all of the above  report.html (the run's own)

train-encoder (the point-cloud encoder of the topology probes) is planned only when asked for
(`plan_for(cfg, encoder=True)`: `raywsl train-encoder`, the probes), never by `raywsl run`.

A section ("fit") stands for its fingerprinted keys (config fields marked fp=False, such as where to
run, are left out); a leaf ("fit.clamp") is read as it is. Artifacts live in the cache (cache.dir;
raywsl/cache.py) at <cache>/<stage>/<fingerprint>/, published atomically, and are shared by every
run or sweep trial that asks for the same fingerprint. The row stores (samples.zarr, weights.zarr)
are filled shard by shard in place: their fingerprint leaves out data.shapes, so a run with more
shapes extends the store another run started.

A run folder is a view: its own files plus links to the artifacts it used.

    runs/<run.name>/
      config.yaml      the resolved config of the last command
      stages.json      per stage: fingerprint, reused or computed, seconds, the artifact's location
      metrics.json     every figure of the run, with its convention
      report.html      the self-contained run report
      logs/            one log file per command (Ray's own output included)
      mlflow_run_id    the run folder's MLflow run (runs/mlflow.db by default)
      stability/       the weight-space stability experiment (`raywsl stability`)
      probe/           the weight-space probes of the weight store (`raywsl probe`): probe.json, probe.md;
                       phase-<space>/, subspace-<space>/ (`raywsl probe phase | subspace`: topology probes)
      corpus, samples.zarr, weights.zarr, recon, generated, eval,
      checkpoints/base_final, checkpoints/diffusion_final      links into the cache
      checkpoints/encoder_final                                (after `raywsl train-encoder`)

A sweep folder (`raywsl sweep`) holds one run folder per trial and what ties them together:

    runs/sweeps/<sweep name>/
      sweep.json       the sweep: its axes, its trials (name, params, run folder), the MLflow parent run
      trials/<trial>/  a run folder, plus trial.json (status, attempts, seconds, stage fingerprints)
      tune/            Ray Tune's experiment state (what `Tuner.restore` resumes from)
      mlflow/          the sweep's MLflow store (mlflow.db, mlartifacts/), served while the sweep runs
      report/          report.html (the phase diagram), results.csv, onset.json, figures
      logs/sweep.log   the sweep driver's log (Ray's and the trials' relayed output included)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

# ------------------------------------------------------------------------------------ run folder

CONFIG = "config.yaml"
STAGES_FILE = "stages.json"
METRICS = "metrics.json"
REPORT = "report.html"
LOGS = "logs"
MLFLOW_RUN = "mlflow_run_id"  # the id of the run folder's MLflow run (see raywsl/tracking.py)
STABILITY = "stability"
PROBE = "probe"  # `raywsl probe`: the folder, and its files
PROBE_JSON = "probe.json"
PROBE_TABLE = "probe.md"
# The topology probes (`raywsl probe phase | subspace`, raywsl/probes): probe/<probe>-<space>/ (`probe_folder`)
# with summary.json and
PROBE_SUMMARY = "summary.json"
PHASE = "phase"  # path.csv (every α of every seed), transitions.csv (per seed), phase.png
PHASE_PATH = "path.csv"
PHASE_TRANSITIONS = "transitions.csv"
PHASE_FIGURE = "phase.png"
SUBSPACE = "subspace"  # samples.csv (every decoded shape), summary.csv (per kind, m, radius), two figures
SUBSPACE_SAMPLES = "samples.csv"
SUBSPACE_TABLE = "summary.csv"
SUBSPACE_FIGURE = "subspace.png"
SUBSPACE_RENDERS = "renders.png"
CACHE = "cache"  # the default cache folder, beside the run folders (runs/cache)

SWEEPS = "sweeps"  # sweep folders, beside the run folders (runs/sweeps/<name>)
SWEEP_JSON = "sweep.json"
SWEEP_TRIALS = "trials"
SWEEP_TUNE = "tune"
SWEEP_MLFLOW = "mlflow"
SWEEP_REPORT = "report"
TRIAL_JSON = "trial.json"
# a trial's status in its trial.json (pending: no trial.json yet)
TRIAL_FINISHED, TRIAL_RUNNING, TRIAL_FAILED, TRIAL_STOPPED, TRIAL_PENDING = (
    "finished", "running", "failed", "stopped early", "pending")

# ------------------------------------------------------------------------------------ artifacts

ARTIFACT_INFO = "artifact.json"  # written last into a published artifact: a folder without it is not one
LOCK_SUFFIX = ".lock"  # <cache>/<stage>/<fingerprint>.lock: who is producing the artifact
TMP_MARK = ".tmp-"  # <cache>/<stage>/<fingerprint>.tmp-<id>: an artifact being written
WORK_SUFFIX = ".work"  # <cache>/<stage>/<fingerprint>.work: Ray Train's resumable run folder
TRAIN_RUN = "run"  # Ray Train's run name inside a .work folder
TRAIN_PROGRESS = "progress.json"  # in a .work folder: the training loop's step, for the progress bar

# Artifact contents (paths inside an artifact's folder).
CORPUS_MANIFEST = "manifest.csv"
SAMPLES = "samples.zarr"
WEIGHTS = "weights.zarr"
CHECKPOINT_STATE = "state.pt"  # torch.save of tensors and numbers; load with weights_only=True
CHECKPOINT_INFO = "info.json"
SHAPE_IDS = "shape_ids.json"  # in a trained base: the shape id of each trained latent, in order
FIT_CURVE = "fit_loss_curve.png"  # in the fit artifact: the mean loss of the shapes its last fill fitted
RECON_GRID = "recon.png"
RECON_LOSSES = "fit_loss.png"
DIFFUSION_LOSS = "diffusion_loss.png"
ENCODER_LOSS = "encoder_loss.png"  # in the train-encoder artifact: the training loss
ENCODER_RECON = "encoder_recon.png"  # in the train-encoder artifact: decoded encodings of held-out / training shapes
ROWS = "rows.npy"  # in generated/: the sampled weight rows
SAMPLES_SUMMARY = "summary.json"  # in generated/: every sampled row, with or without a surface
GENERATED_GRID = "generated.png"
REFERENCE_SET = "reference.csv"  # in eval/: manifests of the held-out and training shapes
TRAINING_SET = "training.csv"
WEIGHTS_PCA = "weights_pca.png"
WEIGHTS_SPECTRUM = "weights_spectrum.png"
STAGE_METRICS = "metrics.json"  # in recon/, eval/ and the encoder: the stage's figures (merged into metrics.json)

# ------------------------------------------------------------------------------------ row stores

# Arrays every row store has: one entry per row, chunked per shard.
SHAPE_ID = "shape_id"
SOURCE = "source"
CATEGORY = "category"
STATUS = "status"
REASON = "reason"
REJECTED = "rejected: "  # prefix of the reason of a shape refused before any work (sources.py MeshRef.problem)
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
FROZEN = "frozen"  # group of the field's frozen shared parts (asymmetric masks: <weight>.fixed, <weight>.values)
INIT_ROW = "init"  # (P,) float32 the shared start of every shape (warm and shared init); the driver writes it


class Attr:
    """Attribute keys of the row stores (zarr.json of the group)."""

    FORMAT = "format"
    KIND = "kind"  # "samples" or "weights"
    N_ROWS = "n_rows"
    SHARD_SIZE = "shard_size"
    FINGERPRINT = "fingerprint"  # written last at creation
    VERSION = "raywsl_version"
    CREATED = "created"
    SEED = "seed"
    HELD_OUT = "held_out"  # the number of held-out shapes: rows [0, held_out) (store/split.py)
    TEST_FRACTION = "test_fraction"
    DATA_SOURCE = "data_source"
    INGEST = "ingest"
    NORMALISATION = "normalisation"
    FIELD_TYPE = "field_type"
    FIELD_PRESET = "field_preset"
    FIELD_CONFIG = "field_config"
    LAYOUT = "layout"  # the ordered [name, shape] list that cuts a row into tensors
    PARAMS = "params"
    INIT = "init"
    WARM_SHAPE = "warm_shape"
    FIT = "fit"
    SAMPLES_FINGERPRINT = "samples_fingerprint"
    BASE_FINGERPRINT = "base_fingerprint"
    FROZEN_FINGERPRINT = "frozen_fingerprint"
    VERSIONS = "versions"


# ------------------------------------------------------------------------------------ stages

SOURCE_INPUT = "source"  # what ingest consumes: the meshes of data.source (the corpus, or files)


@dataclass(frozen=True)
class Stage:
    name: str
    reads: tuple[str, ...]  # config keys: a section stands for its fingerprinted keys
    consumes: tuple[str, ...]  # the stages whose artifacts it reads (SOURCE_INPUT: the meshes)
    produces: str  # its artifact's name in a run folder
    version: int  # bump when the artifact's format or its computation changes
    store: str = ""  # a row store's name inside the artifact (filled shard by shard in place); "": a
    #                  folder published whole
    cached: bool = True  # False: the output belongs to one run folder (report)


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("corpus", ("seed", "data.source"), (), "corpus", 1),
    Stage("ingest", ("seed", "ingest"), (SOURCE_INPUT,), SAMPLES, 3, store=SAMPLES),
    Stage("train-base", ("seed", "base", "base_shapes", "fit.clamp"), ("ingest",), "checkpoints/base_final", 2),
    Stage("fit", ("seed", "field", "fit"), ("ingest", "train-base"), WEIGHTS, 4, store=WEIGHTS),
    Stage("recon", ("seed", "fit.recon_count", "fit.recon_resolution", "data.shapes"), ("fit",), "recon", 3),
    Stage("train-encoder", ("seed", "encoder", "data.shapes"), ("ingest", "fit"), "checkpoints/encoder_final", 1),
    Stage("train", ("seed", "diffusion", "train", "data.shapes"), ("fit",), "checkpoints/diffusion_final", 2),
    Stage("sample", ("seed", "sample"), ("train",), "generated", 2),
    Stage("eval", ("seed", "eval", "data.shapes", "ingest.max_faces", "ingest.max_file_mb", "ingest.margin"),
          ("sample",), "eval", 4),
    Stage("report", (), ("recon", "train", "sample", "eval"), REPORT, 1, cached=False),
)}


def fingerprint(*parts: Any) -> str:
    """A stable short hash of plain data (dicts, lists, numbers, strings), order-independent in dicts."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_key(cfg: Any, key: str) -> Any:
    """The value of config key `key` ("fit", "fit.clamp", or a derived property such as "base_shapes"):
    a section as a dict of its fingerprinted fields."""
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return _fingerprinted(value) if dataclasses.is_dataclass(value) else value


def _fingerprinted(section: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = _fingerprinted(value)
        elif f.metadata.get("fp", True):
            out[f.name] = value
    return out


def stage_fingerprint(stage: str, cfg: Any, inputs: dict[str, str], **derived: Any) -> str:
    """Fingerprint of `stage` for `cfg`: its keys' values, its inputs' fingerprints ({stage: fp} of
    the stages it consumes that this config uses), values derived from the config by a layer above
    (the base model a field type needs) and its format version."""
    s = STAGES[stage]
    return fingerprint(s.name, s.version, {key: read_key(cfg, key) for key in s.reads},
                       {name: inputs[name] for name in s.consumes if name in inputs}, derived)


# ------------------------------------------------------------------------------------ paths

def join(root: str, *names: str) -> str:
    """Join path parts for local paths and fsspec URLs alike."""
    return "/".join([root.rstrip("/"), *names])


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run folder's own files."""

    root: str

    config = property(lambda self: join(self.root, CONFIG))
    stages = property(lambda self: join(self.root, STAGES_FILE))
    metrics = property(lambda self: join(self.root, METRICS))
    report = property(lambda self: join(self.root, REPORT))
    logs = property(lambda self: join(self.root, LOGS))
    mlflow_run = property(lambda self: join(self.root, MLFLOW_RUN))
    stability = property(lambda self: join(self.root, STABILITY))
    probe = property(lambda self: join(self.root, PROBE))

    def probe_folder(self, probe: str, space: str) -> str:
        """A topology probe's folder, one per probe and space (probe/phase-cloud/, probe/subspace-weights/)."""
        return join(self.root, PROBE, f"{probe}-{space}")

    def link(self, stage: str) -> str:
        """Where a stage's artifact appears in the run folder."""
        return join(self.root, STAGES[stage].produces)

    def log_file(self, verb: str) -> str:
        return join(self.root, LOGS, f"{verb}.log")


def default_cache_dir(run_dir: str) -> str:
    """The cache beside the run folders: runs/<name> -> runs/cache."""
    parent = run_dir.rstrip("/").rsplit("/", 1)[0] if "/" in run_dir.rstrip("/") else "."
    return join(parent, CACHE)


@dataclass(frozen=True)
class Artifact:
    stage: str
    fingerprint: str
    path: str  # its folder: <cache>/<stage>/<fingerprint>, or the run folder's own file for report

    def join(self, *names: str) -> str:
        return join(self.path, *names)


@dataclass(frozen=True)
class Plan:
    """The artifacts one config asks for, stage by stage (only the stages it uses: train-base only
    for field types on a trained base, corpus only for data.source corpus:N, train-encoder only when
    asked for)."""

    run: RunLayout
    cache: str
    artifacts: dict[str, Artifact]
    source: str  # the meshes to ingest: data.source, or the corpus artifact's manifest
    base_model: str | None = None  # the trained base the field type needs (None: none)

    def __getitem__(self, stage: str) -> Artifact:
        if stage not in self.artifacts:
            raise KeyError(f"this config has no {stage} stage (stages: {', '.join(self.artifacts)})")
        return self.artifacts[stage]

    def __contains__(self, stage: str) -> bool:
        return stage in self.artifacts

    @property
    def stages(self) -> list[str]:
        return list(self.artifacts)

    @property
    def samples(self) -> str:
        return self["ingest"].join(SAMPLES)

    @property
    def weights(self) -> str:
        return self["fit"].join(WEIGHTS)

    def shown(self, stage: str) -> str:
        """What the run folder's link of `stage` points at: the artifact, or the store inside it."""
        store = STAGES[stage].store
        return self[stage].join(store) if store else self[stage].path


def make_plan(cfg: Any, *, cache: str, source: str, corpus: bool, base_model: str | None,
              base: tuple[str, str] | None = None, encoder: bool = False) -> Plan:
    """Every stage's artifact for `cfg`. `source`: the fingerprint of the meshes (ignored when
    `corpus`: then the corpus stage's); `base_model`: the trained base the field type needs;
    `base`: (fingerprint, folder) of a given base (field.base) instead of the train-base stage's;
    `encoder`: plan the train-encoder stage too."""
    fps: dict[str, str] = {}
    paths: dict[str, str] = {}
    if corpus:
        fps["corpus"] = stage_fingerprint("corpus", cfg, {})
    fps[SOURCE_INPUT] = fps.get("corpus", source)
    fps["ingest"] = stage_fingerprint("ingest", cfg, fps)
    if base_model and base:
        fps["train-base"], paths["train-base"] = base
    elif base_model:
        fps["train-base"] = stage_fingerprint("train-base", cfg, fps, base_model=base_model)
    for stage in ("fit", "recon", "train", "sample", "eval"):
        fps[stage] = stage_fingerprint(stage, cfg, fps)
    if encoder:
        fps["train-encoder"] = stage_fingerprint("train-encoder", cfg, fps)
    artifacts = {stage: Artifact(stage, fp, paths.get(stage, join(cache, stage, fp)))
                 for stage, fp in fps.items() if stage != SOURCE_INPUT}
    run = RunLayout(cfg.run_dir)
    artifacts["report"] = Artifact("report", stage_fingerprint("report", cfg, fps), run.report)
    ordered = {name: artifacts[name] for name in STAGES if name in artifacts}
    source_path = artifacts["corpus"].join(CORPUS_MANIFEST) if corpus else cfg.data.source
    return Plan(run, cache, ordered, source_path, base_model)
