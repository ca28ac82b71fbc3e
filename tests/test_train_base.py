"""`raywsl train-base`: the base field under Ray Train (2 CPU workers, gloo), checkpoints, resume."""

import json

import pytest
import torch
from conftest import copy_ingested, ingest_corpus, kill9_when, plan_of

from raywsl import cache
from raywsl import contract as C
from raywsl.cli import main

FINAL = C.STAGES["train-base"].produces  # checkpoints/base_final: the run folder's link to the trained base
INGEST = ["ingest.points=2048", "ingest.surface_points=256", "ingest.shard_size=4", "ingest.test_fraction=0"]
BASE = ["base.preset=tiny", "base.checkpoint_every=20", "base.stages=[[0.5,4,256],[0.5,2,1024]]",
        "base.lr=0.003", "base.latent_lr=0.003"]


@pytest.fixture(scope="module")
def ingested(ray_local, tmp_path_factory):
    """(run, args): 8 corpus shapes ingested (none held out), in a cache tests copy (`copy_ingested`)."""
    return ingest_corpus(tmp_path_factory.mktemp("base"), 8, INGEST)


def _final(run):
    folder = run / FINAL
    state = torch.load(folder / C.CHECKPOINT_STATE, weights_only=True)  # safe: tensors and numbers only
    return state, json.loads((folder / C.CHECKPOINT_INFO).read_text())


def shared(ingested) -> list[str]:
    """The ingested config, in the cache the module shares (tests that change an artifact copy it)."""
    return [*ingested[1], f"cache.dir={ingested[0].parent / C.CACHE}"]


def test_train_base_learns_and_checkpoints(ingested, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train-base", f"run.dir={run}", *shared(ingested), *BASE, "base.steps=200"]) == 0
    assert "base_step 200" in capsys.readouterr().err
    state, info = _final(run)
    assert state["step"] == info["step"] == 200 and state["latents"].shape == (8, 8)
    assert info["metrics"]["skipped_steps"] == state["skipped_steps"] == 0  # the summary train_base returns
    assert 0 < info["metrics"]["grad_norm"] < 100  # mean norm before clipping, over the last steps
    # the latents moved away from their N(0, 0.01^2) start, and apart from each other
    assert state["latents"].std() > 0.02
    # the trained network decodes the shapes far better than a fresh one
    from raywsl.base.train import make_trainer
    from raywsl.config import load_config
    from raywsl.store.rows import RowStore

    cfg = load_config(None, [f"run.dir={run}", *BASE, "base.steps=200"])
    fresh, trained = make_trainer(cfg, 8), make_trainer(cfg, 8)
    trained.load_state(str(run / FINAL))
    samples = RowStore.open(str(run / C.SAMPLES))
    x, sdf = torch.from_numpy(samples.group[C.POINTS][:, :512]), torch.from_numpy(samples.group[C.SDF][:, :512])
    with torch.no_grad():
        err = {name: (t.net(x, t.net.styles(t.latents)) - sdf).abs().mean().item()
               for name, t in (("fresh", fresh), ("trained", trained))}
    assert err["trained"] < 0.7 * err["fresh"], err  # ~0.5 measured


@pytest.mark.long
def test_train_base_resumes_after_kill9(ingested, tmp_path):
    from pathlib import Path

    run = copy_ingested(ingested[0], tmp_path)
    args = ["train-base", f"run.dir={run}", *ingested[1], *BASE, "base.steps=200"]
    _, plan = plan_of(*args[1:], base=True)
    ray_run = Path(cache.work_dir(plan["train-base"])) / C.TRAIN_RUN

    def checkpointed() -> bool:  # Ray Train resumes from the checkpoints its manager's snapshot lists
        return (ray_run / "checkpoint_manager_snapshot.json").exists()

    kill9_when(args, checkpointed, timeout=180)
    assert not cache.is_complete(plan["train-base"].path)  # nothing published by the killed run
    assert main(args) == 0
    state, info = _final(run)
    assert state["step"] == 200 and info["metrics"]["step"] == 200
    assert info["metrics"]["resumed_from"] >= 20  # not from step 0
    assert not ray_run.exists()  # the resumable state is gone once the base is published


def test_mlora_fields_fit_on_the_trained_base_through_raywsl_fit(ingested, tmp_path):
    """train-base, then `raywsl fit field.type=mlora`: a weight store of rank-pair rows whose frozen
    base is fingerprinted, and field_of rebuilds the field from the store."""
    from raywsl.store.rows import DONE
    from raywsl.models.fields import field_of
    from raywsl.store.weights import open_weights

    run = tmp_path / "run"  # the module's cache: the base the first test trained (it changes it last)
    assert main(["train-base", f"run.dir={run}", *shared(ingested), *BASE, "base.steps=200"]) == 0
    fit = [*shared(ingested), *BASE, "base.steps=200", "field.type=mlora", "field.preset=default", "field.rank=2",
           "field.asym=true", "fit.steps=60",
           "fit.points_per_step=512", "fit.check_every=20", "fit.batch_size=4", "fit.shard_size=4",
           "fit.recon_count=2", "fit.recon_resolution=32"]
    assert main(["fit", f"run.dir={run}", *fit]) == 0
    store = open_weights(str(run / C.WEIGHTS))
    assert (store.status() == DONE).all()
    field = field_of(store)
    assert store.group[C.ROW_WEIGHTS].shape == (8, field.layout.size)
    assert store.attrs["layout"][0] == ["block0.fc0.a0_free", [12]]  # 16 channels, 4 frozen (the masks)
    assert store.attrs["frozen_fingerprint"] == field.frozen_fingerprint()
    # the fit found the base train-base made for the same config (the train-base stage was reused)
    assert json.loads((run / C.STAGES_FILE).read_text())["stages"]["train-base"]["reused"]
    # another base (here: the checkpoint's EMA weights nudged) is another frozen part: refused
    path = run / FINAL / C.CHECKPOINT_STATE
    state = torch.load(path, weights_only=True)
    state["ema"] = {k: v + 1e-3 for k, v in state["ema"].items()}
    torch.save(state, path)
    assert main(["fit", f"run.dir={run}", *fit]) == 2


def test_deepsdf_latents_through_raywsl_fit_which_trains_the_decoder_first(ingested, tmp_path):
    """`raywsl fit field.type=deepsdf_latent fit.init=trained` on a run folder without a decoder:
    the DeepSDF auto-decoder is trained under Ray Train first, then every shape's row starts from its
    trained latent and is refined against the frozen decoder."""
    import numpy as np

    from raywsl.models.deepsdf_latent import DeepSDFLatentField
    from raywsl.store.rows import DONE
    from raywsl.models.fields import field_of
    from raywsl.store.weights import open_weights

    run = copy_ingested(ingested[0], tmp_path)
    fit = [*ingested[1], "field.type=deepsdf_latent", "field.preset=default", "fit.init=trained", "fit.loss=clamped_l1",
           "fit.steps=40", "fit.lr=1e-4", "fit.points_per_step=512", "fit.check_every=20", "fit.batch_size=4",
           "fit.shard_size=4", "fit.recon_count=0", *BASE, "base.steps=100"]
    assert main(["fit", f"run.dir={run}", *fit]) == 0
    state, info = _final(run)
    store = open_weights(str(run / C.WEIGHTS))
    ids = [str(i) for i in store.row_meta()[C.SHAPE_ID]]
    assert json.loads((run / FINAL / C.SHAPE_IDS).read_text()) == ids
    assert state["step"] == 100 and info["model"] == "deepsdf"  # the DeepSDF decoder, not the modulated base
    assert (store.status() == DONE).all() and isinstance(field_of(store), DeepSDFLatentField)
    rows = torch.from_numpy(store.group[C.ROW_WEIGHTS][:])
    assert rows.shape == (8, 8)
    # each row started from its own trained latent: Adam moves an entry by about lr per step at most
    moved = (rows - state["latents"]).abs()
    assert 0 < moved.max() <= 40 * 1e-4 * 1.05, moved.max()
    assert (state["latents"] - state["latents"].roll(1, 0)).abs().max(1).values.min() > 10 * moved.max()
    assert np.isfinite(store.group[C.FIT_LOSS][:]).all()


# ------------------------------------------------------------------ non-finite steps (no Ray needed)

def _spheres(n=6, m=2048):
    import numpy as np

    rng = np.random.default_rng(0)
    points = rng.uniform(-1, 1, (n, m, 3)).astype(np.float32)
    radii = np.linspace(0.25, 0.7, n, dtype=np.float32)[:, None]
    return points, (np.linalg.norm(points, axis=2) - radii).astype(np.float32)


def _auto_decoder(steps, **settings):
    from raywsl.base.autodecoder import AutoDecoder, AutoDecoderSettings
    from raywsl.models.modulated import ModulatedField

    torch.manual_seed(0)
    net = ModulatedField.from_preset("tiny")
    s = AutoDecoderSettings(steps=steps, lr=3e-3, latent_lr=3e-3, stages=[[1.0, 3, 256]], **settings)
    return AutoDecoder(net, lambda net, x, z: net(x, net.styles(z)), 6, 8, s)


def _state(trainer):
    return [t.detach().clone() for t in (*trainer.net.parameters(), *trainer.ema.parameters(), trainer.latents)]


def test_a_nan_step_is_skipped_and_training_finishes_finite(caplog, tmp_path):
    """NaN targets at step 10: that step changes nothing (network, EMA, latents, Adam), is counted and
    warned about, and training goes on to a finite end; the count survives a checkpoint."""
    import logging
    import math

    points, sdf = _spheres()
    trainer = _auto_decoder(30)
    losses = []
    with caplog.at_level(logging.WARNING, "raywsl.tracking"):
        for idx, pts, target in trainer.batches(points, sdf):
            if trainer.step_count == 10:
                target = target.clone()
                target[0, 0] = math.nan
                before, adam = _state(trainer), trainer.opt.state_dict()["state"][0]["step"].item()
            losses.append(trainer.step(idx, pts, target))
            if trainer.step_count == 11:
                assert all(torch.equal(a, b) for a, b in zip(before, _state(trainer)))
                assert trainer.opt.state_dict()["state"][0]["step"].item() == adam == 10
    assert trainer.step_count == 30 and trainer.skipped_steps == 1
    assert math.isnan(losses[10]) and all(math.isfinite(v) for i, v in enumerate(losses) if i != 10)
    assert all(torch.isfinite(t).all() for t in _state(trainer))
    assert losses[-1] < losses[0]
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith("train-base: step 10 skipped (no update): non-finite loss or gradient (loss nan")
    trainer.save(str(tmp_path / "ckpt"))
    resumed = _auto_decoder(30)
    resumed.load_state(str(tmp_path / "ckpt"))
    assert resumed.skipped_steps == 1


def test_persistent_nan_aborts_train_base_naming_step_and_option():
    import math

    points, sdf = _spheres()
    trainer = _auto_decoder(30, max_bad_steps=3)
    with pytest.raises(RuntimeError, match=r"train-base: diverged: 3 steps in a row .* the last at step 7 .*"
                                           r"base\.max_bad_steps = 3"):
        for idx, pts, target in trainer.batches(points, sdf):
            trainer.step(idx, pts, target if trainer.step_count < 5 else torch.full_like(target, math.nan))
    assert trainer.skipped_steps == 3 and all(torch.isfinite(t).all() for t in _state(trainer))


def test_gradient_clipping_bounds_the_applied_gradient():
    points, sdf = _spheres()
    clipped, free = _auto_decoder(5, grad_clip=0.05), _auto_decoder(5, grad_clip=0)
    batch = next(clipped.batches(points, sdf))
    for trainer in (clipped, free):
        trainer.step(*batch)
    applied = {name: torch.nn.utils.get_total_norm([p.grad for p in (*t.net.parameters(), t.latents)]).item()
               for name, t in (("clipped", clipped), ("free", free))}
    assert clipped.grad_norm == pytest.approx(free.grad_norm) and clipped.grad_norm > 1.0  # before clipping
    assert applied["clipped"] == pytest.approx(0.05, rel=1e-4)
    assert applied["free"] == pytest.approx(free.grad_norm, rel=1e-6)


_WORKER = """
import math, sys
import numpy as np, torch, torch.distributed as dist
from raywsl.base.autodecoder import AutoDecoder, AutoDecoderSettings
from raywsl.models.modulated import ModulatedField

rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method=f"file://{sys.argv[2]}", rank=rank, world_size=2)
torch.set_num_threads(1)

def sync(tensors):
    for t in tensors:
        dist.all_reduce(t)
        t /= 2

rng = np.random.default_rng(0)
points = rng.uniform(-1, 1, (6, 512, 3)).astype(np.float32)
sdf = (np.linalg.norm(points, axis=2) - 0.5).astype(np.float32)
torch.manual_seed(0)
net = ModulatedField.from_preset("tiny")
settings = AutoDecoderSettings(steps=30, stages=[[1.0, 3, 128]], max_bad_steps=3, seed=rank)  # own draws
trainer = AutoDecoder(net, lambda net, x, z: net(x, net.styles(z)), 6, 8, settings)
skipped_at = []
try:
    for idx, pts, target in trainer.batches(points, sdf):
        if rank == 1 and (trainer.step_count == 4 or trainer.step_count >= 10):  # only worker 1 sees NaN
            target = torch.full_like(target, math.nan)
        if math.isnan(trainer.step(idx, pts, target, sync)):
            skipped_at.append(trainer.step_count - 1)
    print("finished")
except RuntimeError as e:
    print(e)
    print("aborted", skipped_at, trainer.step_count, float(sum(p.sum() for p in trainer.net.parameters())))
"""


def test_two_workers_skip_the_same_steps_and_abort_together(tmp_path):
    """One worker's NaN loss: both skip that step (the flag is all-reduced with the gradients), both
    abort at the same step, and neither waits for the other in an all_reduce (no hang)."""
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(tmp_path / "rendezvous")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, err
        outs.append(out.strip().split("\n")[-2:])
    # the same skipped steps, the same abort, the same weights (the sum of the network's parameters)
    assert outs[0][1] == outs[1][1] and outs[0][1].startswith("aborted [4, 10, 11] 12 ")
    for (error, _), why in zip(outs, ("another worker's loss not finite", "loss nan")):
        assert error.startswith("train-base: diverged: 3 steps in a row with a non-finite loss or gradient, the "
                                "last at step 12 (") and why in error
