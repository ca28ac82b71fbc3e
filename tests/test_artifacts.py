"""Artifacts shared across runs, on a real local Ray: subsets extended instead of refitted, concurrent
commands computing one artifact once, refused commands that change nothing, damaged stores kept,
and `raywsl run` killed -9 in every stage finishing with the weights of an uninterrupted run."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import kill9_when, plan_of, ray_env

from raywsl import cache
from raywsl import contract as C
from raywsl.cli import main
from raywsl.data.corpus import write_corpus
from raywsl.store.rows import DONE, RowStore

pytestmark = pytest.mark.ray

INGEST = ["ingest.points=2048", "ingest.surface_points=256", "ingest.shard_size=2", "ingest.test_fraction=0.25"]
FIT = ["field.preset=tiny", "fit.steps=60", "fit.points_per_step=512", "fit.check_every=20", "fit.batch_size=4",
       "fit.shard_size=2", "fit.recon_count=0"]
WEIGHT_ARRAYS = (C.ROW_WEIGHTS, C.FIT_LOSS, C.FIT_STEPS, C.STATUS, C.SHARD_DONE)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    return str(write_corpus(tmp_path_factory.mktemp("artifacts") / "corpus", 16, seed=5, progress=False))


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry below `folder`: a link's target, a file's bytes and mtime (what "unchanged" means)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root, name)
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_file():
                out[rel] = ("file", p.read_bytes(), p.stat().st_mtime_ns)
    return out


def arrays(store: str, names=WEIGHT_ARRAYS) -> dict[str, np.ndarray]:
    g = zarr.open_group(store, mode="r")
    return {name: g[name][:] for name in names}


def test_a_larger_subset_fits_only_the_new_shapes(ray_local, source, tmp_path):
    """data.shapes=4 then 8 on one cache: the second run ingests and fits only the shards the first
    did not have, leaves the first ones untouched, and ends with the rows a run with 8 at once fits."""
    args = [f"data.source={source}", *INGEST, *FIT, f"run.dir={tmp_path / 'run'}"]
    for verb in ("ingest", "fit"):
        assert main([verb, *args, "data.shapes=4"]) == 0
    # a base on 8 shapes needs samples only 4 have: train-base refuses, as fit does
    assert main(["train-base", *args, "data.shapes=4", "base.shapes=8"]) == 2
    _, small = plan_of(*args, "data.shapes=4")
    _, large = plan_of(*args, "data.shapes=8")
    assert large.weights == small.weights and large.samples == small.samples  # one store for every N
    weights = RowStore.open(small.weights)
    held = weights.attrs[C.Attr.HELD_OUT]
    assert held > 0 and weights.status()[held:held + 4].tolist() == [DONE] * 4
    first = {k for k in range(weights.n_shards) if weights.shard_done(k)}
    before = snapshot(Path(small.weights) / C.ROW_WEIGHTS)
    assert RowStore.open(small.samples).pending_shards() != []  # only what N=4 needs was ingested

    for verb in ("ingest", "fit"):
        assert main([verb, *args, "data.shapes=8"]) == 0
    weights = RowStore.open(large.weights)
    now = {k for k in range(weights.n_shards) if weights.shard_done(k)}
    assert first < now and weights.status()[held:held + 8].tolist() == [DONE] * 8
    after = snapshot(Path(large.weights) / C.ROW_WEIGHTS)
    assert {k: v for k, v in after.items() if k in before} == before  # the first shards were not refitted
    assert not weights.status()[:held - held % 2].any()  # whole held-out shards are never fitted

    fresh = tmp_path / "fresh"  # N=8 at once, in a cache of its own
    fresh_args = [f"data.source={source}", *INGEST, *FIT, f"run.dir={fresh}", "data.shapes=8"]
    for verb in ("ingest", "fit"):
        assert main([verb, *fresh_args]) == 0
    a, b = arrays(large.weights), arrays(str(fresh / C.WEIGHTS))
    for name in WEIGHT_ARRAYS:
        assert a[name].tobytes() == b[name].tobytes(), name


def test_two_concurrent_commands_compute_one_artifact_once(ray_local, source, tmp_path):
    """Two `raywsl ingest` processes (two run folders, one cache, one Ray cluster) at the same time: one
    computes the sample store, the other waits for it and reuses it."""
    cache_dir = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-m", "raywsl.cli", "ingest", f"data.source={source}", *INGEST,
                               "ingest.points=20000", f"run.dir={tmp_path / name}", f"cache.dir={cache_dir}"],
                              env=ray_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("a", "b")]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    reused = [json.loads((tmp_path / name / C.STAGES_FILE).read_text())["stages"]["ingest"]["reused"]
              for name in ("a", "b")]
    assert sorted(reused) == [False, True]
    assert any("waiting for another process" in err for _, err in outs)
    [store] = list((cache_dir / "ingest").glob(f"*/{C.SAMPLES}"))
    assert RowStore.open(str(store)).summary()["pending"] == 0


def test_a_refused_command_changes_nothing(source, tmp_path):
    run, args = tmp_path / "run", [f"data.source={source}", *INGEST, *FIT]
    assert main(["ingest", f"run.dir={run}", *args]) == 0
    before = snapshot(tmp_path)
    assert main(["fit", f"run.dir={run}", *args, "ingest.points=4096"]) == 2  # samples of other settings
    assert main(["train", f"run.dir={run}", *args]) == 2  # nothing fitted
    assert main(["sample", f"run.dir={run}", *args]) == 2  # nothing trained
    assert main(["eval", f"run.dir={run}", *args]) == 2  # nothing sampled
    assert snapshot(tmp_path) == before  # no config.yaml, log, MLflow run, link or cache entry


def test_a_damaged_store_is_refused_not_deleted(source, tmp_path, capsys):
    run, args = tmp_path / "run", [f"data.source={source}", *INGEST, f"run.dir={tmp_path / 'run'}"]
    assert main(["ingest", *args]) == 0
    store = (run / C.SAMPLES).resolve()
    (store / "zarr.json").write_text("{not json")
    capsys.readouterr()
    assert main(["ingest", *args]) == 2
    assert "cannot be opened" in capsys.readouterr().err and (store / C.POINTS).exists()
    assert main(["ingest", *args, "--restart"]) == 0
    assert RowStore.open(str(store)).summary()["pending"] == 0


# ------------------------------------------------------------------------------------ kill -9

RUN = ["data.source=corpus:10", "ingest.points=4096", "ingest.surface_points=512", "ingest.shard_size=2",
       "ingest.test_fraction=0.3", "field.preset=tiny", "fit.steps=100", "fit.points_per_step=512",
       "fit.batch_size=2", "fit.shard_size=2", "fit.recon_count=2", "fit.recon_resolution=24",
       "diffusion.model=tiny", "diffusion.timesteps=50", "train.steps=60", "train.batch_size=8",
       "train.log_every=10", "train.checkpoint_every=20", "sample.count=3", "sample.steps=10",
       "sample.resolution=24", "eval.distances=[cd]", "eval.points=256", "eval.render=2"]
KILLED = ("corpus", "ingest", "fit", "recon", "train", "sample", "eval")


TERMINAL_LINE = re.compile(
    r"^(raywsl run: .*|  \S+ +(computed|reused) +[0-9.]+ s  .*|\S+: \d+/\d+ \w+.*eta .*"
    r"|metrics: .*|stages: .*|report: .*)$")


def assert_clean_terminal(text: str) -> None:
    """One line per stage, progress lines and the results: no Ray, MLflow or library output."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines and [line for line in lines if not TERMINAL_LINE.match(line)] == [], text[-3000:]
    assert len(lines) < 40, text


def crash_while_publishing(args: list[str], plan) -> None:
    """Run until the trained denoiser is written and its artifact.json too, then die before the rename
    that publishes it (the worst moment of a publication): only a temporary folder is left."""
    proc = subprocess.Popen([sys.executable, "-m", "raywsl.cli", *args], env=ray_env(RAYWSL_CRASH_PUBLISH="train"),
                            start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert proc.wait(timeout=300) == 137
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the local Ray it started
        except ProcessLookupError:
            pass
    assert not cache.is_complete(plan["train"].path)
    [tmp] = Path(plan["train"].path).parent.glob(f"*{C.TMP_MARK}*")
    assert (tmp / C.ARTIFACT_INFO).exists() and (tmp / C.CHECKPOINT_STATE).exists()


@pytest.mark.long
@pytest.mark.timeout(900)
def test_run_killed_in_every_stage_finishes_as_if_never_killed(ray_local, tmp_path):
    """kill -9 `raywsl run` (its driver; it runs on the session's Ray) once inside every stage, at a seeded random moment
    after the stage took its artifact's lock, and once while publishing the trained denoiser; the
    rerun completes, reusing what the killed runs finished, with the weights and samples of an
    uninterrupted run in another cache."""
    rng = np.random.default_rng(0)
    args = ["run", f"run.dir={tmp_path / 'killed'}", *RUN]
    _, plan = plan_of(*args[1:])
    for stage in KILLED:
        if stage == "train":
            crash_while_publishing(args, plan)
        delay, seen = float(rng.uniform(0, 1.5)), []

        def inside(stage=stage, delay=delay, seen=seen) -> bool:
            if not seen and cache.is_locked(plan[stage].path):
                seen.append(time.time())
            return bool(seen) and time.time() >= seen[0] + delay or cache.is_complete(plan[stage].path)

        kill9_when(args, inside, timeout=240)
    assert main(args) == 0

    full = tmp_path / "full"  # uninterrupted, as a user runs it: the terminal shows raywsl's lines only
    proc = subprocess.run([sys.executable, "-m", "raywsl.cli", "run", f"run.dir={full}",
                           f"cache.dir={tmp_path / 'cache2'}", *RUN], env=ray_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_clean_terminal(proc.stdout + proc.stderr)
    log = (full / C.LOGS / "run.log").read_text()
    assert "core_worker" in log or "(TrainController" in log or "ray." in log  # Ray's output went there
    killed = tmp_path / "killed"
    a, b = arrays(str(killed / C.WEIGHTS)), arrays(str(full / C.WEIGHTS))
    for name in WEIGHT_ARRAYS:
        assert a[name].tobytes() == b[name].tobytes(), name
    np.testing.assert_array_equal(np.load(killed / "generated" / C.ROWS), np.load(full / "generated" / C.ROWS))
    for name in ("mmd_cd", "cov_cd", "1nna_cd"):
        assert json.loads((killed / C.METRICS).read_text())[name] == json.loads((full / C.METRICS).read_text())[name]
    leftovers = cache.garbage(str(tmp_path / C.CACHE), [str(killed)])
    assert leftovers and all(C.TMP_MARK in p or p.endswith(C.WORK_SUFFIX) for p in leftovers)  # the kills' only
    assert main(["gc", "--cache", str(tmp_path / C.CACHE)]) == 0  # the run folders beside the cache
    assert not any(os.path.exists(p) for p in leftovers)
    assert main(args) == 0  # and the run folder's artifacts survived the collection
    assert all(e["reused"] for s, e in json.loads((killed / C.STAGES_FILE).read_text())["stages"].items()
               if s != "report")
