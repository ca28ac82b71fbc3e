"""End-to-end `raywsl fit` on a real local Ray: a small ingested corpus (+ one broken mesh) ->
weights.zarr, recon/ and metrics.json, with every init strategy, resume after kill -9, two actors,
artifacts per config, inspect, and shapes that diverge inside the job. Every test that changes a store
works in a cache of its own (`_copy`: a fresh run folder whose cache holds a copy of the samples)."""

import csv
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import copy_ingested, kill9_when, plan_of

from raywsl import contract as C
from raywsl.cli import main
from raywsl.data.corpus import write_corpus
from raywsl.fit import pipeline
from raywsl.models.fields import make_field
from raywsl.store.layout import Layout
from raywsl.store.rows import DONE, FAILED, RowStore, StoreError

pytestmark = pytest.mark.ray

N_GOOD = 10
N_ROWS = N_GOOD + 1
SEED = 0
# No held-out shapes: every row is a training row, fitted (weight shards [0,3) [3,6) [6,9) [9,11)).
INGEST = ["ingest.points=4096", "ingest.surface_points=1024", "ingest.shard_size=4", "ingest.test_fraction=0"]
SOURCE: dict[str, str] = {}  # "manifest": the ingested source (set by `ingested`)
ROWS: dict[str, int] = {}  # "bad": the row of the broken mesh in the stores' fixed order (set by `ingested`)


def fit_args(*extra: str) -> list[str]:
    """The config of a fit of the ingested source: its data.source and ingest keys name the samples."""
    return [f"data.source={SOURCE['manifest']}", *INGEST, *FIT, *extra]
FIT = ["field.preset=tiny", "fit.steps=100", "fit.points_per_step=512", "fit.check_every=25",
       "fit.batch_size=4", "fit.shard_size=3", "fit.recon_count=2", "fit.recon_resolution=32"]
FIT_ARRAYS = (C.ROW_WEIGHTS, C.FIT_LOSS, C.FIT_STEPS, C.FIT_RESTARTS, C.STATUS, C.REASON, C.SHARD_DONE)


# ------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def ingested(ray_local, tmp_path_factory):
    """A run folder with samples.zarr of 10 corpus shapes and one garbage .ply (row bad_row())."""
    root = tmp_path_factory.mktemp("fitcorpus")
    manifest = Path(write_corpus(root / "corpus", N_GOOD, seed=0, progress=False))
    with open(manifest) as f:
        rows = [{"id": r["id"], "path": str(manifest.parent / r["path"]), "category": r["category"]}
                for r in csv.DictReader(f)]
    bad = root / "garbage.ply"
    bad.write_bytes(b"this is not a mesh \x00\x01\x02" * 10)
    rows.insert(5, {"id": "bad-garbage", "path": str(bad), "category": "bad"})
    source = root / "all.csv"
    with open(source, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "path", "category"])
        w.writeheader()
        w.writerows(rows)
    run = root / "run"
    SOURCE["manifest"] = str(source)
    assert main(["ingest", f"data.source={source}", f"run.dir={run}", *INGEST]) == 0
    samples = RowStore.open(str(run / C.SAMPLES))
    ROWS["bad"] = samples.row_meta()[C.SHAPE_ID].tolist().index("bad-garbage")
    status = samples.status()
    assert status[bad_row()] == FAILED and (np.delete(status, bad_row()) == DONE).all()
    return run


def bad_row() -> int:
    return ROWS["bad"]


@pytest.fixture(scope="module")
def fitted(ingested, tmp_path_factory):
    """fitted(*overrides) -> a run folder fitted with FIT + overrides (in-process, once per module
    and overrides). Tests must not change it: copy it first (`_copy`)."""
    cache = {}

    def get(*extra):
        if extra not in cache:
            run = copy_ingested(ingested, tmp_path_factory.mktemp("fitted"))
            assert main(["fit", f"run.dir={run}", *fit_args(), *extra]) == 0
            cache[extra] = run
        return cache[extra]

    return get


def _arrays(run: Path, names=FIT_ARRAYS) -> dict[str, np.ndarray]:
    store = RowStore.open(str(run / C.WEIGHTS))
    return {name: store.read(name) for name in names}  # text arrays decoded


def _assert_stores_equal(a: Path | dict, b: Path | dict) -> None:
    x = a if isinstance(a, dict) else _arrays(a)
    y = b if isinstance(b, dict) else _arrays(b)
    for name in FIT_ARRAYS:
        assert x[name].dtype == y[name].dtype, name
        if x[name].dtype.kind == "f":  # bitwise: NaN losses of failed rows compare equal too
            assert x[name].tobytes() == y[name].tobytes(), name
        else:
            np.testing.assert_array_equal(x[name], y[name], err_msg=name)


def _initial_losses(field, rows: torch.Tensor, samples: RowStore, idx) -> np.ndarray:
    """l1 loss (fit.loss default) of each row of `rows` (one per entry of idx, or one shared row)
    on the stored samples of the shapes idx."""
    pts = torch.from_numpy(samples.group[C.POINTS].get_orthogonal_selection((idx, slice(None), slice(None))))
    sdf = torch.from_numpy(samples.group[C.SDF].get_orthogonal_selection((idx, slice(None))))
    rows = rows.expand(len(idx), -1) if rows.shape[0] == 1 else rows
    with torch.no_grad():
        pred = field.forward(field.layout.unflatten(rows), pts)
    return (pred - sdf).abs().mean(1).numpy()


def _good_rows() -> np.ndarray:
    return np.array([i for i in range(N_ROWS) if i != bad_row()])


# ------------------------------------------------------------------------------------ 1. init strategies

@pytest.mark.parametrize("init", ["shared", "random", "warm", "warm-chosen"])
def test_fit_every_init_strategy(ingested, fitted, init, capsys):
    samples = RowStore.open(str(ingested / C.SAMPLES))
    ids = [str(i) for i in samples.row_meta()[C.SHAPE_ID]]
    extra = [f"fit.init={init.split('-')[0]}"]
    if init == "warm-chosen":
        extra.append(f"fit.warm_shape={ids[7]}")
    capsys.readouterr()
    run = fitted(*extra)
    out = capsys.readouterr().err
    assert f"{N_GOOD} done, 1 failed" in out and "recon_cd_median" in out

    store = RowStore.open(str(run / C.WEIGHTS), kind="weights")
    g = store.group
    a = _arrays(run)
    good = _good_rows()
    status = store.status()
    assert (status[good] == DONE).all() and status[bad_row()] == FAILED
    assert store.pending_shards() == [] and store.n_shards == 4 and store.shard_size == 3
    assert (a[C.FIT_STEPS][good] == 100).all() and a[C.FIT_STEPS][bad_row()] == 0
    assert np.isfinite(a[C.FIT_LOSS][good]).all() and (a[C.FIT_LOSS][good] > 0).all()
    assert (a[C.FIT_RESTARTS] == 0).all()
    assert (a[C.REASON][good] == "").all()
    reason = str(a[C.REASON][bad_row()])
    assert reason.startswith("no samples to fit: ") and "cannot read" in reason and "garbage.ply" in reason
    assert str(samples.read(C.REASON, [bad_row()])[0]) in reason  # ingest's own reason, passed on
    assert not a[C.ROW_WEIGHTS][bad_row()].any()
    assert np.isfinite(a[C.ROW_WEIGHTS][good]).all() and (np.abs(a[C.ROW_WEIGHTS][good]).sum(1) > 0).all()
    assert a[C.ROW_WEIGHTS].dtype == np.float32 and a[C.FIT_STEPS].dtype == np.int32
    np.testing.assert_array_equal(store.row_meta()[C.SHAPE_ID], ids)

    # Attributes: what the field is and how the store was made.
    attrs = store.attrs
    field = make_field("mlp", "tiny")
    layout = Layout.from_json(attrs["layout"])
    assert attrs["field_type"] == "mlp" and attrs["field_preset"] == "tiny"
    assert layout == field.layout and sum(layout.sizes) == attrs["params"] == g[C.ROW_WEIGHTS].shape[1] == 1601
    assert g[C.ROW_WEIGHTS].shape == (N_ROWS, 1601)
    assert attrs["init"] == extra[0].split("=")[1] and attrs["seed"] == SEED
    assert attrs["samples_fingerprint"] == samples.fingerprint and attrs[C.Attr.HELD_OUT] == 0
    assert attrs["fit"]["steps"] == 100 and attrs["fit"]["shard_size"] == 3
    first_good = ids[int(_good_rows()[0])]  # the first training shape with samples
    anchor = {"shared": "", "random": "", "warm": first_good, "warm-chosen": ids[7]}[init]
    assert attrs["warm_shape"] == anchor

    # Start rows, and the loss they give on the stored samples.
    seeded = field.init_rows(1, torch.Generator().manual_seed(SEED))
    if init == "random":
        assert C.INIT_ROW not in g
        starts = torch.stack([pipeline.init_row(field, "random", SEED, ids[i], None) for i in good])
        assert not torch.equal(starts[0], starts[1]) and not torch.equal(starts[0], seeded[0])
        torch.testing.assert_close(pipeline.init_row(field, "random", SEED, ids[0], None), starts[0],
                                   rtol=0, atol=0)  # seeded per shape: reproducible
    else:
        init_row = torch.from_numpy(g[C.INIT_ROW][:])
        assert init_row.shape == (1601,) and torch.isfinite(init_row).all()
        starts = init_row.unsqueeze(0)
        if init == "shared":
            assert torch.equal(init_row, seeded[0])
        else:
            # The anchor was fitted: the start row is no longer the seeded draw, and it fits the
            # anchor far better than that draw does.
            assert not torch.equal(init_row, seeded[0])
            k = ids.index(anchor)
            anchor_loss = _initial_losses(field, starts, samples, [k])[0]
            assert anchor_loss < 0.5 * _initial_losses(field, seeded, samples, [k])[0]
            assert anchor_loss < 2 * a[C.FIT_LOSS][k]
    # Fitting happened: every shape ends far below the loss of where it started and of the
    # seeded random draw.
    start_loss = _initial_losses(field, starts, samples, good)
    random_loss = _initial_losses(field, seeded, samples, good)
    fitted_loss = a[C.FIT_LOSS][good]
    if init in ("shared", "random"):
        assert (fitted_loss < 0.5 * start_loss).all(), (fitted_loss, start_loss)
    assert (fitted_loss < 0.5 * random_loss).all(), (fitted_loss, random_loss)
    # The stored weights are the fit's: their loss on all samples is close to the reported one.
    final = _initial_losses(field, torch.from_numpy(a[C.ROW_WEIGHTS][good]), samples, good)
    np.testing.assert_allclose(final, fitted_loss, rtol=0.5)

    # Reconstructions and metrics.
    metrics = json.loads((run / C.METRICS).read_text())
    assert metrics["recon_count"] == 2
    assert 0 < metrics["recon_cd_median"] < 0.1 and 0.2 < metrics["recon_iou_mean"] <= 1
    first_two = [ids[i] for i in good[:2]]
    assert [s["shape_id"] for s in metrics["recon"]["shapes"]] == first_two
    assert metrics["fit_loss_median"] == pytest.approx(float(np.median(fitted_loss)), rel=1e-6)
    recon = run / "recon"
    files = [s["file"] for s in metrics["recon"]["shapes"]]
    assert sorted(p.name for p in recon.glob("*.ply")) == sorted(files) and len(set(files)) == 2
    assert (recon / "recon.png").stat().st_size > 1000


# ------------------------------------------------------------------------------------ 2. kill -9, resume

def _shard_files(run: Path, shards) -> dict[str, tuple[int, bytes]]:
    """(mtime_ns, bytes) of every storage object of the given weight shards."""
    out = {}
    store = (run / C.WEIGHTS).resolve()
    for name in FIT_ARRAYS:
        for k in shards:
            base = store / name / "c" / str(k)
            for p in ([base] if base.is_file() else base.rglob("*") if base.exists() else []):
                if p.is_file():
                    out[str(p.relative_to(store))] = (p.stat().st_mtime_ns, p.read_bytes())
    return out


@pytest.mark.long
def test_kill9_then_resume_equals_uninterrupted(ingested, tmp_path, caplog):
    """kill -9 the fit driver (and its Ray) once some weight shards are committed; the rerun
    refits only the others and the store equals an uninterrupted run's, bit for bit."""
    # One shape per shard and more steps: shards commit one by one, slowly enough to kill between.
    args = [*fit_args(), "fit.shard_size=1", "fit.steps=300", "fit.recon_count=0"]
    killed = copy_ingested(ingested, tmp_path, "killed")

    def committed() -> int:
        try:
            return int(zarr.open_group(str(killed / C.WEIGHTS), mode="r")[C.SHARD_DONE][:].sum())
        except Exception:  # not created yet, or being created
            return 0

    kill9_when(["fit", f"run.dir={killed}", *args], lambda: committed() >= 1, timeout=150)
    partial = RowStore.open(str(killed / C.WEIGHTS))
    done_before = np.array([k for k in range(partial.n_shards) if partial.shard_done(k)])
    assert 0 < len(done_before) < partial.n_shards == N_ROWS
    before = _shard_files(killed, done_before)
    assert before

    caplog.set_level(logging.INFO, logger="raywsl")
    assert main(["fit", f"run.dir={killed}", *args]) == 0
    starts = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fit: 11 training shapes")]
    assert len(starts) == 1 and f"{N_ROWS} shards ({len(done_before)} done)" in starts[0]
    assert _shard_files(killed, done_before) == before  # committed shards were not refitted

    full = copy_ingested(ingested, tmp_path / "other", "full")  # a cache of its own: an uninterrupted fit
    assert main(["fit", f"run.dir={full}", *args]) == 0
    _assert_stores_equal(killed, full)
    s = RowStore.open(str(killed / C.WEIGHTS)).summary()
    assert (s["done"], s["failed"], s["pending"]) == (N_GOOD, 1, 0)
    g = zarr.open_group(str(killed / C.WEIGHTS), mode="r")
    np.testing.assert_array_equal(g[C.INIT_ROW][:], zarr.open_group(str(full / C.WEIGHTS), mode="r")[C.INIT_ROW][:])


# ------------------------------------------------------------------------------------ 3. two actors

def test_two_actors_equal_one(fitted, ingested, tmp_path, capsys):
    one = fitted()
    two = copy_ingested(ingested, tmp_path)
    capsys.readouterr()
    assert main(["fit", f"run.dir={two}", *fit_args(), "fit.actors=2"]) == 0
    assert f"{N_GOOD} done, 1 failed" in capsys.readouterr().err
    _assert_stores_equal(one, two)
    s = RowStore.open(str(two / C.WEIGHTS)).summary()
    assert s["done"] + s["failed"] == s["rows"] == N_ROWS and s["pending"] == 0
    assert s["shards"] == {"size": 3, "total": 4, "done": 4}
    # fit.actors does not decide the output: both stores have the same fingerprint.
    assert s["fingerprint"] == RowStore.open(str(one / C.WEIGHTS)).fingerprint


# ------------------------------------------------------------------------------------ 4. artifacts per config

def test_another_config_is_another_artifact(fitted, ingested, tmp_path, capsys):
    """A fit with other settings writes a weight store of its own beside the first (no refusal, no
    overwrite); the first config again reuses its store; --restart refits."""
    run = copy_ingested(ingested, tmp_path)
    assert main(["fit", f"run.dir={run}", *fit_args()]) == 0
    first = (run / C.WEIGHTS).resolve()
    before = _arrays(run)
    capsys.readouterr()
    assert main(["fit", f"run.dir={run}", *fit_args(), "fit.steps=50"]) == 0
    second = (run / C.WEIGHTS).resolve()
    assert second != first and second.parent.parent == first.parent.parent  # <cache>/fit/<fp>/weights.zarr
    _assert_stores_equal(before, {name: RowStore.open(str(first)).read(name) for name in FIT_ARRAYS})
    steps = RowStore.open(str(second)).group[C.FIT_STEPS][:]
    assert (np.delete(steps, bad_row()) == 50).all()

    capsys.readouterr()
    assert main(["fit", f"run.dir={run}", *fit_args()]) == 0  # the first config again: nothing to fit
    err = capsys.readouterr().err
    assert re.search(r"^  fit +reused ", err, re.M) and (run / C.WEIGHTS).resolve() == first
    stages = json.loads((run / C.STAGES_FILE).read_text())["stages"]
    assert stages["fit"]["reused"] and stages["fit"]["artifact"] == str(first.parent)

    assert main(["fit", f"run.dir={run}", *fit_args(), "--restart"]) == 0
    assert re.search(r"^  fit +computed ", capsys.readouterr().err, re.M)
    _assert_stores_equal(before, _arrays(run))  # refitted from scratch: the same weights


# ------------------------------------------------------------------------------------ 5. inspect

def test_inspect_weight_store(fitted, capsys):
    run = fitted()
    capsys.readouterr()
    assert main(["inspect", str(run / C.WEIGHTS), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "weights" and info["path"] == str(run / C.WEIGHTS)
    assert (info["rows"], info["done"], info["failed"], info["pending"]) == (N_ROWS, N_GOOD, 1, 0)
    assert info["shards"] == {"size": 3, "total": 4, "done": 4}
    assert info["arrays"][C.ROW_WEIGHTS] == {"shape": [N_ROWS, 1601], "dtype": "float32"}
    assert info["arrays"][C.FIT_STEPS] == {"shape": [N_ROWS], "dtype": "int32"}
    assert info["arrays"][C.INIT_ROW] == {"shape": [1601], "dtype": "float32"}
    assert [(f["row"], f["shape_id"]) for f in info["failures"]] == [(bad_row(), "bad-garbage")]
    assert info["failures"][0]["reason"].startswith("no samples to fit")

    assert main(["inspect", str(run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["stores"]) == {"samples", "weights"} and info["stores"]["weights"]["done"] == N_GOOD
    assert main(["inspect", str(run / C.WEIGHTS)]) == 0
    assert "weights store" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ 6. divergence

def test_one_shape_diverges_the_others_do_not_notice(fitted, ingested, tmp_path, capsys):
    """A shape whose samples hold NaN (a corrupt input) diverges: it fails with the reason after
    its restart, its shard still commits, the job ends with exit 0, and every other shape (one of
    them shares its batch) is fitted as without it, up to float rounding."""
    clean = fitted()
    run = copy_ingested(ingested, tmp_path)
    shard = bad_row() // 3
    victim = next(r for r in range(3 * shard, min(N_ROWS, 3 * shard + 3)) if r != bad_row())  # shares its batch
    _, plan = plan_of(f"run.dir={run}", *fit_args())
    sdf = zarr.open_group(plan.samples, mode="r+")[C.SDF]
    values = sdf[victim]
    values[::7] = np.nan
    sdf[victim] = values
    capsys.readouterr()
    assert main(["fit", f"run.dir={run}", *fit_args(), "fit.max_restarts=1"]) == 0
    assert f"{N_GOOD - 1} done, 2 failed" in capsys.readouterr().err
    a, b = _arrays(run), _arrays(clean)
    assert a[C.STATUS][victim] == FAILED and not a[C.ROW_WEIGHTS][victim].any()
    reason = str(a[C.REASON][victim])
    assert "diverged" in reason and "non-finite" in reason and "after 1 restart(s)" in reason, reason
    assert a[C.FIT_RESTARTS][victim] == 1
    others = [i for i in range(N_ROWS) if i != victim]
    for name in (C.FIT_STEPS, C.STATUS):
        np.testing.assert_array_equal(a[name][others], b[name][others], err_msg=name)
    # Equal up to float32 rounding: once the victim fails its slot is dropped, and a batch of
    # another size sums its matmuls in another order.
    for name in (C.ROW_WEIGHTS, C.FIT_LOSS):
        np.testing.assert_allclose(a[name][others], b[name][others], rtol=1e-4, atol=1e-5, err_msg=name)
    assert RowStore.open(str(run / C.WEIGHTS)).summary()["pending"] == 0


def test_every_shape_diverges(ingested, tmp_path, capsys):
    """A learning rate that overflows every shape: all fail with 'diverged', the job still ends
    (every shard committed) and exits 1."""
    run = copy_ingested(ingested, tmp_path)
    capsys.readouterr()
    # 1.0e+12, not 1e12: YAML 1.1 reads 1e12 as a string
    assert main(["fit", f"run.dir={run}", *fit_args(), "fit.lr=1.0e+12", "fit.max_restarts=0"]) == 1
    assert f"0 done, {N_ROWS} failed" in capsys.readouterr().err
    store = RowStore.open(str(run / C.WEIGHTS))
    a = _arrays(run)
    assert store.pending_shards() == [] and (store.status() == FAILED).all()
    assert all(r for r in a[C.REASON])
    good = _good_rows()
    assert all("diverged" in str(r) and "with lr 1e+12" in str(r) for r in a[C.REASON][good])
    assert (a[C.FIT_STEPS][good] == 25).all()  # caught at the first check
    assert not a[C.ROW_WEIGHTS].any()
    assert not (run / "recon").exists()


def test_finite_blowup_in_first_interval_is_divergence(ingested, tmp_path):
    run = copy_ingested(ingested, tmp_path)
    main(["fit", f"run.dir={run}", *fit_args(), "fit.lr=10000.0", "fit.max_restarts=0", "fit.recon_count=0"])
    a = _arrays(run)
    samples = RowStore.open(str(ingested / C.SAMPLES))
    field = make_field("mlp", "tiny")
    good = _good_rows()
    start = _initial_losses(field, field.init_rows(1, torch.Generator().manual_seed(SEED)), samples, good)
    blown = a[C.FIT_LOSS][good] > 1e3 * start
    assert blown.any()  # lr 1e4 sends most shapes' losses to ~1e11 (from ~0.3)
    assert (a[C.STATUS][good][blown] == FAILED).all(), a[C.FIT_LOSS][good]


# ------------------------------------------------------------------------------------ interrupted starts

def test_resume_after_kill_between_init_row_create_and_write(fitted, ingested, tmp_path, monkeypatch):
    """The driver creates the `init` array, then writes the start row into it: a kill -9 between
    the two leaves an array that reads as the fill value (zeros). The rerun must not take zeros for
    the shared start; it equals an uninterrupted run."""
    run = copy_ingested(ingested, tmp_path)

    def crash(*args, **kwargs):
        raise RuntimeError("killed before any shard was fitted")

    monkeypatch.setattr(pipeline, "_run_shards", crash)
    with pytest.raises(RuntimeError, match="killed before"):
        main(["fit", f"run.dir={run}", *fit_args()])
    monkeypatch.undo()
    init = (run / C.WEIGHTS).resolve() / C.INIT_ROW
    chunks = [p for p in (init / "c").rglob("*") if p.is_file()]
    assert chunks
    for p in chunks:  # the state a kill between create_array and the write leaves
        p.unlink()
    assert main(["fit", f"run.dir={run}", *fit_args()]) == 0
    _assert_stores_equal(run, fitted())
    np.testing.assert_array_equal(zarr.open_group(str(run / C.WEIGHTS))[C.INIT_ROW][:],
                                  zarr.open_group(str(fitted() / C.WEIGHTS))[C.INIT_ROW][:])


def test_fit_on_unfinished_ingest_is_refused(fitted, ingested, tmp_path, capsys):
    """Fitting a sample store whose ingest did not finish would commit the unsampled rows as failed
    weight rows for good: once ingest completes, the same fit finds nothing to do and they stay
    failed. Fit refuses instead (exit 2, naming the store and the fix), and works once ingest is
    complete."""
    run = copy_ingested(ingested, tmp_path)
    _, plan = plan_of(f"run.dir={run}", *fit_args())
    marker = zarr.open_group(plan.samples, mode="r+")[C.SHARD_DONE]
    assert marker[:].tolist() == [1, 1, 1]
    marker[2] = 0  # as if ingest was killed before committing its last shard
    capsys.readouterr()
    assert main(["fit", f"run.dir={run}", *fit_args()]) == 2
    err = capsys.readouterr().err
    assert plan.samples in err and "raywsl ingest" in err and "3 of the shapes" in err, err
    assert not (run / C.WEIGHTS).exists() and not run.exists()  # refused: nothing written
    marker[2] = 1  # ingest finished
    assert main(["fit", f"run.dir={run}", *fit_args()]) == 0
    _assert_stores_equal(run, fitted())


# ------------------------------------------------------------------------------------ streaming

def test_streaming_from_the_meshes_equals_fitting_the_stored_samples(fitted, ingested, tmp_path):
    """fit.samples=stream samples data.source inside the fit job (no samples.zarr is written) with
    ingest's sampler and seeds, so the weight store is bitwise the one fitted from the sample store."""
    stored = fitted()
    samples = RowStore.open(str(ingested / C.SAMPLES))
    run = tmp_path / "stream"  # a cache without any samples
    assert main(["fit", f"run.dir={run}", *fit_args(), "fit.samples=stream"]) == 0
    assert not (run / C.SAMPLES).exists()
    _assert_stores_equal(run, stored)
    weights = RowStore.open(str(run / C.WEIGHTS))
    assert weights.attrs["samples_fingerprint"] == samples.fingerprint  # what ingest would have made
    reason = str(weights.read(C.REASON, [bad_row()])[0])
    assert "cannot read" in reason and "garbage.ply" in reason
    metrics = json.loads((run / C.METRICS).read_text())
    assert 0 < metrics["recon_cd_median"] < 0.1  # the truth for the reconstructions is resampled
    assert not (tmp_path / C.CACHE / "ingest").exists()


# ------------------------------------------------------------------------------------ MLflow

def test_one_mlflow_run_per_run_folder_and_config(fitted, ingested, tmp_path):
    """The CLI records the run folder in one MLflow run (sqlite next to the run folders): fit's
    params, metrics, figures and every stage's fingerprint and reused flag; a later command with the
    same config resumes that run, one with other settings starts a new run (its params say so)."""
    import mlflow

    run = copy_ingested(ingested, tmp_path)
    assert main(["fit", f"run.dir={run}", *fit_args()]) == 0
    run_id = (run / C.MLFLOW_RUN).read_text()
    assert main(["fit", f"run.dir={run}", *fit_args()]) == 0  # nothing to refit: the same MLflow run
    assert (run / C.MLFLOW_RUN).read_text() == run_id
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    record = client.get_run(run_id)
    assert record.data.params["fit.steps"] == "100" and record.data.params["field.preset"] == "tiny"
    assert record.data.metrics["fit_done"] == N_GOOD and record.data.metrics["recon_count"] == 2
    assert 0 < record.data.metrics["recon_cd_median"] < 0.1
    assert record.data.tags["raywsl.fit"] == "finished" and record.info.status == "FINISHED"
    assert record.data.tags["stage.fit.reused"] == "True"  # the last command found it done
    assert len(record.data.tags["stage.fit.fingerprint"]) == 16
    figures = {a.path for a in client.list_artifacts(run_id, "figures")}
    assert {"figures/recon.png", "figures/fit_loss.png", f"figures/{C.FIT_CURVE}"} <= figures

    assert main(["fit", f"run.dir={run}", *fit_args(), "fit.recon_count=3"]) == 0
    new_id = (run / C.MLFLOW_RUN).read_text()
    new = client.get_run(new_id)
    assert new_id != run_id and new.data.params["fit.recon_count"] == "3"
    assert new.data.tags["raywsl.previous_run_id"] == run_id and new.data.metrics["recon_count"] == 3


def test_a_failed_command_ends_its_mlflow_run_as_failed(ingested, tmp_path, monkeypatch):
    import mlflow

    run = copy_ingested(ingested, tmp_path)

    def crash(*args, **kwargs):
        raise RuntimeError("the fit job broke")

    monkeypatch.setattr(pipeline, "_run_shards", crash)
    with pytest.raises(RuntimeError, match="the fit job broke"):
        main(["fit", f"run.dir={run}", *fit_args()])
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    record = client.get_run((run / C.MLFLOW_RUN).read_text())
    assert record.info.status == "FAILED" and record.data.tags["raywsl.fit"] == "failed"


# ------------------------------------------------------------------------------------ actor crash

@pytest.mark.timeout(120)
def test_blocks_after_an_actor_killer_still_run(ray_local):
    """The fitting actors' fault tolerance (pipeline.ACTOR_RESTARTS, TASK_RETRIES) on a one-actor pool: a block
    that kills its actor every time errors out after its retries, and the blocks that reach the pool
    later still run on a restarted actor. (With bounded actor restarts the actor dies for good, Ray
    Data never replaces it, and those blocks wait forever: CI hung there once.)"""
    import time

    import ray

    from raywsl.runtime import ray_remote_args

    def late(batch):  # block k reaches the pool 2k s after the start
        time.sleep(2 * int(batch["id"][0]))
        return batch

    class DiesOnBlock0:  # defined here: Ray's workers cannot import a test module
        def __call__(self, batch):
            if int(batch["id"][0]) == 0:
                os._exit(139)
            return batch

    ds = ray.data.range(4, override_num_blocks=4).map_batches(late, batch_size=None)
    with ray_remote_args():
        ds = ds.map_batches(DiesOnBlock0, batch_size=None, num_cpus=1, compute=ray.data.ActorPoolStrategy(size=1),
                            max_restarts=pipeline.ACTOR_RESTARTS, max_task_retries=pipeline.TASK_RETRIES)
    ds.context.max_errored_blocks = 4
    assert sorted(r["id"] for r in ds.iter_rows()) == [1, 2, 3]


@pytest.mark.long
def test_a_killed_actor_is_restarted_and_loses_no_rows(fitted, ingested, tmp_path):
    """The fitting actor's process dies (os._exit, as a segfault or an OOM kill would) in the
    middle of shard 1: Ray restarts the actor and retries the block; the store ends complete and
    bitwise equal to an undisturbed run."""
    run = copy_ingested(ingested, tmp_path)
    marker = tmp_path / "crashed"
    env = {**os.environ, "RAYWSL_CRASH_FIT_SHARD": "1", "RAYWSL_CRASH_MARKER": str(marker)}
    proc = subprocess.run([sys.executable, "-m", "raywsl.cli", "fit", f"run.dir={run}", *fit_args(),
                           "fit.recon_count=0"], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.exists()  # the actor did die once
    assert f"{N_GOOD} done, 1 failed" in proc.stderr
    _assert_stores_equal(run, fitted())


@pytest.mark.long
@pytest.mark.timeout(480)
def test_a_shape_that_crashes_its_actor_is_failed_alone(fitted, ingested, tmp_path):
    """A shape whose fitting kills the actor's process every time (as a segfault in a kernel would):
    its shard's actor dies through every restart, the driver fits that shard's shapes one by one in
    tasks of their own, fails only the culprit (with the reason) and refits the rest of the shard;
    the other rows are bitwise those of an undisturbed run. In stream mode (the probes sample their
    shape themselves) with warm start (the anchor is sampled and fitted in a Ray task, not in the
    driver; the store mode's probes read the sample store as the warm anchor does in
    test_fit_every_init_strategy)."""
    init, samples = ["fit.init=warm"], "stream"
    reference = fitted(*init)
    run = tmp_path / "stream"
    culprit_row = 3 if bad_row() != 3 else 4  # the first shape of shard 1: later shards arrive after it
    ids = [str(i) for i in RowStore.open(str(ingested / C.SAMPLES)).row_meta()[C.SHAPE_ID]]
    culprit = ids[culprit_row]
    env = {**os.environ, "RAYWSL_CRASH_FIT_SHAPE": culprit}
    proc = subprocess.run([sys.executable, "-m", "raywsl.cli", "fit", f"run.dir={run}", *fit_args(*init),
                           f"fit.samples={samples}", "fit.recon_count=0"], env=env, capture_output=True, text=True,
                          timeout=450)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{N_GOOD - 1} done, 2 failed" in proc.stderr
    got, want = _arrays(run), _arrays(reference)
    weights = RowStore.open(str(run / C.WEIGHTS))
    failures = {f["row"]: f["reason"] for f in weights.summary()["failures"]}
    assert sorted(failures) == sorted([culprit_row, bad_row()]) and got[C.STATUS][culprit_row] == FAILED
    assert "died" in failures[culprit_row] and "while fitting this shape, alone, 2 times" in failures[culprit_row]
    # The culprit's shard-mates were refitted in a smaller batch: equal to fitting alone up to float
    # rounding (a batch of one takes other matmul kernels); every other shard is bitwise unchanged.
    shard = weights.shard_rows(culprit_row // weights.shard_size)
    mates = [i for i in range(shard.start, shard.stop) if i != culprit_row]
    others = [i for i in range(N_ROWS) if i not in mates and i != culprit_row]
    for name in (C.ROW_WEIGHTS, C.FIT_LOSS, C.STATUS):
        assert got[name][others].tobytes() == want[name][others].tobytes(), name
        np.testing.assert_allclose(got[name][mates], want[name][mates], rtol=0, atol=1e-5, err_msg=name)

    # The warm-start anchor itself kills its process: nothing can start, and the error says which
    # shape and what to do (not a bare WorkerCrashedError).
    anchor = ids[0 if bad_row() else 1]
    proc = subprocess.run([sys.executable, "-m", "raywsl.cli", "fit", f"run.dir={tmp_path / 'anchor'}",
                           f"cache.dir={tmp_path / 'anchor-cache'}", *fit_args(*init), f"fit.samples={samples}",
                           "fit.recon_count=0"], env={**env, "RAYWSL_CRASH_FIT_SHAPE": anchor},
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert f"fit.init=warm: the anchor shape {anchor}: its worker process died" in proc.stderr, proc.stderr[-3000:]
    assert "pick another with fit.warm_shape" in proc.stderr


# ------------------------------------------------------------------------------------ reading the store back

def test_weight_store_reads_back_as_fields_and_tensors(fitted):
    """`field_of` rebuilds the field from the store's attributes, `shard_tensors` reads a shard as
    tensors, and the bound fields give back the stored loss on the stored samples."""
    from raywsl.models.fields import field_of
    from raywsl.store.weights import open_weights, shard_tensors

    run = fitted()
    store = open_weights(str(run / C.WEIGHTS))
    field = field_of(store)
    assert field.layout == make_field("mlp", "tiny").layout
    shard = shard_tensors(store, 0)
    rows = store.shard_rows(0)
    assert shard[C.ROW_WEIGHTS].shape == (rows.stop - rows.start, field.layout.size)
    assert shard[C.ROW_WEIGHTS].dtype == torch.float32 and shard[C.STATUS].tolist() == [DONE] * 3
    assert shard[C.SHAPE_ID] == [str(i) for i in store.row_meta(rows)[C.SHAPE_ID]]
    samples = RowStore.open(str(run / C.SAMPLES))
    points = torch.from_numpy(samples.group[C.POINTS][rows])
    sdf = torch.from_numpy(samples.group[C.SDF][rows])
    with torch.no_grad():
        loss = (field.bind(shard[C.ROW_WEIGHTS])(points) - sdf).abs().mean(1)
    np.testing.assert_allclose(loss.numpy(), shard[C.FIT_LOSS].numpy(), rtol=0.5)  # all points vs the last windows
    with pytest.raises(StoreError, match="a samples store, expected weights"):
        open_weights(str(run / C.SAMPLES))


def test_asym_field_store_keeps_its_masks(fitted):
    """field.asym: the rows hold the trainable entries only, the masks are saved in the store
    (frozen/), and field_of rebuilds the same masked field from the store."""
    from raywsl.models.fields import field_of
    from raywsl.store.weights import open_weights

    run = fitted("field.asym=true", "field.kappa=2.0")
    store = open_weights(str(run / C.WEIGHTS))
    field = field_of(store)
    assert field.asym and field.layout.size == store.attrs["params"] < make_field("mlp", "tiny").layout.size
    assert store.group[C.ROW_WEIGHTS].shape[1] == field.layout.size
    for name, tensor in field.frozen().items():
        np.testing.assert_array_equal(store.group[C.FROZEN][name][:], tensor.numpy())
    assert store.attrs["frozen_fingerprint"] == field.frozen_fingerprint() != make_field("mlp", "tiny").frozen_fingerprint()
    assert (store.status() == DONE).sum() == N_GOOD
