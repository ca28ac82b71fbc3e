"""The procedural shape corpus: determinism, watertightness, documented topology, class separation,
and the manifest written in-process and by Ray Data."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import fsspec
import numpy as np
import pytest
import trimesh

from raywsl.data.corpus import CATEGORIES, DEFAULT_CATEGORIES, generate_shape, write_corpus
from raywsl.geometry.topology import topology

NAMES = list(DEFAULT_CATEGORIES)  # the default selection; opt-in categories are tested on their own
K = len(NAMES)


def _genus(mesh: trimesh.Trimesh) -> int:
    return (2 * mesh.body_count - mesh.euler_number) // 2


def _read_manifest(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_registry_covers_topologies():
    assert K >= 8
    assert {CATEGORIES[c].genus for c in NAMES} >= {0, 1, 2}
    assert any(CATEGORIES[c].components > 1 for c in NAMES)
    assert [c for c in CATEGORIES if c not in NAMES] == ["bracket"]
    assert CATEGORIES["bracket"].opt_in and CATEGORIES["bracket"].genus is None
    assert CATEGORIES["torus"].genus_of({}) == 1 and CATEGORIES["bracket"].genus_of({"genus": 3}) == 3


def test_default_selection_is_unchanged():
    """Adding a category must not change existing corpora (nor the cached artifacts built on them):
    the default round-robin and the shapes themselves are pinned (hash taken before bracket existed)."""
    assert [generate_shape(i).category for i in range(22)] == 2 * [
        "blob", "torus", "double_torus", "capsule", "rounded_box", "mug", "chair", "table", "airplane", "lamp",
        "pebbles",
    ]
    digest = hashlib.sha256()
    for i in range(11):
        shape = generate_shape(i)
        digest.update(np.round(shape.mesh.vertices, 5).astype(np.float64).tobytes())
        digest.update(shape.mesh.faces.astype(np.int64).tobytes())
        digest.update(json.dumps(shape.params, sort_keys=True).encode())
    assert digest.hexdigest() == "4e4a7cad6835eabf849b250eaf7ff23a5e06ae22298022a42c30f60a191ac47d"
    assert generate_shape(3, categories=None).shape_id == generate_shape(3, categories=NAMES).shape_id


def test_bracket_is_watertight_with_its_per_shape_genus():
    shapes = [generate_shape(i, categories=["bracket"]) for i in range(6)]
    for shape in shapes:
        topo = topology(shape.mesh)
        assert shape.category == "bracket" and shape.shape_id.startswith("bracket-")
        assert topo["watertight"] and topo["components"] == 1 and shape.mesh.volume > 0
        assert topo["genus"] == CATEGORIES["bracket"].genus_of(shape.params)
        assert shape.params["genus"] == len(shape.params["base_holes"]) + len(shape.params["flange_holes"])
        assert len(shape.mesh.faces) > 1000
        assert np.linalg.norm(shape.mesh.vertices, axis=1).max() <= 1.0
    # Instances vary: parameters, hole counts (the genus), flat plates and L-brackets, rib counts.
    assert len({json.dumps(s.params) for s in shapes}) == len(shapes)
    assert [s.params["genus"] for s in shapes] == [3, 1, 4, 1, 2, 0]
    assert {s.params["flanged"] for s in shapes} == {0, 1}
    assert {s.params["ribs"] for s in shapes} == {0, 1, 2}


def test_bracket_alongside_other_categories_and_in_the_manifest(tmp_path):
    # Round-robin in registry order, not listing order: the default categories come first.
    mixed = [generate_shape(i, categories=["bracket", "torus"]) for i in range(4)]
    assert [s.category for s in mixed] == ["torus", "bracket", "torus", "bracket"]
    assert topology(mixed[1].mesh)["genus"] == mixed[1].params["genus"]
    manifest = Path(write_corpus(tmp_path, n=2, categories=["bracket"], progress=False))
    for i, row in enumerate(_read_manifest(manifest)):
        params = json.loads(row["params"])
        assert row["category"] == "bracket" and params == generate_shape(i, categories=["bracket"]).params
        mesh = trimesh.load(manifest.parent / row["path"], process=False)
        assert topology(mesh)["genus"] == CATEGORIES[row["category"]].genus_of(params)


def test_shape_is_a_function_of_seed_and_index():
    a, b = generate_shape(4), generate_shape(4)
    assert a.shape_id == f"{NAMES[4]}-0000004"
    assert np.array_equal(a.mesh.vertices, b.mesh.vertices) and np.array_equal(a.mesh.faces, b.mesh.faces)
    assert a.params == b.params
    # The categories are a set: listing order and unrelated categories don't change shape 0.
    c = generate_shape(0, categories=[NAMES[1], NAMES[0]])
    assert c.category == NAMES[0]
    assert np.array_equal(c.mesh.vertices, generate_shape(0).mesh.vertices)
    other = generate_shape(4, seed=1)
    assert other.category == a.category and other.params != a.params
    assert not np.array_equal(other.mesh.vertices[:100], a.mesh.vertices[:100])


@pytest.mark.parametrize("name", NAMES)
def test_category_is_watertight_with_documented_topology(name):
    expected = CATEGORIES[name]
    for index in (NAMES.index(name), NAMES.index(name) + K):
        shape = generate_shape(index)
        mesh = shape.mesh
        assert shape.category == name
        assert len(mesh.faces) > 1000 and mesh.is_watertight and mesh.volume > 0
        assert np.linalg.norm(mesh.vertices, axis=1).max() <= 1.0
        assert mesh.body_count == expected.components
        assert _genus(mesh) == expected.genus


def _features(mesh: trimesh.Trimesh) -> np.ndarray:
    ext = mesh.extents
    horizontal = np.sort(ext[[0, 2]])
    return np.array(
        [
            _genus(mesh),
            mesh.body_count,
            mesh.volume / mesh.convex_hull.volume,  # solidity: legs, holes and cavities lower it
            36 * np.pi * mesh.volume**2 / mesh.area**3,  # sphericity: 1 for a ball
            (mesh.center_mass[1] - mesh.bounds[0, 1]) / ext[1],  # where the mass sits, bottom to top
            ext[1] / horizontal[1],  # height / width
            horizontal[0] / horizontal[1],
        ]
    )


def test_categories_are_separable_but_vary_within():
    shapes = [generate_shape(i) for i in range(6 * K)]  # 6 per category, round-robin
    feats = np.stack([_features(s.mesh) for s in shapes])
    labels = np.array([NAMES.index(s.category) for s in shapes])
    feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-9)
    train, test = np.arange(len(shapes)) < 3 * K, np.arange(len(shapes)) >= 3 * K
    centroids = np.stack([feats[train & (labels == c)].mean(0) for c in range(K)])
    predicted = np.linalg.norm(feats[test][:, None] - centroids[None], axis=2).argmin(1)
    assert (predicted == labels[test]).mean() >= 0.8
    for c in range(K):
        members = [s for s in shapes if s.category == NAMES[c]]
        assert len({json.dumps(s.params) for s in members}) == len(members)
        assert len({round(s.mesh.volume, 4) for s in members}) == len(members)


def test_write_corpus_manifest_and_rerun(tmp_path, capsys):
    manifest = Path(write_corpus(tmp_path, n=K + 1, progress=True))
    assert "corpus:" in capsys.readouterr().err
    assert manifest == (tmp_path / "manifest.csv").resolve()
    with open(manifest) as f:
        assert f.readline().strip() == "id,path,category,params"
    rows = _read_manifest(manifest)
    assert [r["id"] for r in rows] == [generate_shape(i).shape_id for i in range(K + 1)]
    assert [r["category"] for r in rows] == NAMES + NAMES[:1]
    for i, row in enumerate(rows[:3]):
        mesh = trimesh.load(manifest.parent / row["path"], process=False)
        assert mesh.is_watertight
        assert np.allclose(mesh.vertices, generate_shape(i).mesh.vertices, atol=1e-6)
        assert json.loads(row["params"]).keys() == generate_shape(i).params.keys()
    first = (manifest.parent / rows[0]["path"]).read_bytes()

    # A smaller re-run replaces the corpus: same leading shapes, no leftovers.
    write_corpus(tmp_path, n=3, progress=False)
    rerun = _read_manifest(manifest)
    assert rerun == rows[:3]
    assert (manifest.parent / rerun[0]["path"]).read_bytes() == first
    assert sorted(p.name for p in (tmp_path / "meshes").iterdir()) == sorted(f"{r['id']}.ply" for r in rerun)


def test_write_corpus_to_a_url_writes_through_fsspec():
    """A corpus artifact in a remote cache (s3://...): meshes and manifest land at the URL, a smaller
    rerun removes the extra meshes there too."""
    fs = fsspec.filesystem("memory")
    manifest = write_corpus("memory://corpus-test", n=4, progress=False)
    assert manifest == "memory://corpus-test/manifest.csv"
    rows = list(csv.DictReader(io.StringIO(fs.cat_file("/corpus-test/manifest.csv").decode())))
    assert [r["id"] for r in rows] == [generate_shape(i).shape_id for i in range(4)]
    mesh = trimesh.load(io.BytesIO(fs.cat_file(f"/corpus-test/{rows[0]['path']}")), file_type="ply", process=False)
    assert np.allclose(mesh.vertices, generate_shape(0).mesh.vertices, atol=1e-6)
    write_corpus("memory://corpus-test", n=2, progress=False)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.glob("/corpus-test/meshes/*")) == \
        sorted(f"{r['id']}.ply" for r in rows[:2])
    fs.rm("/corpus-test", recursive=True)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="nope") as err:
        generate_shape(0, categories=["torus", "nope"])
    assert "torus" in str(err.value) and "airplane" in str(err.value)
    with pytest.raises(ValueError, match="nope"):
        write_corpus(tmp_path, n=2, categories=["nope"])
    with pytest.raises(ValueError, match="n must be"):
        write_corpus(tmp_path, n=0)


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_ray_corpus_matches_in_process(tmp_path, ray_local):
    local = Path(write_corpus(tmp_path / "local", n=10, seed=3, categories=["mug", "pebbles"], progress=False))
    remote = Path(write_corpus(tmp_path / "ray", n=10, seed=3, categories=["mug", "pebbles"], use_ray=True))
    assert remote.read_text() == local.read_text()
    for row in _read_manifest(local):
        assert (remote.parent / row["path"]).read_bytes() == (local.parent / row["path"]).read_bytes()
