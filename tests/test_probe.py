"""`raywsl probe` and the eval stage's weight-space tables on a small real fitted store (3 categories x
3 shapes, none held out): the files, the numbers against a recomputation from the store, MLflow,
the refusals; and the tables' layout."""

import json

import mlflow
import numpy as np
import pytest
from conftest import plan_of

from raywsl import contract as C
from raywsl.cli import main
from raywsl.data.corpus import write_corpus
from raywsl.eval import probe as P
from raywsl.eval import weights
from raywsl.eval.run import _weight_diagnostics
from raywsl.report import _weight_space

INGEST = ["ingest.points=4096", "ingest.surface_points=1024", "ingest.shard_size=4", "ingest.test_fraction=0"]
FIT = ["field.preset=tiny", "fit.steps=60", "fit.points_per_step=512", "fit.check_every=20", "fit.batch_size=9",
       "fit.shard_size=9", "fit.recon_count=0", "fit.device=cpu"]
CATEGORIES = ["blob", "torus", "chair"]


@pytest.fixture(scope="module")
def fitted(ray_local, tmp_path_factory):
    """(run folder, config args): 9 corpus shapes of 3 categories, ingested and fitted in-process."""
    root = tmp_path_factory.mktemp("probe")
    manifest = write_corpus(root / "corpus", 9, seed=0, categories=CATEGORIES, progress=False)
    run, args = root / "run", [f"data.source={manifest}", *INGEST, *FIT]
    assert main(["ingest", f"run.dir={run}", *args]) == 0
    assert main(["fit", f"run.dir={run}", *args]) == 0
    return run, args


def _training(run, args):
    """The fitted training rows and their categories, read straight from the store."""
    from raywsl.store.split import training_rows
    from raywsl.store.weights import open_weights

    cfg, plan = plan_of(f"run.dir={run}", *args)
    store = open_weights(plan.weights)
    rows = training_rows(store, cfg.data.shapes)
    return store.group[C.ROW_WEIGHTS][:][rows], np.array([str(c) for c in store.row_meta()[C.CATEGORY][rows]])


def test_probe_command_writes_the_tables_and_logs_them(fitted, capsys):
    run, args = fitted
    assert main(["probe", f"run.dir={run}", *args, "--seeds", "3", "--test-fraction", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "| 1-NN accuracy (cosine) |" in out and "| mean L2 norm |" in out and "- split:" not in out
    result = json.loads((run / C.PROBE / C.PROBE_JSON).read_text())
    W, labels = _training(run, args)
    assert result["rows"] == len(W) == 9 and result["field_type"] == "mlp"
    probe, stats = result["probe"], result["statistics"]
    assert (probe["classes"], probe["class_sizes"], probe["seeds"]) == (3, [3, 3, 3], [0, 1, 2])
    assert probe["n_test"] == 3 and probe["chance"] == pytest.approx(1 / 3)  # one of each category per split
    # the same numbers from the store's rows, by the library functions
    expected = weights.probe_table(W, labels, seeds=3, test_fraction=0.3, seed=0)
    for m in weights.PROBES:
        np.testing.assert_allclose(probe[f"{m}_values"], expected[f"{m}_values"])
        assert probe[f"{m}_std"] == pytest.approx(np.std(expected[f"{m}_values"], ddof=1))
        assert -1 <= probe[m] <= 1
    norms = np.linalg.norm(W.astype(np.float64), axis=1)
    assert stats["norm_mean"] == pytest.approx(norms.mean(), rel=1e-6)
    assert stats["norm_std"] == pytest.approx(norms.std(), rel=1e-4)
    X = W / norms[:, None]
    cos = (X @ X.T)[np.triu_indices(9, k=1)]
    assert stats["cos_min"] == pytest.approx(cos.min(), abs=1e-5) and stats["cos_max"] == pytest.approx(cos.max(), abs=1e-5)
    assert stats["cos_mean"] == pytest.approx(cos.mean(), abs=1e-5)
    assert stats["dims"] == W.shape[1] and 0 < stats["top10_dims_share"] <= 1
    table = (run / C.PROBE / C.PROBE_TABLE).read_text()
    assert "| probe (papers/004, Table 4) | mean ± std | chance |" in table
    assert f"| k-means ARI | {100 * probe['kmeans_ari']:.1f}% ± {100 * probe['kmeans_ari_std']:.1f}% | 0.0% |" in table
    assert "3 seeds, each a stratified split holding out 30% of each of 3 classes (3 test rows)" in table

    client = mlflow.tracking.MlflowClient(f"sqlite:///{run.parent / 'mlflow.db'}")
    record = client.get_run((run / C.MLFLOW_RUN).read_text())
    assert record.data.tags["raywsl.probe"] == "finished"
    logged = record.data.metrics
    assert logged["probe.nn_accuracy"] == pytest.approx(probe["nn_accuracy"])
    assert logged["probe.kmeans_ari_std"] == pytest.approx(probe["kmeans_ari_std"])
    assert logged["probe.cos_min"] == pytest.approx(stats["cos_min"]) and logged["probe.seeds"] == 3
    assert "probe/probe.json" in {a.path for a in client.list_artifacts(record.info.run_id, "probe")}


def test_probe_is_refused_before_fit_and_for_too_few_rows_per_class(fitted, tmp_path, capsys):
    run, args = fitted
    unfitted = run.parent / "unfitted"  # same cache: ingested, but no weights for fit.steps=61
    assert main(["probe", f"run.dir={unfitted}", *args, "fit.steps=61"]) == 2
    assert "run `raywsl fit` with this config first" in capsys.readouterr().err
    assert not unfitted.exists()  # refused before anything is written
    assert main(["probe", f"run.dir={run}", *args, "--test-fraction", "1.5"]) == 2
    assert "--test-fraction must be in (0, 1), got 1.5" in capsys.readouterr().err
    assert main(["probe", f"run.dir={run}", *args, "--seeds", "0"]) == 2
    assert "--seeds must be at least 1" in capsys.readouterr().err
    # three training shapes: a category with a single shape (or a single category) cannot be split
    assert main(["probe", f"run.dir={run}", *args, "data.shapes=3"]) == 2
    err = capsys.readouterr().err
    assert "3 training rows, data.shapes=3" in err and ("too few in:" in err or "at least two classes" in err)


def test_eval_weight_diagnostics_carry_the_same_tables(fitted, tmp_path):
    run, args = fitted
    cfg, plan = plan_of(f"run.dir={run}", *args)
    metrics = _weight_diagnostics(cfg, plan, str(tmp_path))
    W, labels = _training(run, args)
    probe = weights.probe_table(W, labels, seeds=P.PROBE_SEEDS, test_fraction=P.PROBE_TEST_FRACTION, seed=cfg.seed)
    stats = weights.weight_statistics(W, seed=cfg.seed)
    assert metrics == {**P.eval_metrics(probe, stats),
                       "weights_pca10_share": pytest.approx(metrics["weights_pca10_share"])}
    for key in ("weights_probe_nn_accuracy", "weights_probe_nn_accuracy_std", "weights_probe_logistic_accuracy",
                "weights_probe_logistic_accuracy_std", "weights_probe_kmeans_ari", "weights_probe_kmeans_ari_std",
                "weights_probe_chance", "weights_norm_mean", "weights_norm_std", "weights_cos_mean",
                "weights_cos_min", "weights_cos_max", "weights_top10_dims_share", "weights_top1000_dims_share",
                "weights_top10000_dims_share"):
        assert np.isfinite(metrics[key]), key
    assert metrics["weights_probe_seeds"] == 5 and (tmp_path / C.WEIGHTS_SPECTRUM).exists()
    page = _weight_space(metrics)
    assert "<td>1-NN accuracy (cosine)</td>" in page and "<td>min pairwise cosine</td>" in page
    assert f"{100 * metrics['weights_probe_nn_accuracy']:.1f}% ± " in page

    # three training shapes cannot be split by category: the statistics stay, the probes say why not
    cfg, plan = plan_of(f"run.dir={run}", *args, "data.shapes=3")
    few = _weight_diagnostics(cfg, plan, str(tmp_path))
    assert "too few in:" in few["weights_probe_skipped"] or "two classes" in few["weights_probe_skipped"]
    assert not any(k.startswith("weights_probe_") and k != "weights_probe_skipped" for k in few)
    assert few["weights_norm_mean"] == pytest.approx(weights.weight_statistics(W[:3])["norm_mean"])
    assert "<td>mean L2 norm</td>" in _weight_space(few) and "1-NN" not in _weight_space(few)


def test_tables_round_trip_through_metric_keys():
    rng = np.random.default_rng(0)
    labels = np.repeat(["mug", "lamp"], 10)
    W = np.where(labels[:, None] == "mug", 5.0, -5.0) * np.ones((20, 8)) + rng.normal(size=(20, 8))
    probe, stats = weights.probe_table(W, labels, seeds=2), weights.weight_statistics(W)
    metrics = P.eval_metrics(probe, stats)
    assert metrics["weights_probe_nn_accuracy"] == 1.0 and metrics["weights_probe_chance"] == 0.5
    assert metrics["weights_cos_min"] == stats["cos_min"] and metrics["weights_dims"] == 8
    assert P.from_metrics({**metrics, "mmd_cd": 0.1}) == (P.probe_scalars(probe), P.statistics_scalars(stats))
    assert P.probe_rows(P.probe_scalars(probe))[0] == ("1-NN accuracy (cosine)", "100.0% ± 0.0%", "50.0%")
    rows = dict(P.statistics_rows(P.statistics_scalars(stats)))
    assert rows["variance held by the top 10 coordinates"] == "100% (all 8 coordinates)"
    assert rows["std of the L2 norm"].endswith("of the mean)")
    assert P.eval_metrics(None, stats) == {k: v for k, v in metrics.items() if not k.startswith("weights_probe_")}
