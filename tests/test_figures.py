"""Figures are real PNGs of the promised size, the mesh renderer draws the shape where it should,
and the MLflow helpers land metrics and artifacts in a real (sqlite) tracking store."""

from __future__ import annotations

import json
import math

import mlflow
import numpy as np
import pytest
import trimesh
from matplotlib.image import imread
from mlflow.tracking import MlflowClient

from raywsl import tracking
from raywsl.geometry import figures


def png_shape(path):
    assert path.exists() and path.stat().st_size > 0
    return imread(path).shape[:2]  # (height, width)


def test_render_of_a_sphere_is_a_centred_disc():
    image = figures.render_mesh(trimesh.creation.icosphere(subdivisions=4), size=128)
    assert image.shape == (128, 128, 3) and 0 <= image.min() and image.max() <= 1
    foreground = (image < 0.99).any(axis=2)
    # A unit sphere drawn at 90 % of the half-width: a disc of radius ~57.6 px, ~63.6 % of the frame.
    assert foreground.mean() == pytest.approx(math.pi * 0.45**2, rel=0.05)
    ys, xs = np.nonzero(foreground)
    assert abs(xs.mean() - 63.5) < 1 and abs(ys.mean() - 63.5) < 1
    assert np.hypot(xs - 63.5, ys - 63.5).max() < 0.45 * 128 + 1.5  # nothing outside the disc
    assert foreground[np.hypot(*(np.mgrid[:128, :128] - 63.5)) < 0.45 * 128 - 1.5].all()  # no holes
    # Lambert shading: the side facing the light (upper left) is brighter than the lower right.
    assert image[40, 40].sum() > image[88, 88].sum() + 0.3


def test_render_in_chunks_matches_one_pass(monkeypatch):
    mesh = trimesh.creation.torus(0.6, 0.25)
    whole = figures.render_mesh(mesh, 64)
    monkeypatch.setattr(figures, "MAX_CANDIDATES", 500)
    np.testing.assert_array_equal(figures.render_mesh(mesh, 64), whole)


def test_render_shows_inverted_faces_in_the_back_colour():
    sphere = trimesh.creation.icosphere(subdivisions=3)
    inverted = sphere.copy()
    inverted.invert()
    centre = (figures.render_mesh(sphere, 64)[32, 32], figures.render_mesh(inverted, 64)[32, 32])
    assert centre[0][2] > centre[0][0]  # outward faces: blue
    assert centre[1][0] > centre[1][2]  # faces seen from behind: warm


def test_render_meshes_grid(tmp_path):
    meshes = [trimesh.creation.icosphere(), None, trimesh.creation.box(), trimesh.creation.torus(0.6, 0.2),
              trimesh.Trimesh()]
    path = figures.render_meshes(meshes, tmp_path / "grid.png", titles=list("abcde"), ncols=3, size=100)
    assert png_shape(path) == (2 * (100 + 22), 3 * 100)
    image = imread(path)[..., :3]
    # The missing mesh's cell (row 0, column 1) is grey away from its caption, the sphere's is not empty.
    assert np.ptp(image[22 + 5:22 + 35, 100 + 5:200 - 5]) < 0.01
    assert (image[22:122, :100] < 0.9).any()
    assert png_shape(figures.render_meshes([trimesh.creation.box()], tmp_path / "one.png", size=64)) == (64, 64)


def test_plots_write_pngs_of_the_expected_size(tmp_path):
    rng = np.random.default_rng(0)
    hist = figures.plot_histogram({"generated": np.r_[rng.random(50), np.inf], "reference": rng.random(40)},
                                  tmp_path / "hist.png", xlabel="Chamfer distance")
    spectrum = figures.plot_spectrum(np.sort(rng.random(20))[::-1] / 20, tmp_path / "spectrum.png")
    W, labels = rng.normal(size=(60, 30)), np.repeat(["a", "b", "c"], 20)
    embedding = figures.plot_embedding(W, labels, tmp_path / "pca.png")
    tsne = figures.plot_embedding(W, None, tmp_path / "tsne.png", method="tsne")
    curves = figures.plot_curves({"train": (np.arange(100), np.exp(-np.arange(100) / 30)),
                                  "val": ([0, 50, 99], [1.0, 0.3, 0.1])}, tmp_path / "sub" / "loss.png")
    for path in (hist, spectrum, curves):
        assert png_shape(path) == (480, 640)
    for path in (embedding, tsne):
        assert png_shape(path) == (560, 640)
    with pytest.raises(ValueError):
        figures.plot_embedding(W, labels, tmp_path / "x.png", method="umap")


@pytest.fixture
def mlflow_run(tmp_path, monkeypatch):
    """An active run in a fresh sqlite tracking store, its artifacts under tmp_path."""
    monkeypatch.chdir(tmp_path)  # anything MLflow writes relative to the cwd stays in tmp_path
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = mlflow.create_experiment("eval-test", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        yield run
    mlflow.set_tracking_uri(None)


def test_tracking_logs_metrics_and_artifacts(mlflow_run, tmp_path):
    logged = tracking.log_metrics({
        "cosine": {"mean": np.float32(0.96), "std": 0.01, "most_central": np.arange(5)},
        "probes": {"nn_accuracy": 1, "logistic_accuracy": float("nan"), "method": "cosine"},
        "barrier": np.inf, "subsampled": True, "bad name?": 2.0, "none": None,
    }, step=3)
    assert logged == {"cosine.mean": pytest.approx(0.96), "cosine.std": 0.01, "probes.nn_accuracy": 1.0,
                      "subsampled": 1.0, "bad name_": 2.0}
    figure = figures.plot_curves({"loss": ([0, 1], [1.0, 0.5])}, tmp_path / "loss.png")
    tracking.log_figure(figure)
    meshes = []
    for name in ("a.ply", "b.obj"):
        meshes.append(tmp_path / name)
        trimesh.creation.box().export(meshes[-1])
    tracking.log_meshes(meshes)
    tracking.log_json({"chamfer": np.array([0.5, np.inf]), "n": np.int64(3)}, "eval/metrics.json")

    run_id = mlflow_run.info.run_id
    metrics = mlflow.get_run(run_id).data.metrics
    assert metrics["cosine.mean"] == pytest.approx(0.96) and metrics["bad name_"] == 2.0
    # Non-finite values are logged as MLflow stores them (NaN; inf as the largest float), and flagged.
    assert math.isnan(metrics["probes.logistic_accuracy"]) and metrics["barrier"] == 1.7976931348623157e308
    assert mlflow.get_run(run_id).data.tags["alarm.nonfinite"] == "barrier,probes.logistic_accuracy"
    assert [m.step for m in MlflowClient().get_metric_history(run_id, "cosine.std")] == [3]
    client = MlflowClient()
    assert [a.path for a in client.list_artifacts(run_id, "figures")] == ["figures/loss.png"]
    assert [a.path for a in client.list_artifacts(run_id, "meshes")] == ["meshes/a.ply", "meshes/b.obj"]
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="eval/metrics.json",
                                                dst_path=str(tmp_path / "download"))
    assert json.loads(open(local).read()) == {"chamfer": [0.5, float("inf")], "n": 3}


def test_tracking_without_a_run_is_a_no_op(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert mlflow.active_run() is None
    assert tracking.log_metrics({"a": {"b": 1}}) == {"a.b": 1.0}
    tracking.log_figure(tmp_path / "missing.png")
    tracking.log_meshes([tmp_path / "missing.ply"])
    tracking.log_json({"a": 1}, "x.json")
    assert list(tmp_path.iterdir()) == []
