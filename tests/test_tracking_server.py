"""The local MLflow tracking server a sweep runs its trials against: concurrent writers, parent and
child runs, a clean stop."""

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
