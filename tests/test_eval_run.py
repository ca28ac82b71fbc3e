"""`raywsl eval` end to end: two sets of real meshes -> metrics.json, clouds, figures."""

import json
from pathlib import Path

import numpy as np
import pytest

from raywsl.cli import main
from raywsl.data.corpus import write_corpus

POINTS = 256  # the default is 2,048; fewer keeps the test fast


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    write_corpus(root / "gen", 6, seed=0, progress=False)
    ref = Path(write_corpus(root / "ref", 8, seed=1, progress=False))
    (root / "gen" / "meshes" / "zz-broken.ply").write_bytes(b"not a mesh")
    return root / "gen" / "meshes", ref


def run_eval(tmp_path, generated, reference, *extra):
    run_dir = tmp_path / "run"
    code = main(["eval", f"run.dir={run_dir}", f"eval.generated={generated}", f"eval.reference={reference}",
                 f"eval.points={POINTS}", "eval.render=4", "eval.device=cpu", "eval.emd_eps=0.01", *extra])
    return code, run_dir


def test_eval_two_sets(tmp_path, sets, capsys):
    generated, reference = sets
    code, run_dir = run_eval(tmp_path, generated, reference)
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("mmd_cd", "cov_cd", "1nna_cd", "mmd_emd", "cov_emd", "1nna_emd"):
        assert np.isfinite(metrics[key]), key
    assert 0 < metrics["cov_cd"] <= 1 and 0 <= metrics["1nna_cd"] <= 1 and metrics["mmd_cd"] > 0
    assert metrics["n_generated"] == 7 and metrics["n_reference"] == 8
    assert metrics["valid_share"] == pytest.approx(6 / 7)
    assert metrics["single_component_share"] == pytest.approx(6 / 7)  # the corpus' first six are single parts
    assert metrics["eval"]["invalid_generated"][0]["shape_id"] == "zz-broken"
    assert "mean_x min_y" in metrics["eval"]["conventions"]["chamfer"]
    assert f"{POINTS} area-weighted" in metrics["eval"]["conventions"]["clouds"]
    clouds = np.load(run_dir / "eval" / "points_generated.npy")
    assert clouds.shape == (6, POINTS, 3) and clouds.dtype == np.float32
    assert np.linalg.norm(clouds, axis=2).max() <= 1 / 1.03 + 1e-5  # normalised like ingest
    assert np.load(run_dir / "eval" / "points_reference.npy").shape == (8, POINTS, 3)
    assert json.loads((run_dir / "eval" / "ids_generated.json").read_text())[0] == "blob-0000000"
    for png in ("generated.png", "reference.png", "nearest_reference.png"):
        assert (run_dir / "eval" / png).stat().st_size > 1000


def test_eval_of_a_copy_and_memorisation(tmp_path, sets):
    _, reference = sets
    code, run_dir = run_eval(tmp_path, reference, reference, f"eval.training={reference}", "eval.distances=[cd]")
    assert code == 0
    m = json.loads((run_dir / "metrics.json").read_text())
    # Identical clouds (same seeds): 0 up to float32 rounding of the expanded-form distances.
    assert m["mmd_cd"] < 1e-6 and m["cov_cd"] == 1 and m["1nna_cd"] == 0
    assert "mmd_emd" not in m
    assert m["memorisation_rate"] == 1 and m["novelty_distinct_nearest"] == 8


def test_memorisation_threshold_is_calibrated_on_resampled_training_shapes(tmp_path, sets):
    generated, reference = sets
    # Copies under other names: same surfaces, independently sampled clouds (the seed is per name).
    copies = tmp_path / "copies"
    copies.mkdir()
    for mesh in sorted((reference.parent / "meshes").glob("*.ply")):
        (copies / f"copy-{mesh.name}").write_bytes(mesh.read_bytes())
    # At 2,048 points (the default): with 256 the sampling noise exceeds the gap between distinct shapes.
    settings = (f"eval.training={reference}", "eval.distances=[cd]", "eval.points=2048")
    code, run_dir = run_eval(tmp_path, copies, generated, *settings)
    assert code == 0
    m = json.loads((run_dir / "metrics.json").read_text())
    assert 5e-4 < m["memorisation_threshold"] < 5e-3  # the sampling noise, not a fixed guess
    assert m["memorisation_rate"] >= 7 / 8 and m["novelty_distinct_nearest"] == 8
    # Distinct shapes from another seed of the corpus are not copies.
    code, run_dir = run_eval(tmp_path, generated, generated, *settings)
    assert json.loads((run_dir / "metrics.json").read_text())["memorisation_rate"] == 0


def test_eval_errors(tmp_path, sets, capsys):
    generated, _ = sets
    code, _ = run_eval(tmp_path, generated, "")
    assert code == 2 and "eval.reference is empty" in capsys.readouterr().err
    code, _ = run_eval(tmp_path, generated, generated, "eval.distances=[chamfer]")
    assert code == 2 and "'eval.distances'" in capsys.readouterr().err
    code, _ = run_eval(tmp_path, tmp_path / "nothing-here", generated)
    assert code == 2 and "eval.generated '" in capsys.readouterr().err
