"""End-to-end `raywsl fit` on a real local Ray: a small ingested corpus (+ one broken mesh) ->
weights.zarr, recon/ and metrics.json, with every init strategy, resume after kill -9, two actors,
fingerprint refusal, inspect, and shapes that diverge inside the job."""

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import kill9_when

from raywsl import layout as L
from raywsl.cli import main
from raywsl.data.corpus import write_corpus
from raywsl.fit import pipeline
from raywsl.fit.fields import Layout, make_field
from raywsl.store.rows import DONE, FAILED, RowStore, StoreError

pytestmark = pytest.mark.ray

N_GOOD = 10
BAD_ROW = 5  # the broken mesh sits in the middle of the manifest: weight shard 1 of [0,3) [3,6) [6,9) [9,11)
N_ROWS = N_GOOD + 1
SEED = 0
INGEST = ["ingest.points=4096", "ingest.surface_points=1024", "ingest.shard_size=4"]
FIT = ["field.preset=tiny", "fit.steps=100", "fit.points_per_step=512", "fit.check_every=25",
       "fit.batch_size=4", "fit.shard_size=3", "fit.recon_count=2", "fit.recon_resolution=32"]
FIT_ARRAYS = (L.ROW_WEIGHTS, L.FIT_LOSS, L.FIT_STEPS, L.FIT_RESTARTS, L.STATUS, L.REASON, L.SHARD_DONE)


# ------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def ingested(ray_local, tmp_path_factory):
    """A run folder with samples.zarr of 10 corpus shapes and one garbage .ply (row BAD_ROW)."""
    root = tmp_path_factory.mktemp("fitcorpus")
    manifest = write_corpus(root / "corpus", N_GOOD, seed=0, progress=False)
    with open(manifest) as f:
        rows = [{"id": r["id"], "path": str(manifest.parent / r["path"]), "category": r["category"]}
                for r in csv.DictReader(f)]
    bad = root / "garbage.ply"
    bad.write_bytes(b"this is not a mesh \x00\x01\x02" * 10)
    rows.insert(BAD_ROW, {"id": "bad-garbage", "path": str(bad), "category": "bad"})
    source = root / "all.csv"
    with open(source, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "path", "category"])
        w.writeheader()
        w.writerows(rows)
    run = root / "run"
    assert main(["ingest", f"data.source={source}", f"run.dir={run}", *INGEST]) == 0
    samples = RowStore.open(str(run / L.SAMPLES))
    status = samples.status()
    assert status[BAD_ROW] == FAILED and (np.delete(status, BAD_ROW) == DONE).all()
    return run


@pytest.fixture(scope="module")
def fitted(ingested, tmp_path_factory):
    """fitted(*overrides) -> a run folder fitted with FIT + overrides (in-process, once per module
    and overrides). Tests must not change it: copy it first (`_copy`)."""
    cache = {}

    def get(*extra):
        if extra not in cache:
            run = _copy(ingested, tmp_path_factory.mktemp("fitted"))
            assert main(["fit", f"run.dir={run}", *FIT, *extra]) == 0
            cache[extra] = run
        return cache[extra]

    return get


def _copy(run: Path, parent: Path, name: str = "run") -> Path:
    dst = parent / name
    shutil.copytree(run, dst)
    return dst


def _arrays(run: Path, names=FIT_ARRAYS) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(run / L.WEIGHTS), mode="r")
    return {name: g[name][:] for name in names}


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
    pts = torch.from_numpy(samples.group[L.POINTS].get_orthogonal_selection((idx, slice(None), slice(None))))
    sdf = torch.from_numpy(samples.group[L.SDF].get_orthogonal_selection((idx, slice(None))))
    rows = rows.expand(len(idx), -1) if rows.shape[0] == 1 else rows
    with torch.no_grad():
        pred = field.forward(field.layout.unflatten(rows), pts)
    return (pred - sdf).abs().mean(1).numpy()


def _good_rows() -> np.ndarray:
    return np.array([i for i in range(N_ROWS) if i != BAD_ROW])


# ------------------------------------------------------------------------------------ 1. init strategies

@pytest.mark.parametrize("init", ["shared", "random", "warm", "warm-chosen"])
def test_fit_every_init_strategy(ingested, fitted, init, capsys):
    samples = RowStore.open(str(ingested / L.SAMPLES))
    ids = [str(i) for i in samples.row_meta()[L.SHAPE_ID]]
    extra = [f"fit.init={init.split('-')[0]}"]
    if init == "warm-chosen":
        extra.append(f"fit.warm_shape={ids[7]}")
    capsys.readouterr()
    run = fitted(*extra)
    out = capsys.readouterr().out
    assert f"{N_GOOD} done, 1 failed; recon Chamfer" in out

    store = RowStore.open(str(run / L.WEIGHTS), kind="weights")
    g = store.group
    a = _arrays(run)
    good = _good_rows()
    status = store.status()
    assert (status[good] == DONE).all() and status[BAD_ROW] == FAILED
    assert store.pending_shards() == [] and store.n_shards == 4 and store.shard_size == 3
    assert (a[L.FIT_STEPS][good] == 100).all() and a[L.FIT_STEPS][BAD_ROW] == 0
    assert np.isfinite(a[L.FIT_LOSS][good]).all() and (a[L.FIT_LOSS][good] > 0).all()
    assert (a[L.FIT_RESTARTS] == 0).all()
    assert (a[L.REASON][good] == "").all()
    reason = str(a[L.REASON][BAD_ROW])
    assert reason.startswith("no samples to fit: ") and "cannot read" in reason and "garbage.ply" in reason
    assert str(samples.group[L.REASON][BAD_ROW]) in reason  # ingest's own reason, passed on
    assert not a[L.ROW_WEIGHTS][BAD_ROW].any()
    assert np.isfinite(a[L.ROW_WEIGHTS][good]).all() and (np.abs(a[L.ROW_WEIGHTS][good]).sum(1) > 0).all()
    assert a[L.ROW_WEIGHTS].dtype == np.float32 and a[L.FIT_STEPS].dtype == np.int32
    np.testing.assert_array_equal(store.row_meta()[L.SHAPE_ID], ids)

    # Attributes: what the field is and how the store was made.
    attrs = store.attrs
    field = make_field("mlp", "tiny")
    layout = Layout.from_json(attrs["layout"])
    assert attrs["field_type"] == "mlp" and attrs["field_preset"] == "tiny"
    assert layout == field.layout and sum(layout.sizes) == attrs["params"] == g[L.ROW_WEIGHTS].shape[1] == 1601
    assert g[L.ROW_WEIGHTS].shape == (N_ROWS, 1601)
    assert attrs["init"] == extra[0].split("=")[1] and attrs["seed"] == SEED
    assert attrs["samples_fingerprint"] == samples.fingerprint
    assert attrs["fit"]["steps"] == 100 and attrs["fit"]["shard_size"] == 3
    anchor = {"shared": "", "random": "", "warm": ids[0], "warm-chosen": ids[7]}[init]
    assert attrs["warm_shape"] == anchor

    # Start rows, and the loss they give on the stored samples.
    seeded = field.init_rows(1, torch.Generator().manual_seed(SEED))
    if init == "random":
        assert L.INIT_ROW not in g
        starts = torch.stack([pipeline.init_row(field, "random", SEED, ids[i], None) for i in good])
        assert not torch.equal(starts[0], starts[1]) and not torch.equal(starts[0], seeded[0])
        torch.testing.assert_close(pipeline.init_row(field, "random", SEED, ids[0], None), starts[0],
                                   rtol=0, atol=0)  # seeded per shape: reproducible
    else:
        init_row = torch.from_numpy(g[L.INIT_ROW][:])
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
            assert anchor_loss < 2 * a[L.FIT_LOSS][k]
    # Fitting happened: every shape ends far below the loss of where it started and of the
    # seeded random draw.
    start_loss = _initial_losses(field, starts, samples, good)
    random_loss = _initial_losses(field, seeded, samples, good)
    fitted_loss = a[L.FIT_LOSS][good]
    if init in ("shared", "random"):
        assert (fitted_loss < 0.5 * start_loss).all(), (fitted_loss, start_loss)
    assert (fitted_loss < 0.5 * random_loss).all(), (fitted_loss, random_loss)
    # The stored weights are the fit's: their loss on all samples is close to the reported one.
    final = _initial_losses(field, torch.from_numpy(a[L.ROW_WEIGHTS][good]), samples, good)
    np.testing.assert_allclose(final, fitted_loss, rtol=0.5)

    # Reconstructions and metrics.
    metrics = json.loads((run / L.METRICS).read_text())
    assert metrics["recon_count"] == 2
    assert 0 < metrics["recon_cd_median"] < 0.1 and 0.2 < metrics["recon_iou_mean"] <= 1
    assert [s["shape_id"] for s in metrics["recon"]["shapes"]] == ids[:2]
    assert metrics["fit_loss_median"] == pytest.approx(float(np.median(fitted_loss)), rel=1e-6)
    recon = run / L.RECON
    assert sorted(p.name for p in recon.glob("*.ply")) == sorted(f"{i}.ply" for i in ids[:2])
    assert (recon / "recon.png").stat().st_size > 1000


# ------------------------------------------------------------------------------------ 2. kill -9, resume

def _shard_files(run: Path, shards) -> dict[str, tuple[int, bytes]]:
    """(mtime_ns, bytes) of every storage object of the given weight shards."""
    out = {}
    for name in FIT_ARRAYS:
        for k in shards:
            base = run / L.WEIGHTS / name / "c" / str(k)
            for p in ([base] if base.is_file() else base.rglob("*") if base.exists() else []):
                if p.is_file():
                    out[str(p.relative_to(run))] = (p.stat().st_mtime_ns, p.read_bytes())
    return out


def test_kill9_then_resume_equals_uninterrupted(ingested, tmp_path, caplog):
    """kill -9 the fit driver (and its Ray) once some weight shards are committed; the rerun
    refits only the others and the store equals an uninterrupted run's, bit for bit."""
    # One shape per shard and more steps: shards commit one by one, slowly enough to kill between.
    args = [*FIT, "fit.shard_size=1", "fit.steps=300", "fit.recon_count=0"]
    killed = _copy(ingested, tmp_path, "killed")

    def committed() -> int:
        try:
            return int(zarr.open_group(str(killed / L.WEIGHTS), mode="r")[L.SHARD_DONE][:].sum())
        except Exception:  # not created yet, or being created
            return 0

    kill9_when(["fit", f"run.dir={killed}", *args], lambda: committed() >= 1, timeout=150)
    partial = RowStore.open(str(killed / L.WEIGHTS))
    done_before = np.flatnonzero(partial.shards_done())
    assert 0 < len(done_before) < partial.n_shards == N_ROWS
    before = _shard_files(killed, done_before)
    assert before

    caplog.set_level(logging.INFO, logger="raywsl")
    assert main(["fit", f"run.dir={killed}", *args]) == 0
    starts = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fit: 11 shapes")]
    assert len(starts) == 1 and f"{N_ROWS} shards ({len(done_before)} done)" in starts[0]
    assert _shard_files(killed, done_before) == before  # committed shards were not refitted

    full = _copy(ingested, tmp_path, "full")
    assert main(["fit", f"run.dir={full}", *args]) == 0
    _assert_stores_equal(killed, full)
    s = RowStore.open(str(killed / L.WEIGHTS)).summary()
    assert (s["done"], s["failed"], s["pending"]) == (N_GOOD, 1, 0)
    g = zarr.open_group(str(killed / L.WEIGHTS), mode="r")
    np.testing.assert_array_equal(g[L.INIT_ROW][:], zarr.open_group(str(full / L.WEIGHTS), mode="r")[L.INIT_ROW][:])


# ------------------------------------------------------------------------------------ 3. two actors

def test_two_actors_equal_one(fitted, tmp_path, capsys):
    one = fitted()
    two = _copy(fitted(), tmp_path)
    shutil.rmtree(two / L.WEIGHTS)
    capsys.readouterr()
    assert main(["fit", f"run.dir={two}", *FIT, "fit.actors=2"]) == 0
    assert f"{N_GOOD} done, 1 failed" in capsys.readouterr().out
    _assert_stores_equal(one, two)
    s = RowStore.open(str(two / L.WEIGHTS)).summary()
    assert s["done"] + s["failed"] == s["rows"] == N_ROWS and s["pending"] == 0
    assert s["shards"] == {"size": 3, "total": 4, "done": 4}
    # fit.actors does not decide the output: both stores have the same fingerprint.
    assert s["fingerprint"] == RowStore.open(str(one / L.WEIGHTS)).fingerprint


# ------------------------------------------------------------------------------------ 4. fingerprint

def test_fingerprint_mismatch_refused_then_restart(fitted, tmp_path, capsys):
    run = _copy(fitted(), tmp_path)
    before = _arrays(run)
    capsys.readouterr()
    assert main(["fit", f"run.dir={run}", *FIT, "fit.steps=50"]) == 2
    err = capsys.readouterr().err
    assert "raywsl fit: error:" in err and str(run / L.WEIGHTS) in err
    assert "different config" in err and "--restart" in err
    _assert_stores_equal(before, _arrays(run))  # the refused run changed nothing

    # The same config again resumes (nothing to do) instead of refusing.
    assert main(["fit", f"run.dir={run}", *FIT]) == 0

    assert main(["fit", f"run.dir={run}", *FIT, "fit.steps=50", "--restart"]) == 0
    assert f"{N_GOOD} done, 1 failed" in capsys.readouterr().out
    store = RowStore.open(str(run / L.WEIGHTS))
    steps = store.group[L.FIT_STEPS][:]
    assert (np.delete(steps, BAD_ROW) == 50).all() and store.attrs["fit"]["steps"] == 50


# ------------------------------------------------------------------------------------ 5. inspect

def test_inspect_weight_store(fitted, capsys):
    run = fitted()
    capsys.readouterr()
    assert main(["inspect", str(run / L.WEIGHTS), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "weights" and info["path"] == str(run / L.WEIGHTS)
    assert (info["rows"], info["done"], info["failed"], info["pending"]) == (N_ROWS, N_GOOD, 1, 0)
    assert info["shards"] == {"size": 3, "total": 4, "done": 4}
    assert info["arrays"][L.ROW_WEIGHTS] == {"shape": [N_ROWS, 1601], "dtype": "float32"}
    assert info["arrays"][L.FIT_STEPS] == {"shape": [N_ROWS], "dtype": "int32"}
    assert info["arrays"][L.INIT_ROW] == {"shape": [1601], "dtype": "float32"}
    assert [(f["row"], f["shape_id"]) for f in info["failures"]] == [(BAD_ROW, "bad-garbage")]
    assert info["failures"][0]["reason"].startswith("no samples to fit")

    assert main(["inspect", str(run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["stores"]) == {"samples", "weights"} and info["stores"]["weights"]["done"] == N_GOOD
    assert main(["inspect", str(run / L.WEIGHTS)]) == 0
    assert "weights store" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ 6. divergence

def test_one_shape_diverges_the_others_do_not_notice(fitted, ingested, tmp_path, capsys):
    """A shape whose samples hold NaN (a corrupt input) diverges: it fails with the reason after
    its restart, its shard still commits, the job ends with exit 0, and every other shape (one of
    them shares its batch) is fitted as without it, up to float rounding."""
    clean = fitted()
    run = _copy(ingested, tmp_path)
    victim = 4  # shard 1 = rows 3, 4 and the broken mesh 5
    sdf = zarr.open_group(str(run / L.SAMPLES), mode="r+")[L.SDF]
    values = sdf[victim]
    values[::7] = np.nan
    sdf[victim] = values
    capsys.readouterr()
    assert main(["fit", f"run.dir={run}", *FIT, "fit.max_restarts=1"]) == 0
    assert f"{N_GOOD - 1} done, 2 failed" in capsys.readouterr().out
    a, b = _arrays(run), _arrays(clean)
    assert a[L.STATUS][victim] == FAILED and not a[L.ROW_WEIGHTS][victim].any()
    reason = str(a[L.REASON][victim])
    assert "diverged" in reason and "non-finite" in reason and "after 1 restart(s)" in reason, reason
    assert a[L.FIT_RESTARTS][victim] == 1
    others = [i for i in range(N_ROWS) if i != victim]
    for name in (L.FIT_STEPS, L.STATUS):
        np.testing.assert_array_equal(a[name][others], b[name][others], err_msg=name)
    # Equal up to float32 rounding: once the victim fails its slot is dropped, and a batch of
    # another size sums its matmuls in another order.
    for name in (L.ROW_WEIGHTS, L.FIT_LOSS):
        np.testing.assert_allclose(a[name][others], b[name][others], rtol=1e-4, atol=1e-5, err_msg=name)
    assert RowStore.open(str(run / L.WEIGHTS)).summary()["pending"] == 0


def test_every_shape_diverges(ingested, tmp_path, capsys):
    """A learning rate that overflows every shape: all fail with 'diverged', the job still ends
    (every shard committed) and exits 1."""
    run = _copy(ingested, tmp_path)
    capsys.readouterr()
    # 1.0e+12, not 1e12: YAML 1.1 reads 1e12 as a string
    assert main(["fit", f"run.dir={run}", *FIT, "fit.lr=1.0e+12", "fit.max_restarts=0"]) == 1
    assert f"0 done, {N_ROWS} failed" in capsys.readouterr().out
    store = RowStore.open(str(run / L.WEIGHTS))
    a = _arrays(run)
    assert store.pending_shards() == [] and (store.status() == FAILED).all()
    assert all(r for r in a[L.REASON])
    good = _good_rows()
    assert all("diverged" in str(r) and "with lr 1e+12" in str(r) for r in a[L.REASON][good])
    assert (a[L.FIT_STEPS][good] == 25).all()  # caught at the first check
    assert not a[L.ROW_WEIGHTS].any()
    assert not (run / L.RECON).exists()


def test_finite_blowup_in_first_interval_is_divergence(ingested, tmp_path):
    run = _copy(ingested, tmp_path)
    main(["fit", f"run.dir={run}", *FIT, "fit.lr=10000.0", "fit.max_restarts=0", "fit.recon_count=0"])
    a = _arrays(run)
    samples = RowStore.open(str(run / L.SAMPLES))
    field = make_field("mlp", "tiny")
    good = _good_rows()
    start = _initial_losses(field, field.init_rows(1, torch.Generator().manual_seed(SEED)), samples, good)
    blown = a[L.FIT_LOSS][good] > 1e3 * start
    assert blown.any()  # lr 1e4 sends most shapes' losses to ~1e11 (from ~0.3)
    assert (a[L.STATUS][good][blown] == FAILED).all(), a[L.FIT_LOSS][good]


# ------------------------------------------------------------------------------------ interrupted starts

def test_resume_after_kill_between_init_row_create_and_write(fitted, ingested, tmp_path, monkeypatch):
    """The driver creates the `init` array, then writes the start row into it: a kill -9 between
    the two leaves an array that reads as the fill value (zeros). The rerun must not take zeros for
    the shared start; it equals an uninterrupted run."""
    run = _copy(ingested, tmp_path)

    def crash(*args, **kwargs):
        raise RuntimeError("killed before any shard was fitted")

    monkeypatch.setattr(pipeline, "_run_shards", crash)
    with pytest.raises(RuntimeError, match="killed before"):
        main(["fit", f"run.dir={run}", *FIT])
    monkeypatch.undo()
    init = run / L.WEIGHTS / L.INIT_ROW
    chunks = [p for p in (init / "c").rglob("*") if p.is_file()]
    assert chunks
    for p in chunks:  # the state a kill between create_array and the write leaves
        p.unlink()
    assert main(["fit", f"run.dir={run}", *FIT]) == 0
    _assert_stores_equal(run, fitted())
    np.testing.assert_array_equal(zarr.open_group(str(run / L.WEIGHTS))[L.INIT_ROW][:],
                                  zarr.open_group(str(fitted() / L.WEIGHTS))[L.INIT_ROW][:])


def test_fit_on_unfinished_ingest_is_refused(fitted, ingested, tmp_path, capsys):
    """Fitting a sample store whose ingest did not finish would commit the unsampled rows as failed
    weight rows for good: once ingest completes, the same fit finds nothing to do and they stay
    failed. Fit refuses instead (exit 2, naming the store and the fix), and works once ingest is
    complete."""
    run = _copy(ingested, tmp_path)
    marker = zarr.open_group(str(run / L.SAMPLES), mode="r+")[L.SHARD_DONE]
    assert marker[:].tolist() == [1, 1, 1]
    marker[2] = 0  # as if ingest was killed before committing its last shard
    capsys.readouterr()
    assert main(["fit", f"run.dir={run}", *FIT]) == 2
    err = capsys.readouterr().err
    assert str(run / L.SAMPLES) in err and "raywsl ingest" in err and "3 shapes" in err, err
    assert not (run / L.WEIGHTS).exists()
    marker[2] = 1  # ingest finished
    assert main(["fit", f"run.dir={run}", *FIT]) == 0
    _assert_stores_equal(run, fitted())


# ------------------------------------------------------------------------------------ streaming

def test_streaming_from_the_meshes_equals_fitting_the_stored_samples(fitted, ingested, tmp_path):
    """fit.samples=stream samples data.source inside the fit job (no samples.zarr is written) with
    ingest's sampler and seeds, so the weight store is bitwise the one fitted from the sample store."""
    stored = fitted()
    samples = RowStore.open(str(ingested / L.SAMPLES))
    run = tmp_path / "stream"
    assert main(["fit", f"run.dir={run}", f"data.source={samples.attrs['data_source']}", "fit.samples=stream",
                 *INGEST, *FIT]) == 0
    assert not (run / L.SAMPLES).exists()
    _assert_stores_equal(run, stored)
    weights = RowStore.open(str(run / L.WEIGHTS))
    assert weights.attrs["samples_fingerprint"] == samples.fingerprint  # what ingest would have made
    reason = str(weights.group[L.REASON][BAD_ROW])
    assert "cannot read" in reason and "garbage.ply" in reason
    metrics = json.loads((run / L.METRICS).read_text())
    assert 0 < metrics["recon_cd_median"] < 0.1  # the truth for the reconstructions is resampled


# ------------------------------------------------------------------------------------ MLflow

def test_one_mlflow_run_per_run_folder(fitted, tmp_path):
    """The CLI records the run folder in one MLflow run (sqlite next to the run folders): fit's
    params, metrics and figures; a later verb on the same folder resumes that run."""
    import mlflow

    run = _copy(fitted(), tmp_path)  # its MLflow run is in another store: the first call starts one here
    assert main(["fit", f"run.dir={run}", *FIT]) == 0  # nothing to refit: reconstructions only
    run_id = (run / L.MLFLOW_RUN).read_text()
    assert main(["fit", f"run.dir={run}", *FIT, "fit.recon_count=3"]) == 0
    assert (run / L.MLFLOW_RUN).read_text() == run_id
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    record = client.get_run(run_id)
    assert record.data.params["fit.steps"] == "100" and record.data.params["field.preset"] == "tiny"
    assert record.data.metrics["fit_done"] == N_GOOD and record.data.metrics["recon_count"] == 3
    assert 0 < record.data.metrics["recon_cd_median"] < 0.1
    assert record.data.tags["raywsl.fit"] == "finished"
    assert "param_changed.fit.recon_count" in record.data.tags  # write-once params: the change is a tag
    figures = {a.path for a in client.list_artifacts(run_id, "figures")}
    assert {"figures/recon.png", "figures/fit_loss.png"} <= figures


# ------------------------------------------------------------------------------------ actor crash

def test_a_killed_actor_is_restarted_and_loses_no_rows(fitted, ingested, tmp_path):
    """The fitting actor's process dies (os._exit, as a segfault or an OOM kill would) in the
    middle of shard 1: Ray restarts the actor and retries the block; the store ends complete and
    bitwise equal to an undisturbed run."""
    run = _copy(ingested, tmp_path)
    marker = tmp_path / "crashed"
    env = {**os.environ, "RAYWSL_CRASH_FIT_SHARD": "1", "RAYWSL_CRASH_MARKER": str(marker)}
    proc = subprocess.run([sys.executable, "-m", "raywsl.cli", "fit", f"run.dir={run}", *FIT,
                           "fit.recon_count=0"], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.exists()  # the actor did die once
    assert f"{N_GOOD} done, 1 failed" in proc.stdout
    _assert_stores_equal(run, fitted())


# ------------------------------------------------------------------------------------ reading the store back

def test_weight_store_reads_back_as_fields_and_tensors(fitted):
    """`field_of` rebuilds the field from the store's attributes, `shard_tensors` reads a shard as
    tensors, and the bound fields give back the stored loss on the stored samples."""
    from raywsl.store.weights import field_of, open_weights, shard_tensors

    run = fitted()
    store = open_weights(str(run / L.WEIGHTS))
    field = field_of(store)
    assert field.layout == make_field("mlp", "tiny").layout
    shard = shard_tensors(store, 0)
    rows = store.shard_rows(0)
    assert shard[L.ROW_WEIGHTS].shape == (rows.stop - rows.start, field.layout.size)
    assert shard[L.ROW_WEIGHTS].dtype == torch.float32 and shard[L.STATUS].tolist() == [DONE] * 3
    assert shard[L.SHAPE_ID] == [str(i) for i in store.row_meta(rows)[L.SHAPE_ID]]
    samples = RowStore.open(str(run / L.SAMPLES))
    points = torch.from_numpy(samples.group[L.POINTS][rows])
    sdf = torch.from_numpy(samples.group[L.SDF][rows])
    with torch.no_grad():
        loss = (field.bind(shard[L.ROW_WEIGHTS])(points) - sdf).abs().mean(1)
    np.testing.assert_allclose(loss.numpy(), shard[L.FIT_LOSS].numpy(), rtol=0.5)  # all points vs the last windows
    with pytest.raises(StoreError, match="a samples store, expected weights"):
        open_weights(str(run / L.SAMPLES))


def test_asym_field_store_keeps_its_masks(fitted):
    """field.asym: the rows hold the trainable entries only, the masks are saved in the store
    (frozen/), and field_of rebuilds the same masked field from the store."""
    from raywsl.store.weights import field_of, open_weights

    run = fitted("field.asym=true", "field.kappa=2.0")
    store = open_weights(str(run / L.WEIGHTS))
    field = field_of(store)
    assert field.asym and field.layout.size == store.attrs["params"] < make_field("mlp", "tiny").layout.size
    assert store.group[L.ROW_WEIGHTS].shape[1] == field.layout.size
    for name, tensor in field.frozen().items():
        np.testing.assert_array_equal(store.group[L.FROZEN][name][:], tensor.numpy())
    assert store.attrs["frozen_fingerprint"] == field.frozen_fingerprint() != make_field("mlp", "tiny").frozen_fingerprint()
    assert (store.status() == DONE).sum() == N_GOOD
