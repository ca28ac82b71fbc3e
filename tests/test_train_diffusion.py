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
    # the health of the run: the gradient norm before clipping, and no step skipped for NaN / inf
    assert all(h["grad_norm"] > 0 and h["skipped_steps"] == 0 for h in info["history"])
    assert info["metrics"]["skipped_steps"] == 0 and info["metrics"]["grad_norm"] == info["history"][-1]["grad_norm"]
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


@pytest.mark.long
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


# ------------------------------------------------------------------ one step of the denoiser (no Ray needed)

def _update(*overrides, sgd_lr=0.0):
    """A DenoiserUpdate on the tiny denoiser of the tiny MLP's rows, as a Ray Train worker builds it
    (AdamW; plain SGD at `sgd_lr` to see the applied gradient in the update)."""
    from raywsl.config import load_config
    from raywsl.diffusion.train import DenoiserUpdate
    from raywsl.models.denoiser import build_denoiser, make_diffusion
    from raywsl.models.dit import EMA
    from raywsl.models.fields import make_field

    cfg = load_config(None, ["diffusion.model=tiny", "diffusion.timesteps=100", *overrides])
    denoiser = build_denoiser(cfg, make_field("mlp", "tiny").layout)
    opt = (torch.optim.SGD(denoiser.parameters(), lr=sgd_lr) if sgd_lr else
           torch.optim.AdamW(denoiser.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay))
    ema = EMA(denoiser, cfg.train.ema)
    return DenoiserUpdate(denoiser, denoiser, ema, opt, make_diffusion(cfg), cfg.train)


def _rows(step, n=8, nan=False):
    from raywsl.models.fields import make_field

    x0 = torch.randn(n, make_field("mlp", "tiny").layout.size, generator=torch.Generator().manual_seed(step))
    if nan:
        x0[3, 7] = float("nan")  # one NaN weight in one row of the batch
    return x0


def _weights(update):
    return [p.detach().clone() for p in (*update.denoiser.parameters(), *update.ema.model.parameters())]


def test_a_nan_row_skips_its_step_and_training_finishes_finite(caplog):
    import logging

    update = _update()
    with caplog.at_level(logging.WARNING, "raywsl.tracking"):
        for step in range(12):
            before = _weights(update)
            outcome = update(_rows(step, nan=step == 5), torch.Generator().manual_seed(step), step)
            assert outcome.taken == (step != 5)
            moved = [not torch.equal(a, b) for a, b in zip(before, _weights(update))]
            assert any(moved) if outcome.taken else not any(moved)  # skipped: no update, EMA included
    assert update.skipped == 1 and update.ema.updates == 11
    assert all(torch.isfinite(w).all() for w in _weights(update))
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith("train: step 5 skipped (no update): non-finite loss or gradient (loss nan")


def test_persistent_nan_aborts_train_naming_step_and_option():
    update = _update("train.max_bad_steps=4")
    with pytest.raises(RuntimeError, match=r"train: diverged: 4 steps in a row .* the last at step 9 .*"
                                           r"train\.max_bad_steps = 4"):
        for step in range(20):
            update(_rows(step, nan=step >= 6), torch.Generator().manual_seed(step), step)
    assert update.skipped == 4 and all(torch.isfinite(w).all() for w in _weights(update))


def test_gradient_clipping_bounds_the_update():
    """With SGD the update is lr x the applied gradient: its norm is lr x grad_clip, while the norm
    reported (and logged as grad_norm) is the one before clipping."""
    lr, clip = 0.1, 1e-4
    norms = {}
    for name, grad_clip in (("clipped", clip), ("free", 0)):
        update = _update(f"train.grad_clip={grad_clip}", sgd_lr=lr)
        before = [p.detach().clone() for p in update.params]
        outcome = update(_rows(0), torch.Generator().manual_seed(0), 0)
        step = torch.cat([(p.detach() - b).flatten() for p, b in zip(update.params, before)])
        norms[name] = (outcome.grad_norm, step.norm().item() / lr)
    (before_clip, applied), (free_norm, free_applied) = norms["clipped"], norms["free"]
    assert before_clip == pytest.approx(free_norm) and before_clip > 100 * clip
    assert applied == pytest.approx(clip, rel=1e-3)
    assert free_applied == pytest.approx(free_norm, rel=1e-3)


def test_a_diverging_denoiser_fails_the_run_and_publishes_nothing(fitted, tmp_path):
    """lr 1e30: after the first update every loss is inf / NaN. Each step is skipped, the third in a row
    raises in the Ray Train worker, and `raywsl train` fails with that error (after Ray Train's retries
    from the last checkpoint, runtime.fit_torch_trainer), instead of hanging or publishing a model."""
    run = tmp_path / "run"
    args = ["train", f"run.dir={run}", *fitted, *TRAIN, "train.steps=60", "train.lr=1e30", "train.max_bad_steps=3"]
    with pytest.raises(Exception, match=r"(?s)train: diverged: 3 steps in a row.*the last at step 3 .*"
                                        r"train\.max_bad_steps = 3") as error:
        main(args)
    assert not isinstance(error.value, AssertionError)
    _, plan = plan_of(*args[1:])
    assert not cache.is_complete(plan["train"].path) and not (run / FINAL).exists()
