"""`raywsl train` / `sample` / `run`: the denoiser under Ray Train (checkpoints, resume after a kill,
2 DDP workers), sampling to meshes, and the whole chain end to end with its MLflow run."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import ingest_corpus, kill9_when

from raywsl import layout as L
from raywsl.cli import main
from raywsl.store.weights import open_weights

INGEST = ["ingest.points=4096", "ingest.surface_points=1024", "ingest.shard_size=4", "ingest.test_fraction=0.25"]
FIT = ["field.preset=tiny", "fit.steps=100", "fit.points_per_step=512", "fit.check_every=25",
       "fit.batch_size=6", "fit.shard_size=6", "fit.recon_count=0"]
TRAIN = ["diffusion.model=tiny", "diffusion.timesteps=100", "train.batch_size=8", "train.log_every=10",
         "train.checkpoint_every=20"]
SAMPLE = ["sample.count=4", "sample.steps=10", "sample.resolution=24"]


@pytest.fixture(scope="module")
def fitted(ray_local, tmp_path_factory):
    run = ingest_corpus(tmp_path_factory.mktemp("diffusion"), 12, INGEST)
    assert main(["fit", f"run.dir={run}", *FIT]) == 0
    return run


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns(L.MLFLOW_RUN))
    return dst


def test_train_then_sample(fitted, tmp_path):
    from raywsl.config import load_config
    from raywsl.diffusion.train import training_rows

    run = _copy(fitted, tmp_path)
    assert main(["train", f"run.dir={run}", *TRAIN, "train.steps=60"]) == 0
    final = run / L.CHECKPOINTS / L.DIFFUSION_FINAL
    state = torch.load(final / L.CHECKPOINT_STATE, weights_only=True)  # tensors only: no pickled code
    info = json.loads((final / L.CHECKPOINT_INFO).read_text())
    assert state["step"] == info["step"] == 60 and info["metrics"]["step"] == 60
    assert [h["step"] for h in info["history"]] == [10, 20, 30, 40, 50, 60]
    assert all(np.isfinite(h["loss"]) and h["buckets"] for h in info["history"])
    assert (run / L.RECON / "diffusion_loss.png").exists()
    # trained on the training split only: the held-out shapes are the reference set
    store = open_weights(str(run / L.WEIGHTS))
    train_rows = training_rows(store, load_config(None, [f"run.dir={run}"]))
    assert 0 < len(train_rows) < store.n_rows
    assert state["standardizer"]["mean"].shape == (store.group[L.ROW_WEIGHTS].shape[1],)

    assert main(["sample", f"run.dir={run}", *TRAIN, "train.steps=60", *SAMPLE]) == 0
    rows = np.load(run / L.GENERATED / "rows.npy")
    summary = json.loads((run / L.GENERATED / "summary.json").read_text())
    assert rows.shape == (4, store.group[L.ROW_WEIGHTS].shape[1]) and np.isfinite(rows).all()
    assert summary["count"] == 4 and len(list((run / L.GENERATED).glob("*.ply"))) == 4 - summary["no_surface"]
    # the same settings again: nothing to do (the rows file is not rewritten)
    mtime = (run / L.GENERATED / "rows.npy").stat().st_mtime_ns
    assert main(["sample", f"run.dir={run}", *TRAIN, "train.steps=60", *SAMPLE]) == 0
    assert (run / L.GENERATED / "rows.npy").stat().st_mtime_ns == mtime
    # training again with the same settings is a no-op too; other settings are refused without --restart
    assert main(["train", f"run.dir={run}", *TRAIN, "train.steps=60"]) == 0
    assert json.loads((final / L.CHECKPOINT_INFO).read_text())["fingerprint"] == info["fingerprint"]


def test_train_resumes_after_kill9(fitted, tmp_path):
    run = _copy(fitted, tmp_path)
    args = ["train", f"run.dir={run}", *TRAIN, "train.steps=300"]
    ray_run = run / L.CHECKPOINTS / L.DIFFUSION_RUN

    def checkpointed() -> bool:
        return ray_run.exists() and any(p.name.startswith("checkpoint") for p in ray_run.iterdir())

    kill9_when(args, checkpointed, timeout=180)
    from raywsl.config import load_config
    from raywsl.diffusion.train import train

    metrics = train(load_config(None, args[1:]))
    assert metrics["step"] == 300 and metrics["resumed_from"] >= 20  # not from step 0
    info = json.loads((run / L.CHECKPOINTS / L.DIFFUSION_FINAL / L.CHECKPOINT_INFO).read_text())
    steps = [h["step"] for h in info["history"]]
    assert steps == sorted(set(steps)) and steps[-1] == 300  # the history survives the kill, no repeats


def test_two_ddp_workers(fitted, tmp_path):
    run = _copy(fitted, tmp_path)
    assert main(["train", f"run.dir={run}", *TRAIN, "train.steps=20", "scaling.num_workers=2"]) == 0
    info = json.loads((run / L.CHECKPOINTS / L.DIFFUSION_FINAL / L.CHECKPOINT_INFO).read_text())
    assert info["step"] == 20 and np.isfinite(info["history"][-1]["loss"])
