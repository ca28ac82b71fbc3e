"""Loading one mesh: read, validate, clean, normalise into the unit sphere.

Every problem with one mesh raises `MeshError` whose message names the file and what is wrong, so
ingest can record it as that row's failure and go on with the rest. Open or non-watertight meshes
are not errors: the SDF backend's winding-number sign handles them.

Memory is bounded before anything is parsed: the file size against `max_bytes`
(ingest.max_file_mb), then the number of faces the file declares against `max_faces`
(ingest.max_faces): PLY's `element face N`, OFF's counts line and binary STL's triangle count are
read from the header; OBJ face lines and ASCII STL facets are counted in the raw bytes.

OBJ, OFF and PLY are read by the small readers below rather than by trimesh: these formats store
polygons, and trimesh 5.2 fan-triangulates them (wrong for a non-convex polygon), fails on OFF
n-gons under numpy 2.4 (`trimesh.util.triangle_fans_to_faces` multiplies the index *strings* it
parsed) and on binary PLY whose faces have different vertex counts ("PLY is unexpected length!").
Here a convex polygon is split as a fan and any other one by ear clipping in its own plane; the
triangles keep the polygon's orientation and the file's face order. The readers take geometry only
(positions and faces): colours, normals, texture coordinates and materials do not change an SDF.
STL, GLB, glTF and any other format go to trimesh (scenes are merged into one mesh).
"""

from __future__ import annotations

import posixpath
import re
import struct
import warnings

import fsspec
from fsspec.implementations.local import LocalFileSystem
import numpy as np
import trimesh

HEAD_BYTES = 1 << 20  # what is read first for the header checks; a longer PLY header is not accepted
_STREAM_CHUNK = 1 << 24
# Ear clipping costs O(k * reflex vertices) at worst: seconds for a 5,000-vertex comb-shaped face,
# minutes at 20,000. A larger non-convex face fails the mesh instead of stalling its task.
MAX_NONCONVEX = 5_000


class MeshError(ValueError):
    """One mesh cannot be used; the message says which file and why."""


def load_mesh(uri: str, max_faces: int, max_bytes: int | None = None) -> trimesh.Trimesh:
    """Read a mesh (obj, off, ply: by the readers of this module; others: by trimesh), check it is
    usable and merge duplicate vertices. Files larger than `max_bytes` are rejected unread (0 or
    None: no limit; ingest passes ingest.max_file_mb * 10^6), files declaring more than `max_faces`
    faces before parsing, and meshes of more than `max_faces` triangles after triangulation."""
    ext = posixpath.splitext(uri)[1].lstrip(".").lower()
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        if not fs.exists(path):
            raise MeshError(f"{uri}: file not found")
        size = int(fs.size(path))
    except MeshError:
        raise
    except Exception as e:
        raise MeshError(f"{uri}: cannot open ({type(e).__name__}: {e})") from e
    if max_bytes and size > max_bytes:
        raise MeshError(f"{uri}: file is {size / 1e6:,.1f} MB ({size:,} bytes), above the limit "
                        f"ingest.max_file_mb={max_bytes / 1e6:g}")
    try:
        with fs.open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
            _check_declared_faces(uri, ext, head, size, max_faces, f)
            if ext in _POLYGON_READERS:
                data = head + f.read()
                if ext == "obj":
                    _check_count(uri, _count_lines(data, b"f"), "face lines", max_faces)
                vertices, counts, flat = _POLYGON_READERS[ext](data)
            elif isinstance(fs, LocalFileSystem):
                f.close()
                loaded = trimesh.load(path, force="mesh", process=False)  # keeps .bin etc. beside it
            else:
                f.seek(0)
                loaded = trimesh.load(f, file_type=ext, force="mesh", process=False)
    except MeshError:
        raise
    except Exception as e:  # every reader raises its own types for bad files
        raise MeshError(f"{uri}: cannot read as a .{ext} mesh ({type(e).__name__}: {e})") from e
    if ext in _POLYGON_READERS:
        _check_arrays(uri, vertices, flat)
        try:
            faces = triangulate(vertices, counts, flat)
        except ValueError as e:
            raise MeshError(f"{uri}: {e}") from e
        if len(faces) == 0:  # only points and edges
            raise MeshError(f"{uri}: empty mesh (no faces of 3 or more vertices)")
    else:
        if not isinstance(loaded, trimesh.Trimesh):
            raise MeshError(f"{uri}: empty mesh (no faces)")
        vertices, faces = np.asarray(loaded.vertices, np.float64), np.asarray(loaded.faces, np.int64)
        _check_arrays(uri, vertices, faces.ravel())
    if len(faces) > max_faces:
        raise MeshError(f"{uri}: {len(faces):,} faces, above the limit ingest.max_faces={max_faces:,}")
    # Merge duplicate vertices and drop zero-area faces: neither changes the surface.
    mesh = trimesh.Trimesh(vertices, faces, process=True, validate=True)
    if len(mesh.faces) == 0 or mesh.area <= 1e-12 * max(mesh.scale, 1e-30) ** 2:
        raise MeshError(f"{uri}: degenerate geometry (total surface area {mesh.area:.3g})")
    if mesh.scale <= 0:
        raise MeshError(f"{uri}: degenerate geometry (all vertices coincide)")
    return mesh


def normalise(mesh: trimesh.Trimesh, margin: float) -> tuple[trimesh.Trimesh, np.ndarray, float]:
    """Centre on the bounding-box centre and scale so the mesh fits in a sphere of radius
    1 / (1 + margin). Returns (normalised mesh, center, scale) with normalised = (v - center) * scale."""
    center = mesh.bounds.mean(axis=0)
    radius = float(np.linalg.norm(mesh.vertices - center, axis=1).max())
    if not radius > 0:
        raise MeshError("degenerate geometry: all vertices coincide")
    scale = 1.0 / ((1.0 + margin) * radius)
    out = trimesh.Trimesh((mesh.vertices - center) * scale, mesh.faces, process=False)
    return out, center, scale


# ------------------------------------------------------------------------------------------------
# Checks before and after parsing
# ------------------------------------------------------------------------------------------------

def _check_count(uri: str, n: int, what: str, max_faces: int) -> None:
    if n > max_faces:
        raise MeshError(f"{uri}: {n:,} {what}, above the limit ingest.max_faces={max_faces:,} (not parsed)")


def _check_declared_faces(uri: str, ext: str, head: bytes, size: int, max_faces: int, f) -> None:
    """Reject a file that declares more faces than `max_faces`, from its first bytes `head` (PLY,
    OFF, binary STL) or by counting ASCII STL facets in the stream `f` (left at the end of `head`)."""
    if ext == "ply":
        elements = _ply_header(head)[1]
        _check_count(uri, next((n for name, n, _ in elements if name == "face"), 0),
                     "faces declared in its header", max_faces)
    elif ext == "off":
        _check_count(uri, _off_layout(_content_lines(head, limit=3))[2], "faces declared in its header",
                     max_faces)
    elif ext == "stl":
        declared = struct.unpack_from("<I", head, 80)[0] if len(head) >= 84 else -1
        # Binary: 80 header bytes (which may begin with 'solid'), the triangle count, 50 bytes each.
        if declared >= 0 and (size == 84 + 50 * declared or not head.lstrip().startswith(b"solid")):
            _check_count(uri, declared, "triangles declared in its header", max_faces)
        else:  # ASCII STL: one `endfacet` per triangle
            n = head.lower().count(b"endfacet")
            tail = head[-7:]
            while chunk := f.read(_STREAM_CHUNK):
                n += (tail + chunk).lower().count(b"endfacet")
                tail = chunk[-7:]
            f.seek(len(head))
            _check_count(uri, n, "facets", max_faces)


def _count_lines(data: bytes, keyword: bytes) -> int:
    """Lines of `data` that start with `keyword` followed by a space or tab (C-speed, no parsing)."""
    return sum(data.count(b"\n" + keyword + sep) + data.startswith(keyword + sep) for sep in (b" ", b"\t"))


def _check_arrays(uri: str, vertices: np.ndarray, indices: np.ndarray) -> None:
    if len(indices) == 0:
        raise MeshError(f"{uri}: empty mesh (no faces)")
    bad = ~np.isfinite(vertices).all(axis=1)
    if bad.any():
        raise MeshError(f"{uri}: {int(bad.sum())} of {len(vertices)} vertices have NaN/Inf coordinates")
    if indices.max() >= len(vertices) or indices.min() < 0:
        raise MeshError(f"{uri}: faces index vertices that do not exist")


# ------------------------------------------------------------------------------------------------
# Triangulation of polygons
# ------------------------------------------------------------------------------------------------

def triangulate(vertices: np.ndarray, counts: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """Triangles (T, 3) of polygons given as vertex counts (F,) and their concatenated vertex
    indices: triangles as they are, convex polygons as fans, others by ear clipping (ValueError
    for one of more than MAX_NONCONVEX vertices). Polygons of fewer than 3 vertices have no area
    and are dropped. Triangles keep the polygons' orientation and order."""
    counts = np.asarray(counts, np.int64)
    flat = np.asarray(flat, np.int64)
    if (counts == 3).all():
        return flat.reshape(-1, 3)
    starts = np.cumsum(counts) - counts
    parts, owners = [], []
    for k in np.unique(counts[counts >= 3]).tolist():
        which = np.nonzero(counts == k)[0]
        poly = flat[starts[which, None] + np.arange(k)]  # (n, k)
        if k == 3:
            parts.append(poly)
            owners.append(which)
            continue
        turn = _turns(vertices[poly])
        fan = np.stack([np.zeros(k - 2, np.int64), np.arange(1, k - 1), np.arange(2, k)], axis=1)
        if k == 4:  # a quad has at most one reflex corner: fan from it (from corner 0 if convex)
            first = np.where(turn.min(axis=1) < -1e-9, turn.argmin(axis=1), 0)
            parts.append(np.take_along_axis(poly, (first[:, None] + fan.ravel()) % 4, axis=1).reshape(-1, 3))
            owners.append(np.repeat(which, 2))
            continue
        convex = (turn >= -1e-9).all(axis=1)
        parts.append(poly[convex][:, fan].reshape(-1, 3))
        owners.append(np.repeat(which[convex], k - 2))
        for j in np.nonzero(~convex)[0]:
            if k > MAX_NONCONVEX:
                raise ValueError(f"a non-convex face has {k:,} vertices; faces of more than {MAX_NONCONVEX:,} "
                                f"vertices are triangulated only when convex")
            tris = _ear_clip(vertices, poly[j])
            parts.append(tris)
            owners.append(np.full(len(tris), which[j]))
    if not parts:
        return np.zeros((0, 3), np.int64)
    order = np.argsort(np.concatenate(owners), kind="stable")
    return np.concatenate(parts)[order]


def _newell_normals(p: np.ndarray) -> np.ndarray:
    """Area-weighted normals (..., 3) of polygons (..., k, 3), also for non-planar ones."""
    return np.cross(p, np.roll(p, -1, axis=-2)).sum(axis=-2)


def _turns(p: np.ndarray) -> np.ndarray:
    """(n, k): how each polygon of `p` (n, k, 3) turns at each corner, seen along its own normal:
    the sine of the turning angle, > 0 for a left turn. A polygon whose corners are all >= 0 is
    convex: its fan from any vertex stays inside it. Degenerate polygons (zero normal) have all
    zeros: their fan has zero area either way."""
    normal = _newell_normals(p)
    normal /= np.maximum(np.linalg.norm(normal, axis=1), 1e-300)[:, None]
    edges = np.roll(p, -1, axis=1) - p  # edge i goes from vertex i to i + 1
    before = np.roll(edges, 1, axis=1)
    turn = np.einsum("nki,ni->nk", np.cross(before, edges), normal)
    return turn / np.maximum(np.linalg.norm(before, axis=2) * np.linalg.norm(edges, axis=2), 1e-300)


def _ear_clip(vertices: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Triangles (k - 2, 3) of one simple polygon (vertex indices `poly`), by ear clipping in the
    plane of its Newell normal: walk round the polygon cutting ears (convex corners whose triangle
    holds no reflex vertex). Reflex vertices are kept sorted by x, so a test looks only at those
    in its triangle's x range. A polygon left without an ear (self-intersecting) is fanned."""
    k = len(poly)
    p = vertices[poly]
    n = _newell_normals(p)
    length = np.linalg.norm(n)
    if not length > 0:  # degenerate: every triangle has zero area whatever we do
        return poly[np.stack([np.zeros(k - 2, int), np.arange(1, k - 1), np.arange(2, k)], axis=1)]
    n = n / length
    u = np.cross(n, [1.0, 0.0, 0.0] if abs(n[0]) < 0.9 else [0.0, 1.0, 0.0])
    u /= np.linalg.norm(u)
    xy = p @ np.stack([u, np.cross(n, u)], axis=1)  # counter-clockwise in (u, n x u)
    pts = xy.tolist()
    eps = 1e-12 * float(np.ptp(xy, axis=0).max()) ** 2
    prv, nxt = [(i - 1) % k for i in range(k)], [(i + 1) % k for i in range(k)]

    def convex(i: int) -> bool:
        (ax, ay), (bx, by), (cx, cy) = pts[prv[i]], pts[i], pts[nxt[i]]
        return (bx - ax) * (cy - by) - (by - ay) * (cx - bx) > eps

    reflex = np.array([not convex(i) for i in range(k)])
    by_x = np.flatnonzero(reflex)[np.argsort(xy[reflex, 0], kind="stable")]  # reflex vertices by x
    sorted_x, sorted_xy = xy[by_x, 0], xy[by_x]
    still = np.ones(len(by_x), bool)  # reflex vertices only ever become convex, and are never cut
    slot = {int(v): j for j, v in enumerate(by_x)}

    def is_ear(i: int) -> bool:
        if reflex[i]:
            return False
        a, b, c = xy[prv[i]], xy[i], xy[nxt[i]]
        lo = np.searchsorted(sorted_x, min(a[0], b[0], c[0]), side="left")
        hi = np.searchsorted(sorted_x, max(a[0], b[0], c[0]), side="right")
        q = sorted_xy[lo:hi][still[lo:hi]]
        q = q[~((q == a).all(1) | (q == c).all(1))]
        inside = ((_cross2(b - a, q - a) >= -eps) & (_cross2(c - b, q - b) >= -eps) & (_cross2(a - c, q - c) >= -eps))
        return not inside.any()

    tris, left, i, idle = [], k, 0, 0
    while left > 3:
        if is_ear(i):
            a, c = prv[i], nxt[i]
            tris.append((a, i, c))
            nxt[a], prv[c] = c, a
            left -= 1
            for j in (a, c):
                if reflex[j] and convex(j):
                    reflex[j] = False
                    still[slot[j]] = False
            i, idle = a, 0  # the corner before may have become an ear
            continue
        i, idle = nxt[i], idle + 1
        if idle > left:  # a whole turn without an ear: not a simple polygon; fan the rest
            rest = [i]
            while len(rest) < left:
                rest.append(nxt[rest[-1]])
            tris.extend((rest[0], rest[j], rest[j + 1]) for j in range(1, left - 1))
            left = 0
    if left == 3:
        tris.append((prv[i], i, nxt[i]))
    return poly[np.asarray(tris, np.int64)]


def _cross2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


# ------------------------------------------------------------------------------------------------
# Readers: bytes -> (vertices (V, 3) float64, polygon vertex counts (F,), concatenated indices)
# They raise ValueError (or IndexError, ...) with what is wrong; load_mesh names the file.
# ------------------------------------------------------------------------------------------------

def _content_lines(data: bytes, limit: int | None = None) -> list[bytes]:
    """The non-empty lines of `data` with `#` comments and surrounding whitespace removed (the
    first `limit` of them, when given). C-speed: no Python code runs per line."""
    if b"#" in data:
        data = re.sub(rb"#[^\r\n]*", b"", data)
    lines = list(filter(None, map(bytes.strip, data.splitlines())))
    return lines if limit is None else lines[:limit]


_SPACE = np.zeros(256, bool)
_SPACE[list(b" \t\n\r\v\f")] = True


def _numbers(lines: list[bytes], what: str) -> tuple[np.ndarray, np.ndarray]:
    """All the numbers of `lines` as float64 and how many each line has, parsed at C speed
    (numpy's text parser over the joined lines; numpy finds the tokens of each line).
    A token that is not a number raises ValueError naming the line (1-based among `lines`)."""
    block = b"\n".join(lines)
    if not block.strip():
        return np.zeros(0), np.zeros(len(lines), np.int64)
    buf = np.frombuffer(block, np.uint8)
    space = _SPACE[buf]
    token_start = ~space & np.concatenate(([True], space[:-1]))
    length = np.fromiter(map(len, lines), np.int64, len(lines))
    line_start = np.minimum(np.cumsum(length + 1) - length - 1, len(buf) - 1)
    per_line = np.add.reduceat(token_start.view(np.uint8), line_start, dtype=np.int64)
    per_line[length == 0] = 0  # reduceat gives an empty line the value at its start
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # numpy warns, then stops, at the first non-number
            values = np.fromstring(block, sep=" ")
    except (ValueError, DeprecationWarning):
        values = np.zeros(0)
    if len(values) != per_line.sum():
        for i, line in enumerate(lines):
            for token in line.split():
                try:
                    float(token)
                except ValueError:
                    raise ValueError(f"{what} {i + 1}: {token[:40]!r} is not a number") from None
        raise ValueError(f"{what}: a token numpy cannot read as a number")  # but Python can (rare)
    return values, per_line


def _xyz(lines: list[bytes], what: str, columns: tuple[int, int, int] = (0, 1, 2)) -> np.ndarray:
    """(n, 3) float64: numbers `columns` of each line (extra numbers, e.g. colours, are ignored)."""
    if not lines:
        return np.zeros((0, 3))
    values, per_line = _numbers(lines, what)
    short = np.flatnonzero(per_line < max(columns) + 1)
    if len(short):
        raise ValueError(f"{what} {short[0] + 1} has {per_line[short[0]]} numbers, expected at least "
                         f"{max(columns) + 1}")
    first = np.cumsum(per_line) - per_line
    return values[first[:, None] + np.asarray(columns)]


def _indices(values: np.ndarray, what: str) -> np.ndarray:
    out = values.astype(np.int64)
    if (out != values).any():
        raise ValueError(f"{what}: vertex index {values[out != values][0]} is not an integer")
    return out


def _count_prefixed(lines: list[bytes], what: str, pos: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Polygons from lines `... k i_1 ... i_k ...` whose count k is number `pos` of the line:
    (counts, concatenated indices). Numbers after the indices (colours) are ignored."""
    if not lines:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    values, per_line = _numbers(lines, what)
    first = np.cumsum(per_line) - per_line
    short = np.flatnonzero(per_line <= pos)
    if len(short):
        raise ValueError(f"{what} {short[0] + 1} is empty")
    counts = _indices(values[first + pos], what)
    bad = np.flatnonzero((counts < 0) | (counts > per_line - pos - 1))
    if len(bad):
        raise ValueError(f"{what} {bad[0] + 1} declares {counts[bad[0]]} vertices but lists "
                         f"{per_line[bad[0]] - pos - 1}")
    at = np.repeat(first + pos + 1, counts) + np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return counts, _indices(values[at], what)


# --- OFF ---------------------------------------------------------------------------------------

_OFF_KEYWORD = re.compile(rb"(ST)?C?N?(4)?(n)?OFF")


def _off_layout(lines: list[bytes]) -> tuple[int, int, int]:
    """(index of the first vertex line, vertex count, face count) from an OFF file's first
    content lines. The keyword line is optional, and some files (ModelNet) have the counts on it
    (`OFF490 518 0`)."""
    if not lines:
        raise ValueError("empty file")
    first = 0
    rest = lines[0]
    m = _OFF_KEYWORD.match(rest)
    if m:
        if m.group(2) or m.group(3):
            raise ValueError(f"'{m.group(0).decode()}' (4-D or n-D vertices) is not supported")
        rest = rest[m.end():].strip()
        if rest.upper().startswith(b"BINARY"):
            raise ValueError("binary OFF is not supported")
        first = 1
        if not rest:
            if len(lines) < 2:
                raise ValueError("no vertex/face count line")
            rest = lines[1]
            first = 2
    counts = rest.split()
    try:
        nv, nf = int(counts[0]), int(counts[1])
    except (IndexError, ValueError):
        raise ValueError(f"expected the counts line 'vertices faces edges', found {rest[:80]!r}") from None
    if nv < 0 or nf < 0:
        raise ValueError(f"negative counts {nv} {nf}")
    return first, nv, nf


def _read_off(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lines = _content_lines(data)
    first, nv, nf = _off_layout(lines[:3])
    if len(lines) < first + nv + nf:
        raise ValueError(f"truncated: {nv} vertices and {nf} faces declared, {len(lines) - first} lines found")
    vertices = _xyz(lines[first:first + nv], "vertex")
    counts, flat = _count_prefixed(lines[first + nv:first + nv + nf], "face")
    return vertices, counts, flat


# --- OBJ ---------------------------------------------------------------------------------------

_OBJ_V = re.compile(rb"^[ \t]*v[ \t]+([^#\r\n]*)", re.M)  # the text after `v`, up to a comment
_OBJ_F = re.compile(rb"^[ \t]*f[ \t]+([^#\r\n]*)", re.M)


def _read_obj(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions (`v x y z ...`) and faces (`f v`, `f v/vt`, `f v/vt/vn`, `f v//vn`; 1-based,
    negative = relative to the vertices so far) of every object and group of the file."""
    if b"\\" in data:
        data = data.replace(b"\\\r\n", b" ").replace(b"\\\n", b" ")  # line continuations
    vertices = _xyz(_OBJ_V.findall(data), "vertex")
    faces = _OBJ_F.findall(data)
    if not faces:
        return vertices, np.zeros(0, np.int64), np.zeros(0, np.int64)
    body = b"\n".join(faces)
    if b"/" in body:  # keep the vertex index of each v/vt/vn corner
        body = re.sub(rb"/[^ \t\n]*", b"", body)
    values, counts = _numbers(body.split(b"\n"), "face")
    flat = _indices(values, "face")
    if (flat == 0).any():
        raise ValueError("face index 0 (OBJ indices start at 1)")
    negative = flat < 0
    if negative.any():  # relative to the vertices defined before that face line
        v_at = [m.start() for m in _OBJ_V.finditer(data)]
        seen = np.searchsorted(v_at, [m.start() for m in _OBJ_F.finditer(data)])
        flat[negative] += np.repeat(seen, counts)[negative] + 1
    return vertices, counts.astype(np.int64), flat - 1


# --- PLY ---------------------------------------------------------------------------------------

_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
              "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
              "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}
_PLY_FORMATS = {"ascii": "", "binary_little_endian": "<", "binary_big_endian": ">"}
_PLY_END = re.compile(rb"^end_header[ \t\r]*\n", re.M)

# One property: (name, scalar type, None) or (name, count type, item type) for a list.
PlyProperty = tuple[str, str, str | None]


def _ply_header(data: bytes) -> tuple[str, list[tuple[str, int, list[PlyProperty]]], int]:
    """(format, [(element name, count, properties)], offset of the data) of a PLY file."""
    if not data.startswith(b"ply"):
        raise ValueError("not a PLY file (it does not start with 'ply')")
    end = _PLY_END.search(data)
    if end is None:
        raise ValueError(f"no 'end_header' line in the first {len(data):,} bytes")
    fmt = None
    elements: list[tuple[str, int, list[PlyProperty]]] = []
    for line in data[:end.start()].decode("ascii", "replace").splitlines()[1:]:
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format" and len(words) >= 2 and words[1] in _PLY_FORMATS:
            fmt = words[1]
        elif words[0] == "element" and len(words) == 3 and words[2].isdigit():
            elements.append((words[1], int(words[2]), []))
        elif (words[0] == "property" and elements and len(words) == 5 and words[1] == "list"
              and words[2] in _PLY_TYPES and words[3] in _PLY_TYPES):
            elements[-1][2].append((words[4], _PLY_TYPES[words[2]], _PLY_TYPES[words[3]]))
        elif words[0] == "property" and elements and len(words) == 3 and words[1] in _PLY_TYPES:
            elements[-1][2].append((words[2], _PLY_TYPES[words[1]], None))
        else:
            raise ValueError(f"unexpected PLY header line {line!r}")
    if fmt is None:
        raise ValueError("no 'format ascii|binary_little_endian|binary_big_endian' line")
    return fmt, elements, end.end()


def _ply_roles(elements) -> tuple[tuple[int, int, int], str]:
    """Positions of x, y, z in the vertex element and the name of the face element's index list."""
    props = {name: props for name, _, props in elements}
    names = [p[0] for p in props.get("vertex", [])]
    if not all(c in names for c in "xyz"):
        raise ValueError("no vertex element with x, y, z properties")
    lists = [p[0] for p in props.get("face", []) if p[2] is not None]
    index = next((n for n in ("vertex_indices", "vertex_index") if n in lists), lists[0] if len(lists) == 1 else "")
    if "face" in props and not index:
        raise ValueError(f"the face element has no vertex_indices list (lists: {lists})")
    return (names.index("x"), names.index("y"), names.index("z")), index


def _read_ply(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    fmt, elements, start = _ply_header(data)
    xyz, index = _ply_roles(elements)
    if fmt == "ascii":
        return _ply_ascii(data[start:], elements, xyz, index)
    return _ply_binary(data, start, elements, _PLY_FORMATS[fmt], xyz, index)


def _ply_ascii(body: bytes, elements, xyz, index) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lines = list(filter(None, map(bytes.strip, body.splitlines())))  # one record per line
    vertices = None
    counts, flat = np.zeros(0, np.int64), np.zeros(0, np.int64)
    at = 0
    for name, n, props in _up_to_geometry(elements):
        if len(lines) < at + n:
            raise ValueError(f"truncated: element '{name}' needs {n} lines, {len(lines) - at} left")
        block = lines[at:at + n]
        at += n
        if name == "vertex":
            if any(p[2] is not None for p in props):
                raise ValueError("list properties in the vertex element are not supported")
            vertices = _xyz(block, "vertex", xyz)
        elif name == "face":
            k = next(i for i, p in enumerate(props) if p[0] == index)
            if any(p[2] is not None for p in props[:k]):
                raise ValueError("a list property before the face's vertex indices is not supported")
            counts, flat = _count_prefixed(block, "face", pos=k)
    return vertices, counts, flat


def _ply_binary(data: bytes, at: int, elements, endian: str, xyz, index) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    vertices = None
    counts, flat = np.zeros(0, np.int64), np.zeros(0, np.int64)
    for name, n, props in _up_to_geometry(elements):
        if all(p[2] is None for p in props):  # fixed-size records: one numpy view
            dtype = np.dtype([(f"p{i}", endian + p[1]) for i, p in enumerate(props)])
            table = _frombuffer(data, dtype, n, at, name)
            at += n * dtype.itemsize
            if name == "vertex":
                vertices = np.stack([table[f"p{i}"] for i in xyz], axis=1).astype(np.float64)
            continue
        if name == "vertex":
            raise ValueError("list properties in the vertex element are not supported")
        at, lists = _ply_list_records(data, at, n, props, endian, name)
        if name == "face":
            counts, flat = lists[next(i for i, p in enumerate(props) if p[0] == index)]
    if vertices is None:
        raise ValueError("no vertex element")
    return vertices, counts, flat


def _up_to_geometry(elements):
    """The elements up to the last of vertex and face (later ones, if any, are not read)."""
    last = max(i for i, (name, _, _) in enumerate(elements) if name in ("vertex", "face"))
    return elements[:last + 1]


def _frombuffer(data: bytes, dtype: np.dtype, n: int, at: int, name: str) -> np.ndarray:
    if at + n * dtype.itemsize > len(data):
        raise ValueError(f"truncated: element '{name}' needs {n * dtype.itemsize:,} bytes from offset {at:,}, "
                         f"the file has {len(data) - at:,}")
    return np.frombuffer(data, dtype, n, at)


def _ply_list_records(data: bytes, at: int, n: int, props, endian: str, name: str):
    """Read `n` binary records with list properties starting at `at`: (offset after them,
    {property position: (counts, concatenated items as int64)} for the list properties).

    Fast path: every list as long as in the first record (all triangles, say): one numpy view.
    Otherwise the records are walked one by one to find where each starts."""
    if n == 0:
        return at, {i: (np.zeros(0, np.int64), np.zeros(0, np.int64)) for i, p in enumerate(props) if p[2]}
    first = []  # list lengths of the first record
    pos = at
    for _, t, item in props:
        size = np.dtype(t).itemsize
        if item is not None:
            if pos + size > len(data):
                raise ValueError(f"truncated: element '{name}' at offset {pos:,}")
            first.append(int(np.frombuffer(data, endian + t, 1, pos)[0]))
            size += first[-1] * np.dtype(item).itemsize
        pos += size
    fields, k = [], iter(first)
    for i, (_, t, item) in enumerate(props):
        fields.append((f"p{i}", endian + t))
        if item is not None:
            fields.append((f"l{i}", endian + item, (next(k),)))
    dtype = np.dtype(fields)
    if at + n * dtype.itemsize <= len(data):
        table = np.frombuffer(data, dtype, n, at)
        lists = {i: table[f"p{i}"] for i, p in enumerate(props) if p[2]}
        if all((c == c[0]).all() for c in lists.values()):
            return at + n * dtype.itemsize, {
                i: (c.astype(np.int64), table[f"l{i}"].reshape(-1).astype(np.int64)) for i, c in lists.items()}
    # Variable lengths: find each record's lists, then gather each length's items with numpy.
    if n > len(data) - at:  # before allocating per-record arrays: a record has at least one byte
        raise ValueError(f"truncated: element '{name}' has {n:,} records, {len(data) - at:,} bytes are left")
    sizes = [(np.dtype(t).itemsize, struct.Struct(endian + np.dtype(t).char), np.dtype(item).itemsize if item else 0)
             for _, t, item in props]
    listed = [i for i, p in enumerate(props) if p[2]]
    starts = {i: np.empty(n, np.int64) for i in listed}
    lengths = {i: np.empty(n, np.int64) for i in listed}
    pos = at
    end = len(data)
    try:
        for r in range(n):
            for i, (size, reader, item_size) in enumerate(sizes):
                if item_size:
                    length = reader.unpack_from(data, pos)[0]
                    if length < 0:
                        raise ValueError(f"element '{name}' record {r:,}: negative list length {length}")
                    lengths[i][r] = length
                    starts[i][r] = pos + size
                    pos += size + length * item_size
                else:
                    pos += size
            if pos > end:
                raise struct.error
    except struct.error:
        raise ValueError(f"truncated: element '{name}' has {n:,} records, the file ends in record {r:,}") from None
    raw = np.frombuffer(data, np.uint8)
    out = {}
    for i in listed:
        item = np.dtype(endian + props[i][2])
        flat = np.empty(int(lengths[i].sum()), np.int64)
        offsets = np.cumsum(lengths[i]) - lengths[i]
        for k in np.unique(lengths[i]).tolist():
            rows = np.nonzero(lengths[i] == k)[0]
            if k == 0:
                continue
            byte_at = starts[i][rows, None] + np.arange(k * item.itemsize)
            values = raw[byte_at].reshape(-1).view(item).reshape(len(rows), k)
            flat[offsets[rows, None] + np.arange(k)] = values
        out[i] = (lengths[i], flat)
    return pos, out


_POLYGON_READERS = {"obj": _read_obj, "off": _read_off, "ply": _read_ply}
