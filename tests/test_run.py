"""`raywsl run`: the whole chain, CI-sized, on a real local Ray, Zarr stores and an MLflow store."""

import json
import math
import time

import mlflow
import numpy as np
import pytest

from raywsl import layout as L
from raywsl.cli import main

ARGS = ["data.source=corpus:12", "ingest.points=4096", "ingest.surface_points=1024", "ingest.shard_size=4",
        "ingest.test_fraction=0.3", "field.preset=tiny", "fit.steps=100", "fit.points_per_step=512",
        "fit.batch_size=6", "fit.shard_size=6", "fit.recon_count=4", "fit.recon_resolution=32",
        "diffusion.model=tiny", "train.steps=60", "train.batch_size=8", "train.log_every=20",
        "sample.count=6", "sample.steps=20", "sample.resolution=32", "eval.distances=[cd]"]


@pytest.mark.timeout(400)
def test_run_end_to_end_then_a_rerun_does_nothing(ray_local, tmp_path, capsys):
    run = tmp_path / "runs" / "e2e"
    t0 = time.perf_counter()
    assert main(["run", f"run.dir={run}", *ARGS]) == 0
    assert time.perf_counter() - t0 < 180  # CI-sized: under 3 minutes
    assert "report:" in capsys.readouterr().out
    # every stage's output
    assert (run / "corpus" / "manifest.csv").exists()
    for path in (L.SAMPLES, L.WEIGHTS, f"{L.CHECKPOINTS}/{L.DIFFUSION_FINAL}/{L.CHECKPOINT_STATE}",
                 f"{L.GENERATED}/rows.npy", f"{L.GENERATED}/generated.png", f"{L.EVAL}/reference.csv",
                 f"{L.EVAL}/weights_pca.png", f"{L.RECON}/diffusion_loss.png", L.REPORT):
        assert (run / path).exists(), path
    metrics = json.loads((run / L.METRICS).read_text())
    for key in ("recon_cd_median", "mmd_cd", "cov_cd", "1nna_cd", "valid_share", "weights_attractor_share"):
        assert math.isfinite(metrics[key]), key
    assert metrics["n_generated"] == 6  # rows without a surface count against valid_share, not dropped
    assert set(metrics["stage_seconds"]) == {"corpus", "ingest", "fit", "train", "sample", "eval", "report"}
    html = (run / L.REPORT).read_text()
    assert html.count("data:image/png;base64,") >= 5 and "mmd_cd" in html  # self-contained page
    assert np.load(run / L.GENERATED / "rows.npy").shape[0] == 6

    # one MLflow run holds params, metrics, figures and the report
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    record = client.get_run((run / L.MLFLOW_RUN).read_text())
    assert record.data.params["train.steps"] == "60" and record.data.params["diffusion.tokenizer"] == "layer"
    assert {"mmd_cd", "recon_cd_median", "diffusion_loss", "stage_seconds_train"} <= set(record.data.metrics)
    assert record.data.tags["raywsl.run"] == "finished"
    artifacts = {a.path for a in client.list_artifacts(record.info.run_id, "figures")}
    assert {"figures/generated.png", "figures/diffusion_loss.png", "figures/weights_pca.png"} <= artifacts
    assert [a.path for a in client.list_artifacts(record.info.run_id, "report")] == ["report/report.html"]

    # a rerun finds every stage done: nothing is refitted, retrained or resampled
    final = run / L.CHECKPOINTS / L.DIFFUSION_FINAL / L.CHECKPOINT_STATE
    stamps = {p: p.stat().st_mtime_ns for p in (final, run / L.GENERATED / "rows.npy")}
    assert main(["run", f"run.dir={run}", *ARGS]) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    # an edit of a later stage's settings redoes that stage and the ones after it only
    assert main(["run", f"run.dir={run}", *ARGS, "sample.count=4"]) == 0
    assert final.stat().st_mtime_ns == stamps[final]
    assert np.load(run / L.GENERATED / "rows.npy").shape[0] == 4
    assert json.loads((run / L.METRICS).read_text())["n_generated"] == 4
