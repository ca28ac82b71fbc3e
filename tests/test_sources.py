import json

import fsspec
import numpy as np
import pytest
import trimesh

from conftest import BROKEN_KINDS, HUGE_FACES
from raywsl.data.meshes import MeshError, load_mesh, normalise
from raywsl.data.sources import SourceError, resolve_source


def test_every_bad_mesh_gets_a_clear_error_naming_the_file(bad_meshes):
    for kind, words in BROKEN_KINDS.items():
        with pytest.raises(MeshError) as e:
            load_mesh(str(bad_meshes[kind]), max_faces=HUGE_FACES - 1)
        assert str(bad_meshes[kind]) in str(e.value) and words in str(e.value), (kind, str(e.value))
    mesh = load_mesh(str(bad_meshes["open"]), max_faces=HUGE_FACES - 1)
    assert not mesh.is_watertight and len(mesh.faces) > 0


def test_normalise_into_the_unit_sphere_and_back():
    mesh = trimesh.creation.box(extents=(4.0, 1.0, 2.0))
    mesh.apply_translation((10.0, -3.0, 5.0))
    out, center, scale = normalise(mesh, margin=0.03)
    radius = np.linalg.norm(out.vertices, axis=1).max()
    assert radius == pytest.approx(1 / 1.03)
    np.testing.assert_allclose(center, (10.0, -3.0, 5.0))
    np.testing.assert_allclose(out.vertices / scale + center, mesh.vertices, atol=1e-12)


def test_folder_glob_and_manifests(tmp_path):
    for cat in ("chair", "table"):
        (tmp_path / "shapes" / cat).mkdir(parents=True)
        for i in range(2):
            trimesh.creation.box().export(tmp_path / "shapes" / cat / f"m{i}.obj")
    (tmp_path / "shapes" / "notes.txt").write_text("not a mesh")
    refs = resolve_source(str(tmp_path / "shapes"))
    assert [r.shape_id for r in refs] == ["chair/m0", "chair/m1", "table/m0", "table/m1"]
    assert [r.category for r in refs] == ["chair", "chair", "table", "table"]
    assert [r.shape_id for r in resolve_source(str(tmp_path / "shapes" / "*" / "m1.obj"))] == ["chair/m1", "table/m1"]

    (tmp_path / "shapes" / "list.csv").write_text("id,path,category\na,chair/m0.obj,c\n,table/m1.obj,\n")
    refs = resolve_source(str(tmp_path / "shapes" / "list.csv"))
    assert [(r.shape_id, r.category) for r in refs] == [("a", "c"), ("m1", "")]
    assert refs[1].uri == str(tmp_path / "shapes" / "table" / "m1.obj")

    lines = [json.dumps({"path": str(tmp_path / "shapes/chair/m0.obj"), "id": "x", "category": "k"})]
    (tmp_path / "list.jsonl").write_text("\n".join(lines) + "\n")
    assert resolve_source(str(tmp_path / "list.jsonl"))[0].shape_id == "x"


def test_fsspec_urls(tmp_path):
    fs = fsspec.filesystem("memory")
    fs.pipe("/meshes/a.ply", trimesh.creation.icosphere(subdivisions=2).export(file_type="ply"))
    refs = resolve_source("memory://meshes")
    assert [r.uri for r in refs] == ["memory:///meshes/a.ply"]
    assert len(load_mesh(refs[0].uri, max_faces=10**6).faces) == 320


def test_source_errors(tmp_path):
    with pytest.raises(SourceError, match="data.source is empty"):
        resolve_source("")
    with pytest.raises(SourceError, match="no such file or folder"):
        resolve_source(str(tmp_path / "nope"))
    with pytest.raises(SourceError, match="no meshes found"):
        resolve_source(str(tmp_path))
    (tmp_path / "m.csv").write_text("id,path\nx,a.ply\nx,b.ply\n")
    with pytest.raises(SourceError, match="repeated: \\['x'\\]"):
        resolve_source(str(tmp_path / "m.csv"))
    (tmp_path / "n.csv").write_text("id,path\nx,\n")
    with pytest.raises(SourceError, match="row 1: no 'path'"):
        resolve_source(str(tmp_path / "n.csv"))


def test_scene_files_are_merged_into_one_mesh(tmp_path):
    scene = trimesh.Scene([trimesh.creation.box(), trimesh.creation.icosphere(subdivisions=1).apply_translation((3, 0, 0))])
    path = tmp_path / "scene.glb"
    scene.export(path)
    mesh = load_mesh(str(path), max_faces=10**6)
    assert len(mesh.faces) == 12 + 80
    assert mesh.bounds[1][0] == pytest.approx(4.0, abs=1e-3)
