"""load_mesh on polygon meshes (quads, n-gons, non-convex faces) in OFF, OBJ and PLY, and its
memory bounds (file size, declared face counts), on files the tests write."""

import struct
import time

import numpy as np
import pytest
import trimesh

from raywsl.data.meshes import MeshError, load_mesh, triangulate

# ------------------------------------------------------------------------------------------------
# Polygon meshes, each as (vertices, polygons) with the expected triangle count, area and volume.
# ------------------------------------------------------------------------------------------------

CUBE = (  # a unit cube of 6 quads, outward
    [(0, 0, 0), (1, 0, 0), (1, 1, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (1, 1, 1), (0, 1, 1)],
    [(0, 3, 2, 1), (4, 5, 6, 7), (0, 1, 5, 4), (1, 2, 6, 5), (2, 3, 7, 6), (3, 0, 4, 7)],
)


def prism(cap: list[tuple[float, float]]) -> tuple[list, list]:
    """A prism of height 1 over the counter-clockwise polygon `cap`: two n-gon caps, n quad sides."""
    n = len(cap)
    vertices = [(x, y, 0.0) for x, y in cap] + [(x, y, 1.0) for x, y in cap]
    faces = [tuple(range(n))[::-1], tuple(range(n, 2 * n))]
    faces += [(i, (i + 1) % n, (i + 1) % n + n, i + n) for i in range(n)]
    return vertices, faces


HEPTAGON = [(np.cos(a), np.sin(a)) for a in np.arange(7) * 2 * np.pi / 7]
# An L whose first vertex (2, 1) does not see the whole polygon: its fan would leave the L.
ELL = [(2, 1), (1, 1), (1, 2), (0, 2), (0, 0), (2, 0)]
PYRAMID = (  # a square base (quad) and 4 triangles: mixed faces; apex above the centre, height 3
    [(0, 0, 0), (2, 0, 0), (2, 2, 0), (0, 2, 0), (1, 1, 3)],
    [(0, 3, 2, 1), (0, 1, 4), (1, 2, 4), (2, 3, 4), (3, 0, 4)],
)
HEPTAGON_AREA = 0.5 * 7 * np.sin(2 * np.pi / 7)
SHAPES = {  # name: (mesh, triangles, area, volume)
    "cube": (CUBE, 12, 6.0, 1.0),
    "heptagon_prism": (prism(HEPTAGON), 2 * 5 + 2 * 7, 2 * HEPTAGON_AREA + 7 * 2 * np.sin(np.pi / 7), HEPTAGON_AREA),
    "ell_prism": (prism(ELL), 2 * 4 + 2 * 6, 2 * 3 + 8, 3.0),
    "pyramid": (PYRAMID, 2 + 4, 4 + 4 * 0.5 * 2 * np.sqrt(10), 4.0),
}


def write_off(path, vertices, faces):
    lines = ["OFF", "# written by the test", f"{len(vertices)} {len(faces)} 0"]
    lines += [" ".join(map(str, v)) for v in vertices]
    lines += [f"{len(f)} " + " ".join(map(str, f)) for f in faces]
    path.write_text("\n".join(lines) + "\n")


def write_obj(path, vertices, faces):
    lines = ["# written by the test", "o shape"] + [f"v {x} {y} {z}" for x, y, z in vertices]
    lines += ["vt 0.5 0.5", "vn 0 0 1"]
    # corners in all the OBJ forms: v, v/vt, v/vt/vn, v//vn; negative = relative to the end
    forms = ["{}", "{}/1", "{}/1/1", "{}//1"]
    n = len(vertices)
    lines += ["f " + " ".join(forms[(k + j) % 4].format(i + 1 if k % 2 else i - n) for j, i in enumerate(f))
              for k, f in enumerate(faces)]
    path.write_text("\n".join(lines) + "\n")


def write_ply(path, vertices, faces, binary=""):
    """ASCII, or binary ('<' little / '>' big endian) with a per-vertex colour and a per-face flag
    byte before the index list, which the reader must step over."""
    fmt = {"": "ascii", "<": "binary_little_endian", ">": "binary_big_endian"}[binary]
    header = (f"ply\nformat {fmt} 1.0\ncomment written by the test\nelement vertex {len(vertices)}\n"
              "property float x\nproperty float y\nproperty float z\nproperty uchar red\n"
              f"element face {len(faces)}\nproperty uchar flags\nproperty list uchar int vertex_indices\n"
              "end_header\n")
    if not binary:
        body = "".join(f"{x} {y} {z} 255\n" for x, y, z in vertices)
        body += "".join(f"7 {len(f)} " + " ".join(map(str, f)) + "\n" for f in faces)
        path.write_text(header + body)
        return
    body = b"".join(struct.pack(binary + "fffB", *v, 255) for v in vertices)
    body += b"".join(struct.pack(f"{binary}BB{len(f)}i", 7, len(f), *f) for f in faces)
    path.write_bytes(header.encode() + body)


WRITERS = {
    "off": lambda p, v, f: write_off(p, v, f),
    "obj": lambda p, v, f: write_obj(p, v, f),
    "ply": lambda p, v, f: write_ply(p, v, f),
    "ply_le": lambda p, v, f: write_ply(p, v, f, "<"),
    "ply_be": lambda p, v, f: write_ply(p, v, f, ">"),
}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_polygon_faces_load_triangulated(tmp_path, fmt, name):
    (vertices, faces), triangles, area, volume = SHAPES[name]
    path = tmp_path / f"{name}.{fmt.split('_')[0]}"
    WRITERS[fmt](path, vertices, faces)
    mesh = load_mesh(str(path), max_faces=1000)
    assert len(mesh.faces) == triangles
    assert mesh.area == pytest.approx(area, rel=1e-6)  # a wrong fan of the L doubles back: more area
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.volume == pytest.approx(volume, rel=1e-6)  # > 0: the faces kept their outward orientation


def test_trimesh_formats_still_load(tmp_path):
    box = trimesh.creation.box(extents=(1, 2, 3))
    for ext in ("stl", "glb"):
        box.export(tmp_path / f"box.{ext}")
        assert load_mesh(str(tmp_path / f"box.{ext}"), max_faces=100).volume == pytest.approx(6.0)
    (tmp_path / "box_ascii.stl").write_bytes(trimesh.exchange.stl.export_stl_ascii(box).encode())
    assert load_mesh(str(tmp_path / "box_ascii.stl"), max_faces=100).volume == pytest.approx(6.0)


def test_triangulate_keeps_face_order_and_drops_points_and_edges():
    vertices = np.array([(0, 0, 0), (1, 0, 0), (1, 1, 0), (0, 1, 0), (2, 0, 0)], float)
    counts = np.array([4, 3, 2, 3])  # quad, triangle, an edge (no area), triangle
    flat = np.array([0, 1, 2, 3, 1, 4, 2, 0, 1, 0, 1, 2])
    tris = triangulate(vertices, counts, flat)
    np.testing.assert_array_equal(tris, [(0, 1, 2), (0, 2, 3), (1, 4, 2), (0, 1, 2)])


def comb(teeth: int) -> np.ndarray:
    """A counter-clockwise comb: a base of height 1 with `teeth` teeth of height 9 (reflex corners
    between the teeth, which turn convex as the teeth are cut)."""
    top = [xy for t in range(teeth) for xy in ((2 * t, 1), (2 * t, 10), (2 * t + 1, 10), (2 * t + 1, 1))]
    return np.array([(2 * teeth, 0)] + top[::-1] + [(0, 0)], float)[::-1]


def test_triangulate_nonconvex_polygons_exactly():
    """Ear clipping of non-convex polygons (random stars and a comb), in any plane and either
    orientation: k - 2 triangles covering exactly the polygon's area (no overlap), each facing
    the polygon's way."""
    rng = np.random.default_rng(0)
    polygons = [comb(30)]
    for _ in range(100):
        k = int(rng.integers(4, 30))
        angle = (np.arange(k) + rng.uniform(0, 0.9, k)) * 2 * np.pi / k  # star-shaped around 0: simple
        polygons.append(rng.uniform(0.1, 1.0, k)[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1))
    for xy in polygons:
        k = len(xy)
        rotation = np.linalg.qr(rng.normal(size=(3, 3)))[0]
        vertices = np.c_[xy, np.zeros(k)] @ rotation.T + rng.normal(size=3)
        order = np.roll(np.arange(k)[::rng.choice([-1, 1])], rng.integers(k))
        tris = vertices[triangulate(vertices, np.array([k]), order)]
        normals = np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0])
        area = 0.5 * abs(np.sum(xy[:, 0] * np.roll(xy[:, 1], -1) - np.roll(xy[:, 0], -1) * xy[:, 1]))
        polygon_normal = np.cross(vertices[order], np.roll(vertices[order], -1, axis=0)).sum(axis=0)
        assert len(tris) == k - 2
        assert 0.5 * np.linalg.norm(normals, axis=1).sum() == pytest.approx(area, rel=1e-9)
        assert (normals @ polygon_normal > -1e-12).all()


def test_obj_and_off_details(tmp_path):
    # ModelNet's OFF files have the counts on the keyword line; comments and colours are ignored.
    (tmp_path / "modelnet.off").write_text(
        "OFF4 2 0\n0 0 0\n1 0 0 # a comment\n0 1 0\n0 0 1\n3 0 1 2 255 0 0\n3 0 1 3\n")
    assert len(load_mesh(str(tmp_path / "modelnet.off"), max_faces=10).faces) == 2
    # OBJ: several objects share one vertex list, faces may come before later vertices, and
    # statements may be indented or continued with a backslash.
    (tmp_path / "two.obj").write_text(
        "o a\nv 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\no b\n  v 0 0 1\nf -4 -3 \\\n -1\n")
    mesh = load_mesh(str(tmp_path / "two.obj"), max_faces=10)
    assert len(mesh.faces) == 2 and mesh.area == pytest.approx(1.0)


@pytest.mark.parametrize("text, words", [
    ("OFF\n3 1 0\n0 0 0\n1 0 0\n", "truncated"),
    ("OFF\n3 1 0\n0 0 0\n1 0 x\n0 1 0\n3 0 1 2\n", "vertex 2: b'x' is not a number"),
    ("OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n4 0 1 2\n", "face 1 declares 4 vertices but lists 3"),
    ("OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 3\n", "faces index vertices that do not exist"),
    ("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 0\n", "face index 0"),
])
def test_malformed_polygon_files_name_what_is_wrong(tmp_path, text, words):
    path = tmp_path / ("m.off" if text.startswith("OFF") else "m.obj")
    path.write_text(text)
    with pytest.raises(MeshError, match="m\\.(off|obj): ") as e:
        load_mesh(str(path), max_faces=10)
    assert words in str(e.value)


# ------------------------------------------------------------------------------------------------
# Memory bounds
# ------------------------------------------------------------------------------------------------

BILLION = 10**9


def huge_headers(tmp_path):
    """Small files whose headers claim a billion faces, followed by a few MB of data."""
    filler = b"0 0 0\n" * 500_000
    ply = tmp_path / "huge.ply"
    ply.write_bytes(b"ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\n"
                    b"property float z\nelement face 1000000000\nproperty list uchar int vertex_indices\n"
                    b"end_header\n" + filler)
    off = tmp_path / "huge.off"
    off.write_bytes(b"OFF\n3 1000000000 0\n" + filler)
    stl = tmp_path / "huge.stl"
    stl.write_bytes(b"\0" * 80 + struct.pack("<I", BILLION) + b"\0" * 50 * 1000)
    obj = tmp_path / "huge.obj"
    obj.write_bytes(b"v 0 0 0\nv 1 0 0\nv 0 1 0\n" + b"f 1 2 3\n" * 1001)
    return {"ply": ply, "off": off, "stl": stl, "obj": obj}


def test_declared_face_counts_are_rejected_before_parsing(tmp_path):
    for ext, path in huge_headers(tmp_path).items():
        t0 = time.perf_counter()
        with pytest.raises(MeshError, match="above the limit ingest.max_faces=1,000 \\(not parsed\\)") as e:
            load_mesh(str(path), max_faces=1000)
        assert str(path) in str(e.value)
        assert ("1,001 face lines" if ext == "obj" else "1,000,000,000") in str(e.value), str(e.value)
        assert time.perf_counter() - t0 < 2.0, ext  # parsing 10^9 faces would take minutes, or die


def test_ascii_stl_facets_are_counted_before_parsing(tmp_path):
    sphere = trimesh.creation.icosphere(subdivisions=2)  # 320 triangles
    (tmp_path / "s.stl").write_bytes(trimesh.exchange.stl.export_stl_ascii(sphere).encode())
    with pytest.raises(MeshError, match="320 facets, above the limit ingest.max_faces=319"):
        load_mesh(str(tmp_path / "s.stl"), max_faces=319)
    assert len(load_mesh(str(tmp_path / "s.stl"), max_faces=320).faces) == 320


def test_polygons_count_as_their_triangles(tmp_path):
    write_off(tmp_path / "cube.off", *CUBE)  # 6 quads declared, 12 triangles
    load_mesh(str(tmp_path / "cube.off"), max_faces=12)
    with pytest.raises(MeshError, match="12 faces, above the limit ingest.max_faces=11"):
        load_mesh(str(tmp_path / "cube.off"), max_faces=11)


def test_file_size_limit(tmp_path):
    path = tmp_path / "cube.obj"
    write_obj(path, *CUBE)
    size = path.stat().st_size
    assert len(load_mesh(str(path), max_faces=100, max_bytes=size).faces) == 12
    assert len(load_mesh(str(path), max_faces=100, max_bytes=0).faces) == 12  # 0: no limit
    with pytest.raises(MeshError) as e:
        load_mesh(str(path), max_faces=100, max_bytes=size - 1)
    assert f"({size:,} bytes), above the limit ingest.max_file_mb=" in str(e.value)
    assert str(path) in str(e.value)


def test_large_nonconvex_faces_fail_clearly(tmp_path, monkeypatch):
    """Ear clipping is superlinear: a non-convex face above MAX_NONCONVEX vertices fails the mesh
    (convex ones of any size are fanned)."""
    import raywsl.data.meshes as meshes

    monkeypatch.setattr(meshes, "MAX_NONCONVEX", 5)
    write_off(tmp_path / "ell.off", *prism(ELL))
    with pytest.raises(MeshError, match="ell.off: a non-convex face has 6 vertices"):
        load_mesh(str(tmp_path / "ell.off"), max_faces=100)
    write_off(tmp_path / "heptagon.off", *prism(HEPTAGON))
    assert len(load_mesh(str(tmp_path / "heptagon.off"), max_faces=100).faces) == 24
