"""`ray job submit` end to end, as on a cluster: a real Ray head started by the test (`ray start --head`
on 127.0.0.1, with its dashboard / job server and token authentication), the quickstart-sized run
submitted with `--working-dir` through jobs/run.py, and its outputs read back; the same run with its
run folder and cache on s3:// against a local S3 server (moto's, on 127.0.0.1); a run whose stages
ask for GPUs stays pending on this GPU-less head and says why. Loopback only; every wait is bounded,
and the head (its whole process group) is stopped at the end."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The CI-sized chain of tests/test_run.py: every stage, about a minute on 2 cores.
ARGS = ["data.source=corpus:12", "ingest.points=4096", "ingest.surface_points=1024", "ingest.shard_size=4",
        "ingest.test_fraction=0.3", "field.preset=tiny", "fit.steps=100", "fit.points_per_step=512",
        "fit.batch_size=6", "fit.shard_size=6", "fit.recon_count=4", "fit.recon_resolution=32",
        "diffusion.model=tiny", "train.steps=60", "train.batch_size=8", "train.log_every=20",
        "sample.count=6", "sample.steps=20", "sample.resolution=32", "eval.distances=[cd]"]
JOB_TIMEOUT = 360

pytestmark = [pytest.mark.ray, pytest.mark.long]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env():
    """A local S3-compatible server (moto) on loopback with one bucket; the environment that points
    boto / s3fs at it (AWS_ENDPOINT_URL, as a cluster's nodes would point at their object store)."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    import s3fs

    s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"], key="testing", secret="testing").mkdir("raywsl")
    yield env
    server.stop()


class Head:
    def __init__(self, address: str, env: dict[str, str]):
        self.address, self.env = address, env

    def ray(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], env=env or self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=REPO)

    def submit(self, *job_args: str) -> str:
        """Submit `python jobs/run.py <job_args>` with the repository as working dir; its id."""
        sid = f"raywsl-test-{uuid.uuid4().hex[:8]}"
        deadline = time.time() + 90
        while True:  # the job server answers before the head's agent takes jobs: Ray says "try again later"
            proc = self.ray("job", "submit", "--address", self.address, "--submission-id", sid, "--no-wait",
                            "--working-dir", ".", "--", "python", "jobs/run.py", *job_args, timeout=120)
            if proc.returncode == 0 or "No available agent" not in proc.stderr or time.time() > deadline:
                break
            time.sleep(3)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return sid

    def status(self, sid: str) -> str:
        """The job's status from the job server's REST API (what `ray job status` asks), with the token."""
        token = Path(self.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        request = urllib.request.Request(f"{self.address}/api/jobs/{sid}", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.load(r)["status"]

    def logs(self, sid: str) -> str:
        return self.ray("job", "logs", "--address", self.address, sid).stdout

    def wait(self, sid: str, timeout: float = JOB_TIMEOUT) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = self.status(sid)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status
            time.sleep(3)
        self.ray("job", "stop", "--address", self.address, sid)
        pytest.fail(f"job {sid} did not finish within {timeout} s:\n{self.logs(sid)[-3000:]}")


@pytest.fixture(scope="module")
def head(tmp_path_factory, s3_env):
    """A Ray head on 127.0.0.1 as `ray up` starts one (dashboard and job server, token auth, the OOM
    retry bound), in its own process group; stopped (the group killed) at the end."""
    root = tmp_path_factory.mktemp("head")
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(s3_env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_task_oom_retries="2",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")  # the job's `python` is this venv's
    # Every port of its own: the test session's embedded Ray holds Ray's default ports (its dashboard
    # agent's 52365 among them; a head whose agent cannot bind answers "No available agent" forever).
    ports = {name: free_port() for name in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                            "dashboard-agent-grpc-port", "metrics-export-port",
                                            "ray-client-server-port", "runtime-env-agent-port")}
    log = open(root / "head.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", *(f"--{name}={port}" for name, port in ports.items()),
         "--num-cpus=4", "--num-gpus=0", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
    h = Head(f"http://127.0.0.1:{ports['dashboard-port']}", env)
    try:
        deadline = time.time() + 120
        while h.ray("job", "list", "--address", h.address).returncode != 0:
            assert proc.poll() is None, (root / "head.log").read_text()[-3000:]
            assert time.time() < deadline, "the head's job server did not come up in 120 s"
            time.sleep(2)
        yield h
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(3)
        proc.wait(timeout=30)
        log.close()


@pytest.mark.timeout(JOB_TIMEOUT + 200)
def test_ray_job_submit_runs_the_chain_on_a_head_with_token_auth(head, tmp_path):
    # token authentication is on: a client with another token is refused
    wrong = {**head.env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    wrong.pop("RAY_AUTH_TOKEN_PATH")
    refused = head.ray("job", "list", "--address", head.address, env=wrong)
    assert refused.returncode != 0 and "auth" in (refused.stdout + refused.stderr).lower()

    run = tmp_path / "runs" / "job"
    sid = head.submit(f"run.dir={run}", *ARGS)
    assert head.wait(sid) == "SUCCEEDED", head.logs(sid)[-4000:]
    logs = head.logs(sid)
    assert "connecting to Ray at" in (run / "logs" / "run.log").read_text()  # the job joined the head
    assert "report:" in logs
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_generated"] == 6 and 0 <= metrics["1nna_cd"] <= 1
    stages = json.loads((run / "stages.json").read_text())["stages"]
    assert list(stages) == ["corpus", "ingest", "fit", "recon", "train", "sample", "eval", "report"]
    assert (run / "report.html").read_text().count("data:image/png;base64,") >= 5


@pytest.mark.timeout(JOB_TIMEOUT + 200)
def test_ray_job_submit_with_run_folder_and_cache_on_s3(head, s3_env, tmp_path):
    import mlflow
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_env["AWS_ENDPOINT_URL"], key="testing", secret="testing")
    db = tmp_path / "mlflow.db"
    sid = head.submit("run.dir=s3://raywsl/runs/job", "cache.dir=s3://raywsl/cache",
                      f"mlflow.tracking_uri=sqlite:///{db}", *ARGS)
    assert head.wait(sid) == "SUCCEEDED", head.logs(sid)[-4000:]

    run = "raywsl/runs/job"
    files = {p[len(run) + 1:] for p in fs.find(run)}
    assert {"config.yaml", "stages.json", "metrics.json", "report.html", "logs/run.log", "mlflow_run_id"} <= files
    stages = json.loads(fs.cat_file(f"{run}/stages.json"))["stages"]
    for stage in ("corpus", "fit", "train", "sample", "eval"):
        artifact = stages[stage]["artifact"]
        assert artifact.startswith("s3://raywsl/cache/") and fs.exists(f"{artifact}/artifact.json"), stage
    # the stores, Ray Train's checkpoint, the generated meshes and the figures are in the bucket
    train = stages["train"]["artifact"][len("s3://"):]
    assert fs.exists(f"{train}/state.pt") and fs.exists(f"{train}/diffusion_loss.png")
    sample = stages["sample"]["artifact"][len("s3://"):]
    assert fs.exists(f"{sample}/rows.npy") and fs.glob(f"{sample}/sample_*.ply")
    assert fs.exists(f"{stages['fit']['artifact'][len('s3://'):]}/weights.zarr/zarr.json")
    assert not fs.glob("raywsl/cache/*/*.tmp-*")  # every artifact published, nothing half-written left
    metrics = json.loads(fs.cat_file(f"{run}/metrics.json"))
    assert metrics["n_generated"] == 6
    assert fs.cat_file(f"{run}/report.html").count(b"data:image/png;base64,") >= 5
    assert b"ingest" in fs.cat_file(f"{run}/logs/run.log")
    # MLflow has the run, its metrics and the figures read from the bucket
    client = mlflow.tracking.MlflowClient(f"sqlite:///{db}")
    record = client.get_run(fs.cat_file(f"{run}/mlflow_run_id").decode().strip())
    assert record.data.tags["raywsl.run"] == "finished" and "mmd_cd" in record.data.metrics
    assert "figures/generated.png" in {a.path for a in client.list_artifacts(record.info.run_id, "figures")}


@pytest.mark.timeout(300)
def test_a_job_whose_stages_ask_for_gpus_waits_on_a_head_without_gpus_and_says_why(head, tmp_path):
    run = tmp_path / "runs" / "gpu"
    sid = head.submit(f"run.dir={run}", *ARGS, "scaling.use_gpu=true")
    deadline = time.time() + 180
    while "waiting for" not in (logs := head.logs(sid)):
        assert head.status(sid) in ("PENDING", "RUNNING"), logs[-3000:]
        assert time.time() < deadline, f"no notice of the wait within 180 s:\n{logs[-3000:]}"
        time.sleep(3)
    notice = next(line for line in logs.splitlines() if "waiting for" in line)
    assert "fit:" in notice and "GPU" in notice and "the cluster has 0 GPUs" in notice, notice
    time.sleep(5)
    assert head.status(sid) == "RUNNING"  # still waiting: not run on the CPU instead
    stages = json.loads((run / "stages.json").read_text())["stages"]
    assert "ingest" in stages and "fit" not in stages
    stopped = head.ray("job", "stop", "--address", head.address, sid, timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert head.wait(sid, timeout=60) == "STOPPED"


def test_a_run_folder_at_a_url_without_a_tracking_store_is_refused(capsys):
    """A remote run folder has no place for the default sqlite store: an error naming the key to set,
    not a run recorded nowhere (MLflow would be skipped silently)."""
    from raywsl.cli import main

    assert main(["run", "run.dir=memory://raywsl-test/runs/x", "cache.dir=memory://raywsl-test/cache", *ARGS]) == 2
    err = capsys.readouterr().err
    assert "mlflow.tracking_uri" in err and "memory://raywsl-test/runs/x" in err
