"""`raywsl run`: the whole chain, CI-sized, on a real local Ray, Zarr stores and an MLflow store; a
rerun reuses everything, and a second run folder that changes only later settings shares the rest."""

import json
import math
import re
import time

import mlflow
import numpy as np
import pytest

from raywsl import contract as C
from raywsl.cli import main
from raywsl.store.rows import RowStore

ARGS = ["data.source=corpus:12", "ingest.points=4096", "ingest.surface_points=1024", "ingest.shard_size=4",
        "ingest.test_fraction=0.3", "field.preset=tiny", "fit.steps=100", "fit.points_per_step=512",
        "fit.batch_size=6", "fit.shard_size=6", "fit.recon_count=4", "fit.recon_resolution=32",
        "diffusion.model=tiny", "train.steps=60", "train.batch_size=8", "train.log_every=20",
        "sample.count=6", "sample.steps=20", "sample.resolution=32", "eval.distances=[cd]"]
CHAIN = ["corpus", "ingest", "fit", "recon", "train", "sample", "eval", "report"]


def stages(run) -> dict:
    return json.loads((run / C.STAGES_FILE).read_text())["stages"]


@pytest.mark.timeout(400)
def test_run_end_to_end_then_reruns_reuse_what_they_can(ray_local, tmp_path, capsys):
    runs = tmp_path / "runs"
    run = runs / "e2e"
    t0 = time.perf_counter()
    assert main(["run", f"run.dir={run}", *ARGS]) == 0
    assert time.perf_counter() - t0 < 180  # CI-sized: under 3 minutes
    err = capsys.readouterr().err
    assert "report:" in err and all(re.search(rf"^  {s} +computed ", err, re.M) for s in CHAIN[:-1])
    # every stage's artifact, linked into the run folder
    for path in (f"corpus/{C.CORPUS_MANIFEST}", C.SAMPLES, C.WEIGHTS, f"checkpoints/diffusion_final/{C.CHECKPOINT_STATE}",
                 f"checkpoints/diffusion_final/{C.DIFFUSION_LOSS}", f"generated/{C.ROWS}", f"generated/{C.GENERATED_GRID}",
                 f"eval/{C.REFERENCE_SET}", f"eval/{C.WEIGHTS_PCA}", f"eval/{C.WEIGHTS_SPECTRUM}", f"recon/{C.RECON_GRID}", C.REPORT):
        assert (run / path).exists(), path
    assert (run / C.SAMPLES).is_symlink() and (run / C.SAMPLES).resolve().is_relative_to(runs / C.CACHE)
    recorded = stages(run)
    assert list(recorded) == CHAIN and not any(e["reused"] for e in recorded.values())
    assert recorded["fit"]["artifact"] == str(runs / C.CACHE / "fit" / recorded["fit"]["fingerprint"])
    metrics = json.loads((run / C.METRICS).read_text())
    for key in ("recon_cd_median", "mmd_cd", "cov_cd", "1nna_cd", "valid_share", "weights_attractor_share",
                "weights_cos_mean", "weights_cos_min", "weights_norm_mean", "weights_top100_dims_share",
                "weights_pca10_share"):
        assert math.isfinite(metrics[key]), key
    assert -1 <= metrics["weights_cos_min"] <= metrics["weights_cos_mean"] <= 1
    assert 0 < metrics["weights_pca10_share"] <= 1 + 1e-9
    assert metrics["n_generated"] == 6  # rows without a surface count against valid_share, not dropped
    held_out = RowStore.open(str(run / C.SAMPLES)).attrs[C.Attr.HELD_OUT]
    assert metrics["n_reference"] == held_out > 0  # the held-out shapes, never fitted
    assert set(metrics["stage_seconds"]) == set(CHAIN)
    html = (run / C.REPORT).read_text()
    assert html.count("data:image/png;base64,") >= 5 and "mmd_cd" in html and "computed" in html
    assert np.load(run / "generated" / C.ROWS).shape[0] == 6

    # one MLflow run holds params, metrics, figures, the stages and the report
    client = mlflow.tracking.MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    record = client.get_run((run / C.MLFLOW_RUN).read_text())
    assert record.data.params["train.steps"] == "60" and record.data.params["diffusion.tokenizer"] == "layer"
    assert {"mmd_cd", "recon_cd_median", "diffusion_loss", "stage_seconds_train"} <= set(record.data.metrics)
    assert record.data.tags["raywsl.run"] == "finished" and record.data.tags["stage.fit.reused"] == "False"
    assert record.data.tags["stage.train.fingerprint"] == recorded["train"]["fingerprint"]
    artifacts = {a.path for a in client.list_artifacts(record.info.run_id, "figures")}
    assert {"figures/generated.png", "figures/diffusion_loss.png", f"figures/{C.WEIGHTS_PCA}"} <= artifacts
    assert [a.path for a in client.list_artifacts(record.info.run_id, "report")] == ["report/report.html"]

    # a rerun finds every stage done: nothing is refitted, retrained or resampled
    final = run / "checkpoints" / "diffusion_final" / C.CHECKPOINT_STATE
    stamps = {p: p.stat().st_mtime_ns for p in (final, run / "generated" / C.ROWS)}
    assert main(["run", f"run.dir={run}", *ARGS]) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert all(e["reused"] for s, e in stages(run).items() if s != "report")

    # another run folder that changes only sample settings shares everything up to train
    other = runs / "other"
    assert main(["run", f"run.dir={other}", *ARGS, "sample.count=4"]) == 0
    recorded = stages(other)
    assert all(recorded[s]["reused"] for s in ("corpus", "ingest", "fit", "recon", "train"))
    assert not recorded["sample"]["reused"] and not recorded["eval"]["reused"]
    assert (other / "checkpoints" / "diffusion_final").resolve() == final.parent.resolve()
    assert final.stat().st_mtime_ns == stamps[final]
    assert np.load(other / "generated" / C.ROWS).shape[0] == 4
    assert json.loads((other / C.METRICS).read_text())["n_generated"] == 4
    assert np.load(run / "generated" / C.ROWS).shape[0] == 6  # the first run's samples are still there
