"""`raywsl train-base`: the base field under Ray Train (2 CPU workers, gloo), checkpoints, resume."""

import json

import pytest
import torch
from conftest import ingest_corpus, kill9_when

from raywsl import layout as L
from raywsl.cli import main

FINAL = "base_final"  # the modulated base's final checkpoint, and Ray Train's run folder (layout.BASE_RUNS)
RUN_NAME = L.BASE_RUNS["modulated"]
INGEST = ["ingest.points=2048", "ingest.surface_points=256", "ingest.shard_size=4"]
BASE = ["base.preset=tiny", "base.checkpoint_every=20", "base.stages=[[0.5,4,256],[0.5,2,1024]]",
        "base.lr=0.003", "base.latent_lr=0.003"]


@pytest.fixture(scope="module")
def ingested(ray_local, tmp_path_factory):
    return ingest_corpus(tmp_path_factory.mktemp("base"), 8, INGEST)


def _final(run):
    folder = run / L.CHECKPOINTS / FINAL
    state = torch.load(folder / L.CHECKPOINT_STATE, weights_only=True)  # safe: tensors and numbers only
    return state, json.loads((folder / L.CHECKPOINT_INFO).read_text())


def test_train_base_learns_and_checkpoints(ingested, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(ingested, run)
    assert main(["train-base", f"run.dir={run}", *BASE, "base.steps=200"]) == 0
    assert "step 200" in capsys.readouterr().out
    state, info = _final(run)
    assert state["step"] == info["step"] == 200 and state["latents"].shape == (8, 8)
    # the latents moved away from their N(0, 0.01^2) start, and apart from each other
    assert state["latents"].std() > 0.02
    # the trained network decodes the shapes far better than a fresh one
    from raywsl.base.train import make_trainer
    from raywsl.config import load_config
    from raywsl.store.rows import RowStore

    cfg = load_config(None, [f"run.dir={run}", *BASE, "base.steps=200"])
    fresh, trained = make_trainer(cfg, 8), make_trainer(cfg, 8)
    trained.load_state(str(run / L.CHECKPOINTS / FINAL))
    samples = RowStore.open(str(run / L.SAMPLES))
    x, sdf = torch.from_numpy(samples.group[L.POINTS][:, :512]), torch.from_numpy(samples.group[L.SDF][:, :512])
    with torch.no_grad():
        err = {name: (t.net(x, t.net.styles(t.latents)) - sdf).abs().mean().item()
               for name, t in (("fresh", fresh), ("trained", trained))}
    assert err["trained"] < 0.7 * err["fresh"], err  # ~0.5 measured


def test_train_base_resumes_after_kill9(ingested, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(ingested, run)
    args = ["train-base", f"run.dir={run}", *BASE, "base.steps=400"]
    ray_run = run / L.CHECKPOINTS / RUN_NAME

    def checkpointed() -> bool:
        return ray_run.exists() and any(p.name.startswith("checkpoint") for p in ray_run.iterdir())

    kill9_when(args, checkpointed, timeout=180)
    from raywsl.base.train import train_base
    from raywsl.config import load_config

    metrics = train_base(load_config(None, args[1:]))
    assert metrics["step"] == 400 and metrics["resumed_from"] >= 20  # not from step 0
    state, _ = _final(run)
    assert state["step"] == 400


def test_mlora_fields_fit_on_the_trained_base_through_raywsl_fit(ingested, tmp_path):
    """train-base, then `raywsl fit field.type=mlora`: a weight store of rank-pair rows whose frozen
    base is fingerprinted, and field_of rebuilds the field from the store."""
    import shutil

    from raywsl.store.rows import DONE
    from raywsl.store.weights import field_of, open_weights

    run = tmp_path / "run"
    shutil.copytree(ingested, run)
    assert main(["train-base", f"run.dir={run}", *BASE, "base.steps=60"]) == 0
    fit = ["field.type=mlora", "field.preset=default", "field.rank=2", "field.asym=true", "fit.steps=60",
           "fit.points_per_step=512", "fit.check_every=20", "fit.batch_size=4", "fit.shard_size=4",
           "fit.recon_count=2", "fit.recon_resolution=32"]
    assert main(["fit", f"run.dir={run}", *fit]) == 0
    store = open_weights(str(run / L.WEIGHTS))
    assert (store.status() == DONE).all()
    field = field_of(store)
    assert store.group[L.ROW_WEIGHTS].shape == (8, field.layout.size)
    assert store.attrs["layout"][0] == ["block0.fc0.a0", [16]]
    assert store.attrs["frozen_fingerprint"] == field.frozen_fingerprint()
    # another base (here: the checkpoint's EMA weights nudged) is another frozen part: refused
    path = run / L.CHECKPOINTS / FINAL / L.CHECKPOINT_STATE
    state = torch.load(path, weights_only=True)
    state["ema"] = {k: v + 1e-3 for k, v in state["ema"].items()}
    torch.save(state, path)
    assert main(["fit", f"run.dir={run}", *fit]) == 2


def test_deepsdf_latents_through_raywsl_fit_which_trains_the_decoder_first(ingested, tmp_path):
    """`raywsl fit field.type=deepsdf_latent fit.init=trained` on a run folder without a decoder:
    the DeepSDF auto-decoder is trained under Ray Train first, then every shape's row starts from its
    trained latent and is refined against the frozen decoder."""
    import shutil

    import numpy as np

    from raywsl.fit.deepsdf import DeepSDFLatentField
    from raywsl.store.rows import DONE
    from raywsl.store.weights import field_of, open_weights

    run = tmp_path / "run"
    shutil.copytree(ingested, run)
    fit = ["field.type=deepsdf_latent", "field.preset=default", "fit.init=trained", "fit.loss=clamped_l1",
           "fit.steps=40", "fit.lr=1e-4", "fit.points_per_step=512", "fit.check_every=20", "fit.batch_size=4",
           "fit.shard_size=4", "fit.recon_count=0", *BASE, "base.steps=100"]
    assert main(["fit", f"run.dir={run}", *fit]) == 0
    final = L.RunLayout(str(run)).base_final("deepsdf")
    state = torch.load(f"{final}/{L.CHECKPOINT_STATE}", weights_only=True)
    store = open_weights(str(run / L.WEIGHTS))
    ids = [str(i) for i in store.row_meta()[L.SHAPE_ID]]
    assert json.loads((run / L.CHECKPOINTS / "deepsdf_final" / L.SHAPE_IDS).read_text()) == ids
    assert state["step"] == 100 and not (run / L.CHECKPOINTS / FINAL).exists()  # the DeepSDF decoder, not the modulated base
    assert (store.status() == DONE).all() and isinstance(field_of(store), DeepSDFLatentField)
    rows = torch.from_numpy(store.group[L.ROW_WEIGHTS][:])
    assert rows.shape == (8, 8)
    # each row started from its own trained latent: Adam moves an entry by about lr per step at most
    moved = (rows - state["latents"]).abs()
    assert 0 < moved.max() <= 40 * 1e-4 * 1.05, moved.max()
    assert (state["latents"] - state["latents"].roll(1, 0)).abs().max(1).values.min() > 10 * moved.max()
    assert np.isfinite(store.group[L.FIT_LOSS][:]).all()
