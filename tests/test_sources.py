import json
import os

import fsspec
import numpy as np
import pytest
import trimesh

from conftest import BROKEN_KINDS, HUGE_FACES
from raywsl.data.meshes import MeshError, load_mesh, normalise
from raywsl.data.sources import MeshRef, SourceError, id_problem, printable, resolve_source


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
    with pytest.raises(SourceError, match="line 2: no 'path'"):
        resolve_source(str(tmp_path / "n.csv"))


def test_scene_files_are_merged_into_one_mesh(tmp_path):
    ball = trimesh.creation.icosphere(subdivisions=1).apply_translation((3, 0, 0))
    scene = trimesh.Scene([trimesh.creation.box(), ball])
    path = tmp_path / "scene.glb"
    scene.export(path)
    mesh = load_mesh(str(path), max_faces=10**6)
    assert len(mesh.faces) == 12 + 80
    assert mesh.bounds[1][0] == pytest.approx(4.0, abs=1e-3)


def write_box(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    trimesh.creation.box().export(path)


def test_manifest_encodings(tmp_path):
    write_box(tmp_path / "a.obj")
    # Excel writes a byte-order mark: the first column is still 'id'
    (tmp_path / "bom.csv").write_bytes("\ufeffid,path,category\nx,a.obj,chaise\n".encode("utf-8"))
    assert resolve_source(str(tmp_path / "bom.csv")) == [MeshRef("x", str(tmp_path / "a.obj"), "chaise")]
    (tmp_path / "bom.jsonl").write_bytes("\ufeff".encode() + b'{"path": "a.obj", "id": "y"}\n')
    assert [r.shape_id for r in resolve_source(str(tmp_path / "bom.jsonl"))] == ["y"]
    # Latin-1 bytes: the error names the manifest, the line, the column and the byte offset
    (tmp_path / "latin.csv").write_bytes(b"id,path\nx,a.obj\nchaise,caf\xe9.obj\n")
    with pytest.raises(SourceError) as e:
        resolve_source(str(tmp_path / "latin.csv"))
    assert str(e.value) == (f"manifest '{tmp_path / 'latin.csv'}' line 3, column 11: not valid UTF-8 "
                            f"(byte b'\\xe9' at offset 26); save the manifest as UTF-8")
    (tmp_path / "latin.jsonl").write_bytes(b'\xef\xbb\xbf{"path": "a.obj"}\n{"path": "\xe9.obj"}\n')
    with pytest.raises(SourceError, match="line 2, column 11: not valid UTF-8 .* at offset 31"):
        resolve_source(str(tmp_path / "latin.jsonl"))


def test_manifest_structure_errors(tmp_path):
    for n, line in enumerate(['["a.obj"]', '42', '"a.obj"', 'null']):
        (tmp_path / f"m{n}.jsonl").write_text(f'{{"path": "a.obj", "id": "ok"}}\n\n{line}\n')
        with pytest.raises(SourceError, match=f"m{n}.jsonl' line 3: expected a JSON object .* found "
                                              f"(a list|a number|a string|null)$"):
            resolve_source(str(tmp_path / f"m{n}.jsonl"))
    (tmp_path / "obj.jsonl").write_text('{"path": ["a.obj"]}\n')
    with pytest.raises(SourceError, match="line 1: 'path' must be a string, found a list"):
        resolve_source(str(tmp_path / "obj.jsonl"))
    (tmp_path / "cols.csv").write_text("name,file\nx,a.obj\n")
    with pytest.raises(SourceError, match="has no 'path' column \\(columns found: \\['name', 'file'\\]\\)"):
        resolve_source(str(tmp_path / "cols.csv"))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(SourceError, match="empty.csv' is empty"):
        resolve_source(str(tmp_path / "empty.csv"))
    # header names are trimmed and case-insensitive; blank lines are skipped; numbers are ids
    write_box(tmp_path / "a.obj")
    (tmp_path / "loose.csv").write_text("ID, Path\n\n7, a.obj\n")
    assert [r.shape_id for r in resolve_source(str(tmp_path / "loose.csv"))] == ["7"]


def test_repeated_ids_listed_fast(tmp_path):
    rows = [f"s{i % 15_000},m{i}.obj" for i in range(30_000)] + ["x,a.obj", "x,b.obj"]
    (tmp_path / "m.csv").write_text("id,path\n" + "\n".join(rows) + "\n")
    with pytest.raises(SourceError) as e:  # ids.count() per id: ~10^9 comparisons here
        resolve_source(str(tmp_path / "m.csv"))
    assert "repeated: ['s0', 's1', 's10', 's100', 's1000'] and 14996 more" in str(e.value)


def test_id_problem():
    for ok in ("chair/abc/model", "m0", "a b", "caf\u00e9", "a\\b", "x.y", "\u0646\u0627\u200c\u0647"):
        assert id_problem(ok) == "", ok
    for bad, why in [("", "empty"), ("a/../b", "'..'"), ("..", "'..'"), ("/abs", "starts with '/'"),
                     ("a//b", "empty or '.'"), ("./a", "empty or '.'"), ("a/", "empty or '.'"),
                     ("a\nb", "U+000A"), ("a\x00", "U+0000"), ("x\u202ey", "U+202E"),
                     ("caf\udce9", "not valid UTF-8")]:
        assert why in id_problem(bad), (bad, id_problem(bad))
    # escapes are printable, valid UTF-8 and tell apart the texts they came from
    texts = ["caf\udce9", "caf\\xe9", "caf\x80", "caf\u0080", "a\nb", "a\\nb", "a\\u000ab", "a\u000ab"]
    escaped = [printable(t) for t in texts]
    assert all(e.isprintable() and e.encode("utf-8") for e in escaped)
    assert len(set(escaped)) == len(set(texts))


def test_unsafe_ids_become_rejected_rows(tmp_path):
    folder = tmp_path / "shapes"
    for name in ("chair/abc/model.obj", "ok.obj", "caf\\xe9.obj", "new\nline.obj"):
        write_box(folder / name)
    raw = os.fsencode(folder)
    os.makedirs(raw + b"/cat\xe9", exist_ok=True)
    for name in (b"/caf\xe9.obj", b"/cat\xe9/m.obj"):  # Latin-1 file names, not UTF-8
        with open(raw + name, "wb") as f:
            f.write(trimesh.creation.box().export(file_type="obj").encode())
    refs = {r.shape_id: r for r in resolve_source(str(folder))}
    assert set(refs) == {"chair/abc/model", "ok", "caf\\xe9", "caf\\xe9#2", "cat\\xe9/m", "new\\u000aline"}
    assert refs["chair/abc/model"].category == "chair" and not refs["chair/abc/model"].problem
    assert not refs["caf\\xe9"].problem  # the file really named with a backslash keeps its id
    assert refs["caf\\xe9#2"].problem == f"{folder}/caf\\xe9.obj: the shape id is not valid UTF-8 " \
                                         "(a file name in another encoding?)"
    assert refs["cat\\xe9/m"].category == "cat\\xe9" and "not valid UTF-8" in refs["cat\\xe9/m"].problem
    assert "U+000A" in refs["new\\u000aline"].problem
    for r in refs.values():  # everything can be stored, printed and hashed
        assert r.shape_id.isprintable() and r.uri.isprintable() and r.problem.isprintable()
        json.dumps([r.shape_id, r.uri, r.category, r.problem], ensure_ascii=False).encode("utf-8")

    write_box(tmp_path / "a.obj")
    lines = [{"path": "a.obj", "id": i} for i in ("../escape", "/abs", "", "ok", "x\u0000y", "\udce9")]
    lines += [{"path": "a.obj", "id": "../escape"}]  # the same unusable id twice: two distinct rows
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    refs = resolve_source(str(tmp_path / "m.jsonl"))
    assert [r.shape_id for r in refs] == ["../escape", "/abs", "a", "ok", "x\\u0000y", "\\xe9", "../escape#2"]
    assert [bool(r.problem) for r in refs] == [True, True, False, False, True, True, True]
    assert refs[0].problem == f"{tmp_path / 'a.obj'}: the shape id has a '..' path component"
