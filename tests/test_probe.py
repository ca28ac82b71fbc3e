"""`raywsl probe` and the eval stage's weight-space tables on a small real fitted store (3 categories x
3 shapes, none held out): the files, the numbers against a recomputation from the store, MLflow,
the refusals; and the tables' layout. The store's rows streamed (StoreRows) with memory that does not
grow with their number; and the recon stage's file names on the same store, whose shape ids are
path-like on purpose ('chair/<id>/model' as a ShapeNet folder gives; ingest refuses a '..' component,
data/sources.py, but not '..' inside a name)."""

import csv
import functools
import hashlib
import json
import os
import tracemalloc

import mlflow
import numpy as np
import pytest
from conftest import plan_of

from raywsl import contract as C
from raywsl.cli import main
from raywsl.data.corpus import write_corpus
from raywsl.eval import probe as P
from raywsl.eval import run as eval_run
from raywsl.eval import weights
from raywsl.eval.run import _weight_diagnostics
from raywsl.fit.recon import recon_file, reconstruct
from raywsl.report import _weight_space
from raywsl.store.rows import DONE, FAILED, ArraySpec, RowStore

INGEST = ["ingest.points=4096", "ingest.surface_points=1024", "ingest.shard_size=4", "ingest.test_fraction=0"]
FIT = ["field.preset=tiny", "fit.steps=60", "fit.points_per_step=512", "fit.check_every=20", "fit.batch_size=9",
       "fit.shard_size=9", "fit.recon_count=0", "fit.device=cpu"]
CATEGORIES = ["blob", "torus", "chair"]


def path_like_ids(manifest):
    """Rewrite the corpus manifest's ids to '<category>/<id>/model' ('<category>/..<id>/model' for the
    first): ids that are not file names."""
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    for k, row in enumerate(rows):
        row["id"] = f"{row['category']}/{'..' if k == 0 else ''}{row['id']}/model"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return manifest


@pytest.fixture(scope="module")
def fitted(ray_local, tmp_path_factory):
    """(run folder, config args): 9 corpus shapes of 3 categories with path-like ids, ingested and
    fitted in-process."""
    root = tmp_path_factory.mktemp("probe")
    manifest = path_like_ids(write_corpus(root / "corpus", 9, seed=0, categories=CATEGORIES, progress=False))
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
    assert stats["cos_min"] == pytest.approx(cos.min(), abs=1e-5)
    assert stats["cos_max"] == pytest.approx(cos.max(), abs=1e-5)
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
    # nine rows, far below SAMPLE_ROWS: every statistic over all of them
    assert (metrics["weights_n"], metrics["weights_sample_rows"], metrics["weights_subsampled"]) == (9, 9, False)
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


def test_eval_weight_diagnostics_on_a_seeded_subset(fitted, tmp_path, monkeypatch):
    """Above the subset size, pairs / PCA / probes see the subset and say so; norms, variance shares
    and cosine to the mean stay those of all rows."""
    run, args = fitted
    cfg, plan = plan_of(f"run.dir={run}", *args)
    monkeypatch.setattr(eval_run, "training_weights", functools.partial(P.training_weights, max_rows=5))
    metrics = _weight_diagnostics(cfg, plan, str(tmp_path))
    W, _ = _training(run, args)
    assert (metrics["weights_n"], metrics["weights_sample_rows"], metrics["weights_subsampled"]) == (9, 5, True)
    full, sub = weights.weight_statistics(W, seed=cfg.seed), weights.weight_statistics(W, max_rows=5, seed=cfg.seed)
    for key in ("norm_mean", "norm_std", "cos_to_mean", "top10_dims_share", "dims"):  # exact over all 9 rows
        assert metrics[f"weights_{key}"] == pytest.approx(full[key], rel=1e-6), key
    assert metrics["weights_cos_mean"] == pytest.approx(sub["cos_mean"]) and sub["pairs"] == 10  # 5 rows: 10 pairs
    # 5 of 3 categories: some category has fewer than 2 rows, and the reason names the subset
    assert "a seeded subset of 5" in metrics["weights_probe_skipped"]
    assert "<td>rows of the seeded subset (pairwise cosine, PCA, probes)</td><td>5</td>" in _weight_space(metrics)


def test_recon_files_are_named_by_row_not_by_shape_id(fitted, tmp_path):
    """A shape id is data: 'chair/<id>/model' (a subfolder recon/ does not have) gives a flat file
    inside recon/, listed next to its id in metrics.json; so would '../../escape' (ingest refuses such
    ids now, but a store may hold anything)."""
    run, args = fitted
    cfg, plan = plan_of(f"run.dir={run}", *args, "fit.recon_count=9", "fit.recon_resolution=24")
    out = tmp_path / "run" / "recon"
    out.mkdir(parents=True)
    before = {p for p in tmp_path.rglob("*")} | {p for p in run.parent.rglob("*")}
    result = reconstruct(cfg, plan, str(out))
    created = ({p for p in tmp_path.rglob("*")} | {p for p in run.parent.rglob("*")}) - before
    assert created and all(p.parent == out for p in created), sorted(map(str, created))
    shapes = json.loads((out / C.STAGE_METRICS).read_text())["recon"]["shapes"]
    assert result["recon_count"] == len(shapes) == 9
    assert all(s["shape_id"].endswith("/model") for s in shapes) and any("/.." in s["shape_id"] for s in shapes)
    written = [s for s in shapes if s["file"]]
    assert len(written) >= 7  # a 60-step fit may leave a field without a surface, not most of them
    for s in written:
        assert s["file"] == recon_file(s["row"], s["shape_id"]) and "/" not in s["file"]
        assert (out / s["file"]).stat().st_size > 100
    assert sorted(p.name for p in out.glob("*.ply")) == sorted(s["file"] for s in written)
    assert len({s["file"] for s in written}) == len(written)
    assert recon_file(12, "chair/x/model") == f"0000012-{hashlib.sha1(b'chair/x/model').hexdigest()[:8]}.ply"
    for shape_id in ("../../escape", "a/../../../b", "/etc/passwd", ".."):
        name = recon_file(3, shape_id)
        assert os.path.dirname(os.path.normpath(os.path.join(out, name))) == str(out), shape_id


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


# ------------------------------------------------------------------------------------ streaming a real store

def weight_store(path, n, dims, shard_size=16, failed=(), seed=0):
    """(store, W): a real weight store of n rows (row k of category 'c<k % 3>') written shard by shard;
    rows in `failed` are recorded failed (zeros), as fit leaves them."""
    W = (1.0 + 0.2 * np.random.default_rng(seed).normal(size=(n, dims))).astype(np.float32)
    store = RowStore.create(str(path), kind="weights", ids=[f"s{k}" for k in range(n)], sources=[""] * n,
                            categories=[f"c{k % 3}" for k in range(n)], shard_size=shard_size,
                            arrays=[ArraySpec(C.ROW_WEIGHTS, (dims,))], fingerprint="test")
    for k in range(store.n_shards):
        rows = range(n)[store.shard_rows(k)]
        status = np.array([FAILED if r in failed else DONE for r in rows])
        store.write_shard(k, {C.ROW_WEIGHTS: np.where(status[:, None] == DONE, W[rows.start:rows.stop], 0)},
                          status, ["bad" if r in failed else "" for r in rows])
    return store, W


def test_store_rows_stream_the_exact_statistics(tmp_path):
    store, W = weight_store(tmp_path / "w.zarr", n=90, dims=256, failed={5, 40, 41})  # 1 KiB rows: a chunk each
    rows = np.flatnonzero(store.status() == DONE)
    source = P.StoreRows(store, rows, read_elements=7 * 256)  # slices of <= 7 rows inside shards of 16
    blocks = list(source.blocks())
    assert max(len(b) for _, b in blocks) == 7 and len({a for a, _ in blocks}) == len(blocks)
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), W[rows])  # failed rows left out
    assert [a for a, _ in blocks] == list(np.cumsum([0] + [len(b) for _, b in blocks[:-1]]))
    np.testing.assert_array_equal(source.categories(np.array([0, 5, 84])), [f"c{rows[k] % 3}" for k in (0, 5, 84)])

    T, G = W[rows], W[[3, 3, 70]] + np.float32(0.01)  # generated rows near training rows 3 and 70
    scan = weights.scan_weights(source, max_rows=30, seed=4, generated=G)
    memory = weights.scan_weights(T, max_rows=30, seed=4, generated=G)
    stats = scan.statistics
    assert (stats["n"], stats["sample_rows"], stats["subsampled"], stats["pairs"]) == (87, 30, True, 435)
    np.testing.assert_array_equal(scan.subset, weights.seeded_subset(87, 30, 4))
    np.testing.assert_array_equal(scan.subset_weights, T[scan.subset])
    # exact over all 87 rows: float64 definitions
    T64 = T.astype(np.float64)
    norms, var, mean = np.linalg.norm(T64, axis=1), T64.var(axis=0), T64.mean(axis=0)
    assert stats["norm_mean"] == pytest.approx(norms.mean(), rel=1e-12)
    assert stats["norm_std"] == pytest.approx(norms.std(), rel=1e-9)
    assert stats["cos_to_mean"] == pytest.approx(np.mean(T64 @ mean / (norms * np.linalg.norm(mean))), rel=1e-6)
    assert stats["top10_dims_share"] == pytest.approx(np.sort(var)[::-1][:10].sum() / var.sum(), rel=1e-9)
    assert stats["coord_std_median"] == pytest.approx(np.sqrt(np.median(var)), rel=1e-9)
    for key, value in memory.statistics.items():  # and what the in-memory matrix gives
        if key.startswith("cos_") and key != "cos_to_mean" and key != "cos_to_mean_max":
            assert value == stats[key], key  # the same subset rows: the same pairs, bit for bit
        else:
            np.testing.assert_allclose(stats[key], value, rtol=1e-6, err_msg=key)
    near = scan.nearest
    np.testing.assert_array_equal(near["cos_index"][:, 0], [3, 3, 67])  # row 70 is position 67 (5, 40, 41 failed)
    np.testing.assert_array_equal(near["l2_index"], memory.nearest["l2_index"])
    np.testing.assert_allclose(near["l2_dist"], memory.nearest["l2_dist"], rtol=1e-12)
    assert (near["distinct_nearest"], near["n_training"]) == (2, 87)
    metrics = P.eval_metrics(None, stats)
    assert (metrics["weights_n"], metrics["weights_sample_rows"], metrics["weights_subsampled"]) == (87, 30, True)
    assert ("rows of the seeded subset (pairwise cosine, PCA, probes)", "30") in P.statistics_rows(stats)


def _peak_bytes(store) -> int:
    """The tracemalloc peak of scanning the store's rows (subset of 50, reads of 32 rows)."""
    rows = np.flatnonzero(store.status() == DONE)
    dims = int(store.group[C.ROW_WEIGHTS].shape[1])
    tracemalloc.start()
    try:
        weights.scan_weights(P.StoreRows(store, rows, read_elements=32 * dims), max_rows=50, bins=1 << 12,
                             generated=np.ones((4, dims), np.float32))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_streaming_memory_does_not_grow_with_the_rows(tmp_path):
    """Ten times the rows: the peak grows by the few numbers kept per row (norms, cosine to the mean),
    not by the rows; the whole scan holds a fraction of the matrix."""
    small, _ = weight_store(tmp_path / "small.zarr", n=400, dims=200, shard_size=100)
    big, W = weight_store(tmp_path / "big.zarr", n=4000, dims=200, shard_size=100)
    peak_small, peak_big = _peak_bytes(small), _peak_bytes(big)
    print(f"peak {peak_small / 1e6:.2f} MB at 400 rows, {peak_big / 1e6:.2f} MB at 4000 ({W.nbytes / 1e6:.1f} MB)")
    assert peak_big < W.nbytes / 4
    assert peak_big - peak_small < 0.1 * W.nbytes  # loading the rows would add 0.9 * W.nbytes


# ---------------------------------------------------------------- the topology probes (raywsl/probes)

def test_probe_phase_in_weight_space_writes_the_path_and_its_transitions(fitted):
    run, args = fitted
    assert main(["probe", "phase", f"run.dir={run}", *args, "--space", "weights", "--from", "blob",
                 "--to", "torus", "--steps", "5", "--seeds", "2", "--resolution", "24"]) == 0
    out = run / C.PROBE / "phase-weights"
    with open(out / "path.csv", newline="") as f:
        path = list(csv.DictReader(f))
    assert len(path) == 2 * 5 and [float(r["alpha"]) for r in path[:5]] == [0, 0.25, 0.5, 0.75, 1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["space"] == "weights" and summary["field_type"] == "mlp"
    for seed in (0, 1):  # each seed's figures are those of its own path's counts
        rows = [r for r in path if int(r["seed"]) == seed]
        counts = [int(r["major_components"]) if r["ok"] == "True" else 0 for r in rows]
        t = summary["seeds"][seed]
        assert (t["start"], t["end"], t["max"]) == (counts[0], counts[-1], max(counts))
        first = next((k for k, c in enumerate(counts) if c != counts[0]), None)
        assert (first is None and t["alpha_star"] != t["alpha_star"]) or t["alpha_star"] == pytest.approx(first / 4)
    # seed 0's path starts at the first blob's own row: its decode is that shape's
    cfg, plan = plan_of(f"run.dir={run}", *args)
    from raywsl.probes.common import Training, decode
    training = Training.load(cfg, plan, 2, "test")
    (start,), _ = decode(training.field, training.weights([training.find("blob")]), 24, "cpu")
    assert int(path[0]["major_components"]) == start["major_components"] and path[0]["euler"] == str(start["euler"])
    assert (out / "phase.png").stat().st_size > 10_000 and (out / "transitions.csv").exists()
    client = mlflow.tracking.MlflowClient(f"sqlite:///{run.parent / 'mlflow.db'}")
    record = client.get_run((run / C.MLFLOW_RUN).read_text())
    assert record.data.tags["raywsl.probe-phase"] == "finished"
    assert record.data.metrics["phase_weights.transition_share"] == summary["transition_share"]
    listed = {a.path for a in client.list_artifacts(record.info.run_id, "probe/phase-weights")}
    assert {"probe/phase-weights/phase.png", "probe/phase-weights/summary.json"} <= listed


def test_probe_subspace_of_one_category(fitted):
    run, args = fitted
    assert main(["probe", "subspace", f"run.dir={run}", *args, "--category", "torus", "--dims", "1,2",
                 "--radii", "0.5,1", "--samples", "2", "--paths", "1", "--path-steps", "2", "--resolution", "24",
                 "--points", "256"]) == 0
    out = run / C.PROBE / "subspace-weights"
    with open(out / "samples.csv", newline="") as f:
        samples = list(csv.DictReader(f))
    kinds = [r["kind"] for r in samples]
    assert kinds.count("training") == 3 and kinds.count("sample") == 2 * 2 * 2 and kinds.count("path") == 2
    assert {r["nearest_id"].split("/")[0] for r in samples if r["valid"] == "1.0"} <= {"torus"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shapes"] == 3 and summary["dims"] == [1, 2] and len(summary["explained_variance"]) == 2
    table = {(t["kind"], t["m"], t["radius"]): t for t in summary["table"]}
    group = [r for r in samples if r["kind"] == "sample" and int(r["m"]) == 2 and float(r["radius"]) == 1]
    assert len(group) == 2
    assert table[("sample", 2, 1.0)]["kept_share"] == pytest.approx(np.mean([float(r["kept"]) for r in group]))
    assert (out / "subspace.png").exists() and (out / "renders.png").exists()


def test_topology_probes_refuse_bad_requests(fitted, capsys):
    run, args = fitted
    assert main(["probe", "subspace", f"run.dir={run}", *args, "--category", "bracket"]) == 2
    assert "no fitted training shape of category 'bracket'" in capsys.readouterr().err
    assert main(["probe", "phase", f"run.dir={run}", *args, "--space", "weights"]) == 2
    assert "--space weights needs --from and --to" in capsys.readouterr().err
