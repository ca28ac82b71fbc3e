"""Shared fixtures. Ray starts once per test session (each start costs seconds on 2 cores)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Callable, Sequence

import pytest
import torch

# The fused Triton kernels (raywsl/kernels) run in Triton's interpreter where there is no GPU: it has
# to be on before triton is first imported. With a GPU the same tests run the compiled kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster for the whole session, shut down at the end.

    Tests that use it bound their own wait time (pytest-timeout, see pyproject), so a starved pool
    fails the test instead of hanging CI."""
    import ray

    from raywsl.runtime import ray_session

    with ray_session(num_cpus=4):
        yield ray


# One file per kind of bad input ingest must record as failed (and one open mesh it must accept).
BROKEN_KINDS = {
    "missing": "file not found",
    "garbage": "cannot read",
    "truncated": "cannot read",
    "empty": "empty mesh",
    "nan": "NaN/Inf",
    "degenerate": "degenerate geometry",
    "huge": "above the limit ingest.max_faces",
}
HUGE_FACES = 81920  # icosphere(subdivisions=6); tests set ingest.max_faces below it (corpus meshes have <25k)


def write_bad_meshes(folder):
    """Write one mesh of each kind in BROKEN_KINDS (the missing one is only named) plus an open
    mesh (a sphere with its cap cut off) that is valid input. Returns {kind: path}."""
    import numpy as np
    import trimesh

    folder.mkdir(parents=True, exist_ok=True)
    paths = {kind: folder / f"{kind}.ply" for kind in BROKEN_KINDS}
    paths["garbage"].write_bytes(b"this is not a mesh \x00\x01\x02" * 10)
    good = trimesh.creation.icosphere(subdivisions=3).export(file_type="ply")
    paths["truncated"].write_bytes(good[: len(good) // 2])
    paths["empty"] = folder / "empty.obj"
    paths["empty"].write_text("# a mesh with vertices and no faces\nv 0 0 0\nv 1 0 0\nv 0 1 0\n")
    paths["nan"] = folder / "nan.obj"
    paths["nan"].write_text("v 0 0 0\nv 1 0 0\nv nan 1 0\nv 0 0 1\nf 1 2 3\nf 1 2 4\nf 1 3 4\nf 2 3 4\n")
    paths["degenerate"] = folder / "degenerate.obj"
    paths["degenerate"].write_text("v 0 0 0\nv 1 0 0\nv 2 0 0\nv 3 0 0\nf 1 2 3\nf 2 3 4\n")
    trimesh.creation.icosphere(subdivisions=6).export(paths["huge"])
    sphere = trimesh.creation.icosphere(subdivisions=3)
    keep = sphere.triangles_center[:, 2] < 0.7
    paths["open"] = folder / "open.ply"
    trimesh.Trimesh(sphere.vertices, sphere.faces[keep]).export(paths["open"])
    assert np.isfinite(trimesh.load(paths["open"]).vertices).all()
    return paths


@pytest.fixture
def bad_meshes(tmp_path):
    return write_bad_meshes(tmp_path / "bad")


def ray_env(**extra: str) -> dict[str, str]:
    """The environment of a `raywsl` subprocess: it joins this test session's Ray (the `ray_local`
    fixture) when one is up, as a command submitted to a cluster does, instead of starting its own.
    (Fault injection through environment variables read in Ray workers needs a Ray of its own.)"""
    import ray

    env = {**os.environ, **extra}
    if ray.is_initialized():
        env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    return env


def kill9_when(argv: Sequence[str], ready: Callable[[], bool], timeout: float) -> None:
    """Run `raywsl <argv>` in its own process group; once `ready()` holds, kill -9 the driver (as a
    user would), and the local Ray it started if it started one. Fails if the command ends first or
    never gets ready."""
    proc = subprocess.Popen([sys.executable, "-m", "raywsl.cli", *argv], start_new_session=True, env=ray_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.05)
        assert proc.poll() is None, f"{argv[0]} finished before it could be killed: make it slower"
        assert ready(), f"{argv[0]}: not ready to be killed within {timeout} s"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        time.sleep(1)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


# ------------------------------------------------------------------------------------ shared run folders

def plan_of(*overrides: str, base: bool = False):
    """(config, plan) as the CLI makes them from `key=value` overrides (`base`: as `raywsl train-base`)."""
    from raywsl.config import load_config
    from raywsl.models.registry import check_config
    from raywsl.stages import plan_for

    cfg = check_config(load_config(None, list(overrides)))
    return cfg, plan_for(cfg, base=base)


def ingest_corpus(root, n: int, overrides: Sequence[str]):
    """(root/run, args): a run folder whose cache (root/cache) holds the samples of n procedural corpus
    shapes (`raywsl ingest`), and the config args (data.source, ingest keys) that name them."""
    from raywsl.cli import main
    from raywsl.data.corpus import write_corpus

    manifest = write_corpus(root / "corpus", n, seed=0, progress=False)
    run, args = root / "run", [f"data.source={manifest}", *overrides]
    assert main(["ingest", f"run.dir={run}", *args]) == 0
    return run, args


def copy_ingested(run, parent, name: str = "run"):
    """A fresh run folder parent/name whose cache (parent/cache) holds a copy of the samples the cache
    of `run` holds: for tests that change stores, or must not find another test's artifacts."""
    import shutil

    from raywsl.contract import CACHE

    shutil.copytree(run.parent / CACHE / "ingest", parent / CACHE / "ingest", dirs_exist_ok=True)
    return parent / name


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> str:
    """A tiny modulated base field checkpoint folder (a real `train-base` checkpoint, trained
    in-process 300 steps on four spheres): what LoRA fields need, without Ray Train."""
    import numpy as np
    import torch

    from raywsl.base.autodecoder import AutoDecoder, AutoDecoderSettings
    from raywsl.models.modulated import ModulatedField

    torch.manual_seed(0)
    net = ModulatedField.from_preset("tiny")
    trainer = AutoDecoder(net, lambda net, x, z: net.decode(x, z), 4, 8,
                          AutoDecoderSettings(steps=300, lr=3e-3, latent_lr=3e-3, stages=[[1.0, 4, 512]]))
    rng = np.random.default_rng(0)
    points = rng.uniform(-1, 1, (4, 1024, 3)).astype(np.float32)
    sdf = (np.linalg.norm(points, axis=2) - np.array([[0.3], [0.4], [0.5], [0.6]])).astype(np.float32)
    for batch in trainer.batches(points, sdf):
        trainer.step(*batch)
    folder = tmp_path_factory.mktemp("base") / "base_final"
    trainer.save(str(folder))
    return str(folder)

