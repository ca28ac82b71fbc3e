"""The local MLflow tracking server a sweep runs its trials against: concurrent writers, parent and
child runs, a clean stop. And the alarm a NaN / inf metric raises in a real local store."""

import logging
import math
import os
import subprocess
import sys
import urllib.request

import pytest

from raywsl.tracking import tracking_server

CHILD = """
import sys, mlflow
mlflow.set_tracking_uri(sys.argv[1])
with mlflow.start_run(run_id=sys.argv[2]):
    with mlflow.start_run(run_name=sys.argv[3], nested=True, experiment_id=sys.argv[4]):
        for step in range(20):
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
        mlflow.log_param("trial", sys.argv[3])
        mlflow.log_text("hello", "note.txt")
"""


@pytest.mark.timeout(240)
def test_two_processes_write_child_runs_of_one_parent_through_the_server(tmp_path):
    from mlflow.tracking import MlflowClient

    with tracking_server(str(tmp_path / "tracking")) as uri:
        assert uri.startswith("http://127.0.0.1:")
        client = MlflowClient(uri)  # no global mlflow state in the test process
        exp_id = client.create_experiment("sweep")
        pid = client.create_run(exp_id, run_name="parent").info.run_id
        procs = [subprocess.Popen([sys.executable, "-c", CHILD, uri, pid, f"trial-{i}", exp_id]) for i in range(2)]
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
        children = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{pid}'")
        assert sorted(r.data.params["trial"] for r in children) == ["trial-0", "trial-1"]
        for r in children:
            assert len(client.get_metric_history(r.info.run_id, "loss")) == 20
            assert [a.path for a in client.list_artifacts(r.info.run_id)] == ["note.txt"]
    # stopped: nothing answers any more, and the runs stay in the folder's sqlite store and artifacts
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{uri}/health", timeout=2)
    assert (tmp_path / "tracking" / "mlflow.db").exists()
    assert any(f == "note.txt" for _, _, files in os.walk(tmp_path / "tracking" / "mlartifacts") for f in files)


def test_a_server_that_cannot_start_is_a_clear_error(tmp_path):
    (tmp_path / "mlflow.db").write_text("not a database")  # sqlite refuses it: the server exits
    with pytest.raises(RuntimeError, match=r"MLflow tracking server .* exited with .*mlflow-server.log"):
        with tracking_server(str(tmp_path), timeout=60):
            pass


def test_a_non_finite_metric_is_logged_with_a_warning_and_an_alarm_tag(tmp_path, monkeypatch, caplog):
    """A NaN loss is the record of a diverged model: logged as NaN (MLflow's sqlite store keeps it; it
    clamps inf to the largest float), warned about, and listed in the run's alarm.nonfinite tag, which
    accumulates over calls; nonfinite_metrics counts the names. Finite numbers log as before."""
    import mlflow
    import numpy as np
    from mlflow.tracking import MlflowClient

    from raywsl import tracking

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment("alarms", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment) as run, caplog.at_level(logging.WARNING, "raywsl.tracking"):
            logged = tracking.log_metrics({"loss": float("nan"), "grad_norm": 2.5,
                                           "probe": {"acc": np.float32(np.inf)}}, step=3)
            assert tracking.log_metrics({"loss": 0.5, "other": -math.inf}, step=4) == {"loss": 0.5}
    finally:
        mlflow.set_tracking_uri(None)
    assert logged == {"grad_norm": 2.5}  # what the caller gets back: the finite numbers
    client = MlflowClient(uri)
    run_id = run.info.run_id
    assert client.get_run(run_id).data.tags[tracking.ALARM_TAG] == "loss,other,probe.acc"
    loss = [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")]
    assert loss[0][0] == 3 and math.isnan(loss[0][1]) and loss[1] == (4, 0.5)
    assert client.get_metric_history(run_id, "probe.acc")[0].value == 1.7976931348623157e308
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, tracking.NONFINITE_METRIC)] == [
        (3, 2.0), (4, 3.0)]
    assert [m.value for m in client.get_metric_history(run_id, "grad_norm")] == [2.5]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 3 and all(tracking.ALARM_TAG in w for w in warned)
    assert any(w.startswith("metric loss is nan at step 3") for w in warned)


def test_without_a_run_a_non_finite_metric_still_warns(tmp_path, monkeypatch, caplog):
    import mlflow

    from raywsl import tracking

    monkeypatch.chdir(tmp_path)
    assert mlflow.active_run() is None
    with caplog.at_level(logging.WARNING, "raywsl.tracking"):
        assert tracking.log_metrics({"a": 1, "b": float("nan")}) == {"a": 1.0}
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["metric b is nan at step None"]
    assert list(tmp_path.iterdir()) == []
