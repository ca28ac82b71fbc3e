"""cluster.yaml and jobs/: checked with Ray's own cluster-launcher code, without starting Ray or a cloud.

`ray up` runs `prepare_config` (merge with the provider's defaults, node-type bounds) and then
`validate_config` (ray/autoscaler/ray-schema.json plus cross-field checks) before it touches AWS; the
tests run the same two functions of the installed Ray, then pin what raywsl needs from the cluster:
a head that runs no work, GPUs on the GPU nodes, the laptop's Ray version in the image, the s3 extra,
bounded OOM retries and token auth on every `ray start`, and job entrypoints that run the uploaded code.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
JOBS = {"run": "run", "sweep": "sweep", "scale": "sweep"}  # jobs/<name>.py -> the raywsl verb it runs
GPU_FAMILY = re.compile(r"^(p|g)\d")  # EC2 accelerated families with NVIDIA GPUs: p4d, p5, g5, g6e, ...


def load() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


def ray_checked(config: dict) -> dict:
    """What `ray up` does with the file before any cloud call: defaults merged, then validated."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def ray_start_lines(config: dict) -> dict[str, list[str]]:
    return {key: [c for c in config[key] if re.search(r"\bray start\b", c)]
            for key in ("head_start_ray_commands", "worker_start_ray_commands")}


def worker_bound_errors(config: dict) -> list[str]:
    """Bounds Ray's validator accepts but that are mistakes: min_workers > max_workers (Ray silently
    keeps min(min, max) nodes), a type's max above the cluster's max_workers (never reachable)."""
    errors = []
    for name, node in config["available_node_types"].items():
        if name == config["head_node_type"]:
            continue
        lo, hi = node.get("min_workers", 0), node.get("max_workers", config["max_workers"])
        if not 0 <= lo <= hi:
            errors.append(f"{name}: min_workers {lo} > max_workers {hi}")
        if hi > config["max_workers"]:
            errors.append(f"{name}: max_workers {hi} above the cluster's max_workers {config['max_workers']}")
    return errors


@pytest.fixture(scope="module")
def config() -> dict:
    return ray_checked(load())


def test_cluster_yaml_passes_the_autoscalers_own_validation(config):
    assert set(config["available_node_types"]) == {"head", "gpu_worker", "cpu_worker"}
    assert config["head_node_type"] == "head"
    assert config["provider"]["type"] == "aws"
    assert worker_bound_errors(config) == []
    for name in ("gpu_worker", "cpu_worker"):  # the autoscaler may add and remove them
        node = config["available_node_types"][name]
        assert node["min_workers"] == 0 and node["max_workers"] >= 1, name


def test_head_schedules_no_work(config):
    head = config["available_node_types"]["head"]
    assert head["resources"].get("CPU") == 0, "the autoscaler must plan with a head of 0 CPUs"
    assert "GPU" not in head["resources"]
    [start] = ray_start_lines(config)["head_start_ray_commands"]
    assert re.search(r"--num-cpus[= ]0\b", start), start


def test_gpu_node_types_declare_and_get_gpus(config):
    types = config["available_node_types"]
    gpu_types = [n for n, t in types.items() if GPU_FAMILY.match(t["node_config"]["InstanceType"])]
    assert gpu_types == ["gpu_worker"]
    for name, node in types.items():
        gpus = node["resources"].get("GPU", 0)
        if name in gpu_types:
            assert gpus >= 1, f"{name} ({node['node_config']['InstanceType']}) declares no GPU"
            assert "--gpus all" in node["docker"]["worker_run_options"], f"{name}: the container would see no GPU"
        else:
            assert gpus == 0, f"{name} ({node['node_config']['InstanceType']}) has no GPU to give"


def test_docker_image_is_the_installed_ray_with_python_311_or_newer(config):
    image = config["docker"]["image"]
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-(gpu|cu\d+)", image)
    assert m, f"{image}: expected rayproject/ray:<version>-py3XY-gpu"
    assert m.group(1) == ray.__version__, f"image Ray {m.group(1)} != installed Ray {ray.__version__}"
    with open(ROOT / "pyproject.toml", "rb") as f:
        requires = tomllib.load(f)["project"]["requires-python"]
    needed = int(re.fullmatch(r">=\s*3\.(\d+)", requires).group(1))
    assert int(m.group(2)) >= max(needed, 11), f"{image}: Python 3.{m.group(2)} < requires-python {requires}"
    assert not any("image" in k for t in config["available_node_types"].values() for k in t.get("docker", {})), \
        "one image on every node"
    # the nodes check the same version after installing (pip must not have replaced the image's Ray)
    assert any(f'"{ray.__version__}"' in c for c in config["setup_commands"])


def test_setup_installs_the_repository_with_the_s3_extra(config):
    mounted = [remote for remote, local in config["file_mounts"].items() if local == "."]
    assert mounted == ["~/raywsl"]
    [install] = [c for c in config["setup_commands"] if "pip install" in c]
    assert re.fullmatch(r'cd ~/raywsl && pip install( -\S+)* -e "\.\[s3\]"', install), install
    with open(ROOT / "pyproject.toml", "rb") as f:
        extras = tomllib.load(f)["project"].get("optional-dependencies", {})
    assert any(dep.startswith("s3fs") for dep in extras.get("s3", [])), \
        "pyproject.toml has no `s3` extra with s3fs: pip would only warn, and every s3:// path would fail"


def test_every_ray_start_sets_oom_retries_and_token_auth(config):
    from raywsl.runtime import OOM_RETRIES

    lines = ray_start_lines(config)
    assert all(lines.values()), f"a head and a worker `ray start`: {lines}"
    for line in (*lines["head_start_ray_commands"], *lines["worker_start_ray_commands"]):
        env = line.split("ray start")[0]
        assert f"RAY_task_oom_retries={OOM_RETRIES} " in env, line
        assert "RAY_AUTH_MODE=token " in env, line


def test_the_auth_token_reaches_every_node_at_rays_default_path(config):
    from ray._private.authentication.authentication_token_setup import _get_default_token_path

    default = "~/" + str(_get_default_token_path().relative_to(Path.home()))
    assert config["file_mounts"].get(default) == default  # the laptop's token, where Ray looks for it


def test_head_serves_mlflow_to_the_workers(config):
    [server] = [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
    assert "--host 0.0.0.0" in server and "--port 5000" in server
    assert re.search(r"--backend-store-uri sqlite:////\S+\.db", server)
    assert "--artifacts-destination s3://" in server
    assert server.startswith("setsid nohup ") and "&" in server  # outlives the ssh command that starts it


@pytest.mark.parametrize("mutate, error, says", [
    (lambda c: c.update(max_worker=c.pop("max_workers")), jsonschema.ValidationError, "'max_worker' was unexpected"),
    (lambda c: c["available_node_types"]["gpu_worker"].update(min_worker=1), jsonschema.ValidationError,
     "'min_worker' was unexpected"),
    (lambda c: c["docker"].update(run_option=["--gpus all"]), jsonschema.ValidationError,
     "'run_option' was unexpected"),
    (lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=-1), jsonschema.ValidationError,
     "less than the minimum of 0"),
    (lambda c: c["available_node_types"]["gpu_worker"].pop("resources"), jsonschema.ValidationError,
     "'resources' is a required property"),
    (lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=c["max_workers"] + 1), ValueError,
     "smaller than the sum of `min_workers`"),
    (lambda c: c.update(head_node_type="boss"), ValueError, "must be one of `available_node_types`"),
], ids=["top-level typo", "node-type typo", "docker typo", "negative GPU", "no resources", "min_workers sum",
        "unknown head type"])
def test_ray_rejects_a_broken_config(mutate, error, says):
    broken = load()
    mutate(broken)
    with pytest.raises(error, match=re.escape(says)):
        ray_checked(broken)


def test_worker_bounds_that_ray_accepts_are_still_caught():
    broken = load()
    broken["available_node_types"]["gpu_worker"].update(min_workers=9, max_workers=2)
    broken["available_node_types"]["cpu_worker"]["max_workers"] = broken["max_workers"] + 1
    ray_checked(broken)  # Ray takes it (it would keep min(9, 2) GPU nodes) ...
    assert worker_bound_errors(ray_checked(broken)) == [  # ... the test does not
        "gpu_worker: min_workers 9 > max_workers 2",
        f"cpu_worker: max_workers {broken['max_workers'] + 1} above the cluster's max_workers {broken['max_workers']}",
    ]


# ------------------------------------------------------------------------------------- jobs/

def test_jobs_are_exactly_the_documented_entrypoints():
    assert sorted(p.stem for p in (ROOT / "jobs").glob("*.py")) == sorted(JOBS)


@pytest.mark.parametrize("job", sorted(JOBS))
def test_job_help_is_the_raywsl_verbs_help(job):
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / f"{job}.py"), "--help"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: raywsl {JOBS[job]} "), out.stdout[:200]


FAKE_CLI = """import json, sys
def main(argv):
    print(json.dumps(argv))
    return 7
"""


@pytest.mark.parametrize("job, args, expected", [
    ("run", ["-c", "configs/x.yaml", "run.dir=s3://b/r"], ["run", "-c", "configs/x.yaml", "run.dir=s3://b/r"]),
    ("sweep", ["-c", "s.yaml", "--dir", "s3://b/s"], ["sweep", "-c", "s.yaml", "--dir", "s3://b/s"]),
    ("scale", ["--dir", "s3://b/s"], ["sweep", "-c", "{root}/configs/sweeps/scale_study.yaml", "--dir", "s3://b/s"]),
    ("scale", ["-c", "configs/sweeps/scale_study_small.yaml"],
     ["sweep", "-c", "configs/sweeps/scale_study_small.yaml"]),
    ("scale", ["--config=s.yaml"], ["sweep", "--config=s.yaml"]),
])
def test_a_job_runs_the_raywsl_of_its_working_dir(tmp_path, job, args, expected):
    """A copy of jobs/ beside a stand-in raywsl package (as in an uploaded working dir): the job must
    import that one, not the raywsl installed in this environment, and pass its arguments through."""
    shutil.copytree(ROOT / "jobs", tmp_path / "jobs")
    (tmp_path / "raywsl").mkdir()
    (tmp_path / "raywsl" / "__init__.py").write_text("")
    (tmp_path / "raywsl" / "cli.py").write_text(FAKE_CLI)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, str(tmp_path / "jobs" / f"{job}.py"), *args], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path, env=env)
    assert out.returncode == 7, out.stderr  # main's return value is the exit code
    assert yaml.safe_load(out.stdout) == [a.format(root=tmp_path) for a in expected]


def test_the_scale_jobs_default_config_exists():
    spec = importlib.util.spec_from_file_location("scale_job", ROOT / "jobs" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert Path(module.DEFAULT_CONFIG) == ROOT / "configs" / "sweeps" / "scale_study.yaml"
    assert Path(module.DEFAULT_CONFIG).is_file()
