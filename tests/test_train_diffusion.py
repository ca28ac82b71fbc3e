"""`raywsl train` / `sample` / `run`: the denoiser under Ray Train (checkpoints, resume after a kill,
2 DDP workers), sampling to meshes, and the whole chain end to end with its MLflow run."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ingest_corpus, kill9_when, plan_of

from raywsl import cache
from raywsl import contract as C
from raywsl.cli import main
from raywsl.store.weights import open_weights

INGEST = ["ingest.points=4096", "ingest.surface_points=1024", "ingest.shard_size=4", "ingest.test_fraction=0.25"]
FIT = ["field.preset=tiny", "fit.steps=100", "fit.points_per_step=512", "fit.check_every=25",
       "fit.batch_size=6", "fit.shard_size=6", "fit.recon_count=0"]
TRAIN = ["diffusion.model=tiny", "diffusion.timesteps=100", "train.batch_size=8", "train.log_every=10",
         "train.checkpoint_every=20"]
SAMPLE = ["sample.count=4", "sample.steps=10", "sample.resolution=24"]


FINAL = C.STAGES["train"].produces  # checkpoints/diffusion_final: the run folder's link to the denoiser


@pytest.fixture(scope="module")
def fitted(ray_local, tmp_path_factory):
    """The config args of 12 fitted corpus shapes, in a cache the tests share (their own stages differ)."""
    run, args = ingest_corpus(tmp_path_factory.mktemp("diffusion"), 12, INGEST)
    args = [*args, *FIT, f"cache.dir={run.parent / C.CACHE}"]
    assert main(["fit", f"run.dir={run}", *args]) == 0
    return args


def test_train_then_sample(fitted, tmp_path):
    from raywsl.store.split import training_rows

    run = tmp_path / "run"
    assert main(["train", f"run.dir={run}", *fitted, *TRAIN, "train.steps=60"]) == 0
    final = run / FINAL
    state = torch.load(final / C.CHECKPOINT_STATE, weights_only=True)  # tensors only: no pickled code
    info = json.loads((final / C.CHECKPOINT_INFO).read_text())
    assert state["step"] == info["step"] == 60 and info["metrics"]["step"] == 60
    assert [h["step"] for h in info["history"]] == [10, 20, 30, 40, 50, 60]
    assert all(np.isfinite(h["loss"]) and h["buckets"] for h in info["history"])
    assert (final / C.DIFFUSION_LOSS).exists()
    # trained on the training split only: the held-out shapes are the reference set
    store = open_weights(str(run / C.WEIGHTS))
    train_rows = training_rows(store, 0)
    assert 0 < len(train_rows) < store.n_rows and train_rows[0] == store.attrs[C.Attr.HELD_OUT]
    assert state["standardizer"]["mean"].shape == (store.group[C.ROW_WEIGHTS].shape[1],)

    assert main(["sample", f"run.dir={run}", *fitted, *TRAIN, "train.steps=60", *SAMPLE]) == 0
    generated = run / "generated"
    rows = np.load(generated / C.ROWS)
    summary = json.loads((generated / C.SAMPLES_SUMMARY).read_text())
    assert rows.shape == (4, store.group[C.ROW_WEIGHTS].shape[1]) and np.isfinite(rows).all()
    assert summary["count"] == 4 and len(list(generated.glob("*.ply"))) == 4 - summary["no_surface"]
    # the same settings again: nothing to do (the rows file is not rewritten)
    mtime = (generated / C.ROWS).stat().st_mtime_ns
    assert main(["sample", f"run.dir={run}", *fitted, *TRAIN, "train.steps=60", *SAMPLE]) == 0
    assert (generated / C.ROWS).stat().st_mtime_ns == mtime
    # training again with the same settings is a no-op too
    mtime = (final / C.CHECKPOINT_STATE).stat().st_mtime_ns
    assert main(["train", f"run.dir={run}", *fitted, *TRAIN, "train.steps=60"]) == 0
    assert (final / C.CHECKPOINT_STATE).stat().st_mtime_ns == mtime
    assert json.loads((run / C.STAGES_FILE).read_text())["stages"]["train"]["reused"]


def test_train_resumes_after_kill9(fitted, tmp_path):
    run = tmp_path / "run"
    args = ["train", f"run.dir={run}", *fitted, *TRAIN, "train.steps=150"]
    _, plan = plan_of(*args[1:])
    ray_run = Path(cache.work_dir(plan["train"])) / C.TRAIN_RUN

    def checkpointed() -> bool:  # Ray Train resumes from the checkpoints its manager's snapshot lists
        return (ray_run / "checkpoint_manager_snapshot.json").exists()

    kill9_when(args, checkpointed, timeout=180)
    assert not cache.is_complete(plan["train"].path)  # the killed run published nothing
    assert main(args) == 0
    info = json.loads((run / FINAL / C.CHECKPOINT_INFO).read_text())
    assert info["metrics"]["step"] == 150 and info["metrics"]["resumed_from"] >= 20  # not from step 0
    steps = [h["step"] for h in info["history"]]
    assert steps == sorted(set(steps)) and steps[-1] == 150  # the history survives the kill, no repeats


def test_two_ddp_workers(fitted, tmp_path):
    run = tmp_path / "run"
    assert main(["train", f"run.dir={run}", *fitted, *TRAIN, "train.steps=20", "scaling.num_workers=2"]) == 0
    info = json.loads((run / FINAL / C.CHECKPOINT_INFO).read_text())
    assert info["step"] == 20 and np.isfinite(info["history"][-1]["loss"])
