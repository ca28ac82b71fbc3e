"""`raywsl sweep`: trials on Ray Tune sharing the artifact cache, one MLflow parent run with a child per
trial (through the sweep's own tracking server), the phase-diagram report; a sweep killed after its
first trial resumes without running that trial again."""

import json
import subprocess
import sys

import mlflow
import pytest
import yaml

from raywsl import contract as C
from conftest import kill9_when, ray_env
from test_run import ARGS


def trial_info(folder, name) -> dict:
    path = folder / C.SWEEP_TRIALS / name / C.TRIAL_JSON
    return json.loads(path.read_text()) if path.exists() else {}


@pytest.mark.long
@pytest.mark.timeout(600)
def test_a_killed_sweep_resumes_and_its_trials_share_artifacts_and_one_mlflow_parent(ray_local, tmp_path):
    cache = tmp_path / "cache"
    spec = {"name": "two-seeds", "base": "configs/quickstart.yaml",
            "overrides": [*ARGS, f"cache.dir={cache}", "scaling.cpus_per_worker=1", "fit.init=warm"],
            "scale": [8], "seeds": [0, 1], "trial_resources": {"cpu": 0.5}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    folder = tmp_path / "sweep"
    first, second = "N=8,seed=0", "N=8,seed=1"
    argv = ["sweep", "-c", str(path), "--dir", str(folder)]

    # killed (kill -9, as a user would) once the first trial has finished
    kill9_when(argv, ready=lambda: trial_info(folder, first).get("status") == "finished", timeout=300)
    assert trial_info(folder, second).get("status") != "finished"
    meta = json.loads((folder / C.SWEEP_JSON).read_text())
    assert [t["name"] for t in meta["trials"]] == [first, second]
    assert meta["trials"][1]["params"] == {"data.shapes": 8, "diffusion.seed": 1}

    done = subprocess.run([sys.executable, "-m", "raywsl.cli", *argv], env=ray_env(), capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trials: 2 finished" in done.stderr

    # the finished trial was not run again; the second one ran once to the end
    one, two = trial_info(folder, first), trial_info(folder, second)
    assert one["attempts"] == 1 and one["status"] == "finished"
    assert two["status"] == "finished" and two["fingerprints"]["fit"] == one["fingerprints"]["fit"]
    # trials that differ only in diffusion settings share corpus, samples and fits: the second fits nothing
    stages = json.loads((folder / C.SWEEP_TRIALS / second / C.STAGES_FILE).read_text())["stages"]
    assert {s: stages[s]["reused"] for s in ("corpus", "ingest", "fit", "train")} == {
        "corpus": True, "ingest": True, "fit": True, "train": False}
    assert stages["fit"]["artifact"].startswith(str(cache))

    # MLflow: the sweep's store, one parent run and one child run per trial, all finished
    mlflow.set_tracking_uri(f"sqlite:///{folder / C.SWEEP_MLFLOW / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["two-seeds"])
    parent = runs[runs["tags.mlflow.runName"] == "two-seeds"]
    assert len(parent) == 1 and parent["run_id"].iloc[0] == meta["mlflow"]["parent_run_id"]
    assert parent["metrics.trials_finished"].iloc[0] == 2 and parent["metrics.sweep_seconds"].iloc[0] > 0
    children = runs[runs["tags.mlflow.parentRunId"] == meta["mlflow"]["parent_run_id"]]
    assert sorted(children["tags.mlflow.runName"]) == [first, second]
    assert set(runs["status"]) == {"FINISHED"}
    assert sorted(children["params.diffusion.seed"]) == ["0", "1"]
    assert children["metrics.1nna_cd"].notna().all() and (children["metrics.stage_seconds_train"] > 0).all()
    assert children["tags.stage.fit.fingerprint"].nunique() == 1
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent["run_id"].iloc[0], "phase_diagram")}
    assert "phase_diagram/report.html" in artifacts and "phase_diagram/results.csv" in artifacts

    # Ray Train inside Tune: the denoiser's own reports (TuneReportCallback) reach Tune before the trial's
    # final metrics (what ASHA would act on)
    results = [json.loads(line) for p in (folder / C.SWEEP_TUNE).glob("*/*/result.json")
               for line in p.read_text().splitlines() if line.strip()]
    assert any("rows_per_s" in r and "1nna_cd" not in r for r in results)
    assert any("1nna_cd" in r and r["loss"] == r["train_loss"] for r in results)

    # the report: both trials finished, in the table and the page
    rows = (folder / C.SWEEP_REPORT / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and all("finished" in r for r in rows[1:])
    assert "two-seeds" in (folder / C.SWEEP_REPORT / "report.html").read_text()
