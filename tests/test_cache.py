"""The stage contract and the artifact cache, without Ray: which keys move which fingerprint, atomic
publishing, one producer per artifact across processes, run-folder links, garbage collection."""

import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from raywsl import cache
from raywsl import contract as C
from raywsl.config import load_config

BASE_ARGS = ["data.source=corpus:20", "field.type=mlora", "field.preset=default"]


def fingerprints(*overrides: str) -> dict[str, str]:
    cfg = load_config(None, [*BASE_ARGS, *overrides])
    model = "modulated" if cfg.field.type == "mlora" else None
    plan = C.make_plan(cfg, cache="/c", source="", corpus=True, base_model=model)
    return {stage: art.fingerprint for stage, art in plan.artifacts.items() if stage != "report"}


@pytest.mark.parametrize("override, moved", [
    ("ingest.points=999", {"ingest", "train-base", "fit", "recon", "train", "sample", "eval"}),
    ("data.source=corpus:21", {"corpus", "ingest", "train-base", "fit", "recon", "train", "sample", "eval"}),
    ("base.steps=7", {"train-base", "fit", "recon", "train", "sample", "eval"}),
    ("field.rank=2", {"fit", "recon", "train", "sample", "eval"}),
    ("fit.recon_count=3", {"recon"}),
    ("data.shapes=5", {"train-base", "fit", "recon", "train", "sample", "eval"}),  # the base trains on them
    ("field.type=mlp field.preset=small data.shapes=5", {"recon", "train", "sample", "eval"}),  # stores: extended
    ("base.shapes=5", {"train-base", "fit", "recon", "train", "sample", "eval"}),
    ("train.steps=7", {"train", "sample", "eval"}),
    ("diffusion.model=small", {"train", "sample", "eval"}),
    ("sample.count=7", {"sample", "eval"}),
    ("eval.points=128", {"eval"}),
    ("fit.actors=2", set()),  # where work runs decides nothing
    ("train.checkpoint_every=7", set()),
    ("run.name=other", set()),
    ("cache.dir=/elsewhere", set()),
])
def test_each_key_moves_exactly_the_stages_that_read_it(override, moved):
    *same, changed = override.split()  # "a=1 b=2": a in both plans, b changed
    before, after = fingerprints(*same), fingerprints(*same, changed)
    assert {s for s in before if before[s] != after.get(s)} == moved


def test_a_plan_names_every_artifact_by_stage_and_fingerprint(tmp_path):
    cfg = load_config(None, [*BASE_ARGS, f"run.dir={tmp_path}/runs/a"])
    assert cfg.cache_dir == f"{tmp_path}/runs/cache"
    plan = C.make_plan(cfg, cache=cfg.cache_dir, source="", corpus=True, base_model="modulated")
    assert plan.stages == ["corpus", "ingest", "train-base", "fit", "recon", "train", "sample", "eval", "report"]
    assert plan["fit"].path == f"{cfg.cache_dir}/fit/{plan['fit'].fingerprint}"
    assert plan.samples == f"{plan['ingest'].path}/{C.SAMPLES}" and plan.shown("fit") == plan.weights
    assert plan.source == f"{plan['corpus'].path}/{C.CORPUS_MANIFEST}"
    assert plan["report"].path == f"{tmp_path}/runs/a/{C.REPORT}"
    mlp = C.make_plan(load_config(None, ["data.source=x"]), cache="/c", source="f1", corpus=False, base_model=None)
    assert "train-base" not in mlp and "corpus" not in mlp and mlp.source == "x"
    other = C.make_plan(load_config(None, ["data.source=x"]), cache="/c", source="f2", corpus=False, base_model=None)
    assert other["ingest"].fingerprint != mlp["ingest"].fingerprint  # other meshes, other samples
    given = C.make_plan(cfg, cache="/c", source="", corpus=True, base_model="modulated", base=("b0", "/my/base"))
    assert given["train-base"].path == "/my/base" and given["fit"].fingerprint != plan["fit"].fingerprint


# ------------------------------------------------------------------------------------ publishing

def _artifact(tmp_path, stage="sample", fp="f00d") -> C.Artifact:
    return C.Artifact(stage, fp, str(tmp_path / "cache" / stage / fp))


def test_publishing_is_all_or_nothing(tmp_path):
    art = _artifact(tmp_path)
    with pytest.raises(RuntimeError, match="broke"):
        with cache.publishing(art) as out:
            Path(out, "half.npy").write_bytes(b"x")
            raise RuntimeError("broke")
    assert not Path(art.path).exists() and not cache.is_complete(art.path)
    assert list(Path(art.path).parent.iterdir()) == []  # the temporary folder went too
    with cache.publishing(art, {"rows": 3}) as out:
        Path(out, "rows.npy").write_bytes(b"data")
        assert not cache.is_complete(art.path)  # nothing visible until the block ends
    assert cache.is_complete(art.path) and Path(art.path, "rows.npy").read_bytes() == b"data"
    info = cache.artifact_info(art.path)
    assert (info["stage"], info["fingerprint"], info["rows"]) == ("sample", "f00d", 3)


def test_write_text_replaces_atomically(tmp_path):
    path = tmp_path / "a" / "stages.json"
    cache.write_json(str(path), {"x": 1})
    cache.update_json(str(path), {"y": 2})
    assert json.loads(path.read_text()) == {"x": 1, "y": 2}
    assert [p.name for p in path.parent.iterdir()] == ["stages.json"]  # no temporary file left


# ------------------------------------------------------------------------------------ one producer

def _produce(path: str, log: str, pause: float) -> None:
    """What produce() does for a folder artifact: lock, reuse if published, else compute and publish."""
    art = C.Artifact("sample", "f00d", path)
    with cache.lock(art):
        if cache.is_complete(art.path):
            return
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        with cache.publishing(art) as out:
            time.sleep(pause)
            Path(out, "rows.npy").write_bytes(b"data")


def test_two_processes_asking_for_one_artifact_compute_it_once(tmp_path):
    art, log = _artifact(tmp_path), tmp_path / "computed.log"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_produce, args=(art.path, str(log), 1.0)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(log.read_text().split()) == 1 and cache.is_complete(art.path)


def test_a_dead_holder_releases_its_lock(tmp_path):
    art = _artifact(tmp_path)
    ctx = mp.get_context("spawn")
    holder = ctx.Process(target=_produce, args=(art.path, str(tmp_path / "log"), 30.0))
    holder.start()
    deadline = time.time() + 20
    while not cache.is_locked(art.path) and time.time() < deadline:
        time.sleep(0.05)
    assert cache.is_locked(art.path)
    holder.kill()  # SIGKILL: no cleanup code runs
    holder.join()
    assert not cache.is_locked(art.path)
    waited = []
    with cache.lock(art, on_wait=lambda: waited.append(1)):
        assert not cache.is_complete(art.path)
    assert waited == []  # the kernel released the lock with the process


# ------------------------------------------------------------------------------------ run folders

def test_links_and_garbage(tmp_path):
    runs = tmp_path / "runs"
    kept, dropped = _artifact(runs, "eval", "aaaa"), _artifact(runs, "eval", "bbbb")
    for art in (kept, dropped):
        with cache.publishing(art) as out:
            Path(out, "metrics.json").write_text("{}")
    run = C.RunLayout(str(runs / "r1"))
    cache.link(run, "eval", kept.path)
    assert Path(run.link("eval")).is_symlink() and os.readlink(run.link("eval")) == "../cache/eval/aaaa"
    cache.link(run, "eval", dropped.path)  # replaced in place
    assert os.readlink(run.link("eval")) == "../cache/eval/bbbb"
    cache.link(run, "eval", kept.path)
    cache.write_json(run.stages, {"stages": {"eval": {"artifact": kept.path}}})
    leftover = Path(kept.path + C.TMP_MARK + "dead")  # what a killed producer leaves
    leftover.mkdir()
    work = Path(kept.path).parent / ("cccc" + C.WORK_SUFFIX)
    work.mkdir()
    roots = cache.run_folders(str(runs))
    assert roots == [run.root]
    garbage = cache.garbage(str(runs / C.CACHE), roots)
    assert sorted(garbage) == sorted([dropped.path, str(leftover), str(work)])
    assert cache.collect_garbage(str(runs / C.CACHE), roots, dry_run=True) == garbage and Path(dropped.path).exists()
    cache.collect_garbage(str(runs / C.CACHE), roots)
    assert cache.is_complete(kept.path) and not Path(dropped.path).exists() and not leftover.exists()


def test_gc_keeps_what_a_live_producer_holds(tmp_path):
    runs = tmp_path / "runs"
    art = _artifact(runs, "train", "dddd")
    Path(cache.work_dir(art)).mkdir(parents=True)
    with cache.lock(art):
        assert cache.garbage(str(runs / C.CACHE), []) == []  # being produced: not garbage
    assert sorted(cache.garbage(str(runs / C.CACHE), [])) == sorted(
        [cache.work_dir(art), art.path + C.LOCK_SUFFIX])


@pytest.mark.ray
def test_the_ray_lock_serves_caches_no_file_lock_can(ray_local):
    """A cache at a URL (s3://...) gets its per-artifact locks from a named Ray actor: one holder at a
    time, and a holder that stops renewing (a dead process) loses its lease."""
    import threading

    import ray

    art = C.Artifact("fit", "abcd", "s3://bucket/runs/cache/fit/abcd")
    events, waited = [], []

    def hold(tag: int) -> None:
        with cache.lock(art, on_wait=lambda: waited.append(tag)):
            events.append(("in", tag))
            time.sleep(0.6)
            events.append(("out", tag))

    threads = [threading.Thread(target=hold, args=(tag,)) for tag in (0, 1)]
    for t in threads:
        t.start()
        time.sleep(0.2)
    for t in threads:
        t.join(30)
    assert events == [("in", 0), ("out", 0), ("in", 1), ("out", 1)] and waited == [1]
    service = cache.lock_service()
    assert ray.get(service.acquire.remote("x", "dead", 0.3)) and not ray.get(service.acquire.remote("x", "b", 0.3))
    time.sleep(0.4)
    assert ray.get(service.acquire.remote("x", "b", 0.3))  # the lease of the silent holder ran out
