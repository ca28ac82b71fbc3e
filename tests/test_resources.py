"""Resources come from the config, never from the cluster's state at launch: scaling.use_gpu is the
run's one GPU switch (fitting actors, Ray Train workers, the sample / recon / eval task); without it
nothing asks for a GPU and sample / recon / eval run in the driver process. Work that asks for GPUs
a cluster lacks waits (never falls back to the CPU), and raywsl says why."""

import logging
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import plan_of

from raywsl import contract as C
from raywsl.config import load_config
from raywsl.data.corpus import write_corpus
from raywsl.fit.pipeline import _gpus_per_actor
from raywsl.runtime import gpu_wait_notice, run_task
from raywsl.stages import call_stage, gpu_demand, stage_resources
from raywsl.store.rows import RowStore, StoreError

GPU = ["scaling.use_gpu=true"]


# ------------------------------------------------------------------------------------ the requests

def test_fitting_gpus_come_from_the_config_alone():
    import ray

    up = ray.is_initialized()  # (another test's session Ray may be up: what matters is that none starts)
    assert _gpus_per_actor(load_config()) == 0.0  # the laptop default: no GPU asked, whatever the machine has
    assert _gpus_per_actor(load_config(None, GPU)) == 1.0
    assert _gpus_per_actor(load_config(None, [*GPU, "fit.gpus_per_actor=0.25"])) == 0.25  # four actors per GPU
    assert _gpus_per_actor(load_config(None, [*GPU, "fit.gpus_per_actor=2"])) == 2.0
    assert _gpus_per_actor(load_config(None, [*GPU, "fit.device=cpu"])) == 0.0  # fitting on CPUs by choice
    assert _gpus_per_actor(load_config(None, ["fit.gpus_per_actor=0.5"])) == 0.0  # no switch, no GPU
    assert ray.is_initialized() == up  # the cluster was never asked


def test_sample_recon_eval_run_as_one_gpu_task_only_with_the_switch():
    default = load_config()
    assert not any(stage_resources(default, s) for s in C.STAGES)  # all in this process, as before
    gpu = load_config(None, [*GPU, "scaling.cpus_per_task=3"])
    tasks = {s: stage_resources(gpu, s) for s in C.STAGES if stage_resources(gpu, s)}
    assert tasks == {s: {"num_gpus": 1, "num_cpus": 3} for s in ("recon", "sample", "eval")}
    # a stage whose device is cpu stays in the driver; eval follows eval.device, sample / recon fit.device
    assert not stage_resources(load_config(None, [*GPU, "eval.device=cpu"]), "eval")
    cpu_fit = load_config(None, [*GPU, "fit.device=cpu"])
    assert not stage_resources(cpu_fit, "sample") and not stage_resources(cpu_fit, "recon")
    assert stage_resources(cpu_fit, "eval") == {"num_gpus": 1, "num_cpus": 2}


def test_gpu_demand_names_what_waits():
    cfg = load_config(None, [*GPU, "fit.actors=4", "base.workers=2", "scaling.num_workers=3"])
    assert gpu_demand(cfg, "fit") == (1.0, "4 fitting actors x 1 GPU")  # one actor can start the work
    assert gpu_demand(cfg, "train-base") == (2.0, "2 Ray Train workers x 1 GPU")  # every worker at once
    assert gpu_demand(cfg, "train") == (3.0, "3 Ray Train workers x 1 GPU")
    assert gpu_demand(cfg, "sample") == (1.0, "1 sample task x 1 GPU")
    assert gpu_demand(cfg, "ingest") == (0.0, "") and gpu_demand(cfg, "corpus") == (0.0, "")
    shared = load_config(None, [*GPU, "fit.actors=4", "fit.gpus_per_actor=0.25"])
    assert gpu_demand(shared, "fit") == (0.25, "4 fitting actors x 0.25 GPU")
    assert not any(gpu_demand(load_config(), s)[0] for s in C.STAGES)


def test_without_the_switch_a_stage_computes_in_this_process_without_ray():
    import ray

    up = ray.is_initialized()
    assert call_stage(load_config(), "eval", os.getpid) == os.getpid()
    assert ray.is_initialized() == up  # no Ray started for it


# ------------------------------------------------------------------------------------ on a local Ray without GPUs

@pytest.mark.ray
def test_run_task_and_the_waiting_notice(ray_local, tmp_path, caplog):
    import ray

    assert run_task(os.getpid, num_cpus=1) != os.getpid()  # another process; its result comes back
    with pytest.raises(StoreError, match="no store here") as e:  # raywsl's own errors as themselves, for the CLI
        run_task(RowStore.open, str(tmp_path / "none"), num_cpus=1)
    assert type(e.value) is StoreError
    with pytest.raises(ray.exceptions.RayTaskError):  # anything else with the task's traceback
        run_task(os.stat, str(tmp_path / "none"), num_cpus=1)

    notice = "sample: waiting for 1 sample task x 1 GPU; the cluster has 0 GPUs now"
    caplog.clear()  # the lines above logged the tasks' errors
    with caplog.at_level(logging.INFO, logger="raywsl"):
        with gpu_wait_notice("sample", 1.0, "1 sample task x 1 GPU", grace_s=0.0, every_s=0.4):
            time.sleep(1.0)
        with gpu_wait_notice("fit", 0.0, "nothing", grace_s=0.0, every_s=0.1):  # no GPU asked: no notice
            time.sleep(0.3)
    lines = [r.getMessage() for r in caplog.records if r.name == "raywsl.runtime"]
    assert 2 <= len(lines) <= 4 and all(line.startswith(notice) for line in lines)
    assert "set scaling.use_gpu=false to run on CPUs" in lines[0]


def _session_processes(sid: int) -> dict[int, str]:
    """{pid: "pgid state command"} of the live processes of session `sid` (a subprocess started with
    start_new_session, and its children)."""
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    command = f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                found[int(name)] = f"{fields[2]} {fields[0]} {command}"
    return found


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_a_gpu_fit_on_a_cluster_without_gpus_waits_and_says_why(tmp_path):
    """`raywsl fit scaling.use_gpu=true` on the embedded Ray (0 GPUs): its actors wait for GPUs (an
    autoscaler would add them), nothing is fitted on a CPU, and the log says why."""
    manifest = write_corpus(tmp_path / "corpus", 2, seed=0, progress=False)
    args = [f"data.source={manifest}", "fit.samples=stream", "ingest.points=2048", "ingest.surface_points=256",
            "ingest.test_fraction=0", "field.preset=tiny", "fit.steps=20", "fit.shard_size=2", "fit.recon_count=0",
            "fit.actors=2", f"run.dir={tmp_path / 'run'}", "mlflow.enabled=false", *GPU]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own, killed with it
    err = tmp_path / "stderr.txt"
    with open(err, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "raywsl.cli", "fit", *args], stdout=subprocess.DEVNULL,
                                stderr=f, start_new_session=True, env=env)
    notice = "fit: waiting for 2 fitting actors x 1 GPU; the cluster has 0 GPUs now"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and notice not in err.read_text():
            time.sleep(0.5)
        text = err.read_text()
        assert proc.poll() is None, f"fit ended instead of waiting for GPUs:\n{text[-3000:]}"
        assert notice in text, f"no waiting notice within 120 s:\n{text[-3000:]}"
        assert "its autoscaler may add GPU nodes" in text and "scaling.use_gpu=false" in text
        _, plan = plan_of(*args)
        store = RowStore.open(plan.weights)
        assert store.pending_shards() == list(range(store.n_shards)) == [0]  # nothing fitted on a CPU
    finally:
        # The driver and the local Ray it started: its process group, then the rest of its session
        # (Ray's worker processes run in process groups of their own), each by its id.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 20
        while (left := _session_processes(proc.pid)) and time.time() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
    assert not left, f"processes of the killed fit outlived it: {left}"
