"""End-to-end ingest on a real local Ray: generated corpus + broken files -> samples.zarr."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh

from conftest import BROKEN_KINDS, HUGE_FACES, kill9_when, plan_of, write_bad_meshes
from raywsl import contract as C
from raywsl.cli import main
from raywsl.config import load_config
from raywsl.data.corpus import write_corpus
from raywsl.data.meshes import normalise
from raywsl.geometry.sdf import signed_distance
from raywsl.store.rows import DONE, FAILED, RowStore
from raywsl.store.split import held_out

pytestmark = pytest.mark.ray

SMALL = ["ingest.points=2048", "ingest.surface_points=512", "ingest.shard_size=4",
         f"ingest.max_faces={HUGE_FACES - 1}"]


@pytest.fixture(scope="module")
def mixed_source(tmp_path_factory):
    """20 corpus shapes plus one file of each broken kind and one open mesh, in one manifest."""
    root = tmp_path_factory.mktemp("mixed")
    manifest = Path(write_corpus(root / "corpus", 20, seed=0))
    bad = write_bad_meshes(root / "bad")
    with open(manifest) as f:
        rows = [{"id": r["id"], "path": str(manifest.parent / r["path"]), "category": r["category"]}
                for r in csv.DictReader(f)]
    rows += [{"id": f"bad-{kind}", "path": str(path), "category": "bad"} for kind, path in bad.items()]
    rows[-1]["category"] = "open"
    out = root / "all.csv"
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "path", "category"])
        w.writeheader()
        w.writerows(rows)
    return out


def test_ingest_mixed_good_and_broken(ray_local, mixed_source, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["ingest", f"data.source={mixed_source}", f"run.dir={run_dir}", *SMALL])
    assert code == 0
    assert "21 done, 7 failed" in capsys.readouterr().err

    code = main(["inspect", str(run_dir), "--json"])
    info = json.loads(capsys.readouterr().out)
    s = info["stores"]["samples"]
    assert info["kind"] == "run" and info["config"]["ingest"]["points"] == 2048
    assert (s["rows"], s["done"], s["failed"], s["pending"]) == (28, 21, 7, 0)
    assert s["shards"] == {"size": 4, "total": 7, "done": 7}
    assert s["arrays"][C.POINTS]["shape"] == [28, 2048, 3] and s["arrays"][C.NORMALS]["shape"] == [28, 512, 3]
    failures = {f["shape_id"]: f for f in s["failures"]}
    assert set(failures) == {f"bad-{k}" for k in BROKEN_KINDS}
    for kind, words in BROKEN_KINDS.items():
        f = failures[f"bad-{kind}"]
        assert words in f["reason"] and f["source"] in f["reason"], f

    store = RowStore.open(str(run_dir / C.SAMPLES))
    status = store.status()
    meta = store.row_meta()
    g = store.group
    # Rows in the fixed order of store/split.py: the held-out shapes first, the same split as by hash.
    ids = meta[C.SHAPE_ID].tolist()
    test = held_out(ids, 0, 0.2)
    assert store.attrs[C.Attr.HELD_OUT] == test.sum() > 0 and test[: test.sum()].all()
    assert sorted(ids) == sorted(r["id"] for r in csv.DictReader(open(mixed_source)))
    done = np.flatnonzero(status == DONE)
    assert len(done) == 21 and (status[status != DONE] == FAILED).all()
    failed = status == FAILED
    assert not g[C.POINTS][:][failed].any() and (store.read(C.REASON)[~failed] == "").all()
    # Contents: normalised frame, exact signed distances, unit normals, a faithful center/scale.
    for i in done[[0, 7, -1]]:
        uri = str(meta[C.SOURCE][i])
        mesh = trimesh.load(uri, force="mesh")
        center, scale = g[C.CENTER][i], g[C.SCALE][i]
        normed, c2, s2 = normalise(trimesh.Trimesh(mesh.vertices, mesh.faces), margin=0.03)
        np.testing.assert_allclose(center, c2, atol=1e-9)
        assert scale == pytest.approx(s2)
        pts, sdf = g[C.POINTS][i], g[C.SDF][i]
        np.testing.assert_allclose(sdf[:300], signed_distance(normed, pts[:300]), atol=1e-5)
        surface = g[C.SURFACE][i]
        assert np.linalg.norm(surface, axis=1).max() <= 1 / 1.03 + 1e-5
        np.testing.assert_allclose(np.linalg.norm(g[C.NORMALS][i], axis=1), 1, atol=1e-4)
        assert (sdf < 0).mean() > 0.05 and (sdf > 0).mean() > 0.05
    assert str(meta[C.CATEGORY][ids.index("bad-open")]) == "open" and status[ids.index("bad-open")] == DONE


def test_another_config_is_another_artifact_and_restart_recomputes(ray_local, mixed_source, tmp_path, capsys):
    args = [f"data.source={mixed_source}", f"run.dir={tmp_path / 'run'}", "ingest.points=256",
            "ingest.surface_points=64", "ingest.shard_size=16"]
    assert main(["ingest", *args]) == 0
    first = (tmp_path / "run" / C.SAMPLES).resolve()
    assert main(["ingest", *args, "ingest.points=512"]) == 0  # no refusal: a store of its own
    second = (tmp_path / "run" / C.SAMPLES).resolve()
    assert second != first and RowStore.open(str(first)).group[C.POINTS].shape[1] == 256
    assert RowStore.open(str(second)).group[C.POINTS].shape[1] == 512
    stages = json.loads((tmp_path / "run" / C.STAGES_FILE).read_text())["stages"]
    assert str(second).startswith(str(tmp_path / "cache" / "ingest")) and not stages["ingest"]["reused"]
    assert main(["ingest", *args, "ingest.points=512"]) == 0
    assert json.loads((tmp_path / "run" / C.STAGES_FILE).read_text())["stages"]["ingest"]["reused"]
    capsys.readouterr()
    created = RowStore.open(str(second)).attrs[C.Attr.CREATED]
    marker = second / C.SHARD_DONE / "c" / "0"
    before = marker.stat().st_mtime_ns
    assert main(["ingest", *args, "ingest.points=512", "--restart"]) == 0
    assert marker.stat().st_mtime_ns != before and "computed" in capsys.readouterr().err
    assert RowStore.open(str(second)).attrs[C.Attr.CREATED] >= created


def _store_arrays(path):
    g = RowStore.open(str(path)).group
    return {name: arr[:] for name, arr in g.arrays()}


@pytest.mark.long
def test_kill9_then_resume_equals_uninterrupted(ray_local, tmp_path):
    """kill -9 the ingest driver mid-run, rerun: no lost, duplicated or half-written rows, and the
    store equals an uninterrupted run's."""
    source = write_corpus(tmp_path / "corpus", 24, seed=1)
    args = [f"data.source={source}", "ingest.points=60000", "ingest.surface_points=256",
            "ingest.shard_size=2"]
    killed_dir = tmp_path / "killed"
    _, plan = plan_of(*args, f"run.dir={killed_dir}")

    def committed() -> int:
        marker = Path(plan.samples) / C.SHARD_DONE
        return len([p for p in marker.rglob("*") if p.is_file() and p.name != "zarr.json"]) if marker.exists() else 0

    kill9_when(["ingest", *args, f"run.dir={killed_dir}"], lambda: committed() >= 2, timeout=120)
    partial = RowStore.open(plan.samples)
    n_done_before = partial.n_shards - len(partial.pending_shards())
    assert 0 < n_done_before < partial.n_shards

    assert main(["ingest", *args, f"run.dir={killed_dir}"]) == 0
    # the uninterrupted run in a cache of its own (the same config would reuse the resumed store)
    assert main(["ingest", *args, f"run.dir={tmp_path / 'full'}", f"cache.dir={tmp_path / 'cache2'}"]) == 0
    resumed, full = (RowStore.open(str(d / C.SAMPLES)).summary() for d in (killed_dir, tmp_path / "full"))
    assert resumed["done"] == full["done"] == 24 and resumed["pending"] == 0
    a, b = _store_arrays(killed_dir / C.SAMPLES), _store_arrays(tmp_path / "full" / C.SAMPLES)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_sdf_failure_is_one_rows_failure(tmp_path, monkeypatch):
    """A backend that raises on one shape fails that row with the reason; the shard still commits."""
    import raywsl.geometry.sampling as sampling
    import raywsl.ingest.pipeline as pipeline

    source = write_corpus(tmp_path / "corpus", 4, seed=2)
    cfg = load_config(None, [f"data.source={source}", f"run.dir={tmp_path / 'run'}", "ingest.points=512",
                             "ingest.surface_points=64", "ingest.shard_size=4"])
    store = RowStore.create(str(tmp_path / "run" / C.SAMPLES), kind="samples", fingerprint="x",
                            ids=[f"s{i}" for i in range(4)], categories=[""] * 4, shard_size=4,
                            sources=sorted(str(p) for p in (tmp_path / "corpus" / "meshes").glob("*.ply")),
                            arrays=pipeline.sample_arrays(cfg))
    real = sampling.sample_shape

    def flaky(mesh, **kw):
        if len(flaky.calls) == 2:
            flaky.calls.append(1)
            raise RuntimeError("winding number exploded")
        flaky.calls.append(1)
        return real(mesh, **kw)

    flaky.calls = []
    monkeypatch.setattr(sampling, "sample_shape", flaky)
    out = pipeline.ingest_shards({"shard": np.array([0])}, path=store.path, cfg=cfg)
    assert out["done"].tolist() == [3] and out["failed"].tolist() == [1]
    s = RowStore.open(store.path).summary()
    assert s["pending"] == 0 and len(s["failures"]) == 1
    f = s["failures"][0]
    assert f["row"] == 2 and "SDF sampling failed (RuntimeError: winding number exploded)" in f["reason"]
    assert f["source"] in f["reason"]


@pytest.mark.long
def test_mesh_that_kills_its_worker_fails_alone(tmp_path):
    """A mesh whose sampling kills the worker process (as a segfault in a native library would) is
    found and recorded as failed; its shard-mates and every other shard are done, and the job ends."""
    source = write_corpus(tmp_path / "corpus", 8, seed=3)
    run_dir = tmp_path / "run"
    env = {**os.environ, "RAYWSL_CRASH_SHAPE": "capsule-0000003"}
    proc = subprocess.run([sys.executable, "-m", "raywsl.cli", "ingest", f"data.source={source}",
                           f"run.dir={run_dir}", "ingest.points=512", "ingest.surface_points=64",
                           "ingest.shard_size=4"], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "7 done, 1 failed" in proc.stderr
    s = RowStore.open(str(run_dir / C.SAMPLES)).summary()
    assert s["pending"] == 0 and [f["shape_id"] for f in s["failures"]] == ["capsule-0000003"]
    assert "worker process died" in s["failures"][0]["reason"] and "while sampling this mesh, alone, 2 times" in \
        s["failures"][0]["reason"]


def _ingest_cmd(source, run_dir, **env):
    return subprocess.run([sys.executable, "-m", "raywsl.cli", "ingest", f"data.source={source}",
                           f"run.dir={run_dir}", "ingest.points=512", "ingest.surface_points=64",
                           "ingest.shard_size=4"], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=240)


@pytest.mark.long
def test_an_environment_error_stops_the_job_with_rows_pending_and_a_rerun_finishes(tmp_path):
    """A shard whose task raises (here an injected 'No space left on device', every time) is not a
    mesh's fault: it is retried, then the job stops with a non-zero exit naming the error, its rows
    stay pending (no mesh is marked failed), the other shards are committed; the rerun, with the
    disk fixed, ingests only that shard."""
    source = write_corpus(tmp_path / "corpus", 8, seed=3)
    run_dir = tmp_path / "run"
    proc = _ingest_cmd(source, run_dir, RAYWSL_FAIL_SHARD="1")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "1 shard(s) (4 rows)" in proc.stderr and "No space left on device" in proc.stderr
    assert "rerun the same command" in proc.stderr
    s = RowStore.open(str(run_dir / C.SAMPLES)).summary()
    assert (s["done"], s["failed"], s["pending"]) == (4, 0, 4)
    proc = _ingest_cmd(source, run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ingest: 4/4 shapes" in proc.stderr and "8 done, 0 failed" in proc.stderr  # only the pending shard
    assert RowStore.open(str(run_dir / C.SAMPLES)).summary()["pending"] == 0


@pytest.mark.long
def test_a_crash_no_single_mesh_explains_blames_no_mesh(tmp_path):
    """The worker of shard 0 dies every time it runs the shard (as on a node that is lost), but each
    of its meshes sampled alone is fine: no mesh is marked failed, the job stops non-zero and the
    shard stays pending. A transient error (once) is retried within the job and finishes it."""
    source = write_corpus(tmp_path / "corpus", 8, seed=3)
    run_dir = tmp_path / "run"
    proc = _ingest_cmd(source, run_dir, RAYWSL_FAIL_SHARD="0", RAYWSL_FAIL_MODE="crash")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "no single mesh kills it alone" in proc.stderr
    s = RowStore.open(str(run_dir / C.SAMPLES)).summary()
    assert (s["done"], s["failed"], s["pending"]) == (4, 0, 4)
    marker = tmp_path / "failed-once"
    proc = _ingest_cmd(source, run_dir, RAYWSL_FAIL_SHARD="0", RAYWSL_FAIL_MARKER=str(marker))
    assert proc.returncode == 0 and marker.exists(), proc.stderr[-3000:]
    assert RowStore.open(str(run_dir / C.SAMPLES)).summary()["done"] == 8
