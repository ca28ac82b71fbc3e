"""Which compression for the row stores' arrays: every preset of raywsl.store.rows.CODECS, side by side.

    .venv/bin/python benchmarks/store/bench_codecs.py            # synthetic data + any real store under runs/
    .venv/bin/python benchmarks/store/bench_codecs.py --real none --repeats 1

For each data set and codec, the arrays are created with the layout RowStore.create gives them
(rows.data_array_layout / text_array_layout: one storage object per store shard), only the
compressors swapped, then written one storage object at a time and read back one store shard at a
time, as the stages do.
Reported: stored bytes per shape (the array objects on disk), and write / read throughput in MB of
raw (uncompressed) data per second, wall clock and per CPU-second of this process (zarr encodes in
threads; CPU time is also what other processes on a shared machine cannot disturb), best of
--repeats (each write to a fresh folder; reads come from the page cache: decoding, not the disk).

The pick per data set: the smallest stored size among the codecs that write and read at least
min(100 MB/s, half of what `none` does) per CPU-second, a tie (within 2 %) going to the fastest reader.
100 MB/s per core is 10x what ingest produces per core (SDF sampling: ~1 s for a 3.6 MB shape) and
what fit consumes; half of `none` bounds the cost where the per-object overhead dominates (small, text).

Data sets:
- samples: per shape, `--points` SDF query points (the ingest mix: 25 % near the surface with sigma
  0.0224, 25 % with 0.0707, 50 % uniform in [-1, 1]^3) around a sphere of radius 0.4..0.8, their
  signed distances, `--surface` surface points and normals (float32); shards of 8.
- weights: rows of `--params` float32 ~ N(0, 0.05) (a 54,785-parameter field by default); shards of 64.
- small: status (int8), loss (float32), steps (int32), center ((3,) float64), scale (float64), the
  arrays under SMALL_ROW_BYTES a row: one chunk per shard of 8.
- text: shape ids, source paths, categories (the driver's sharded metadata) and reasons (512 bytes,
  zero-padded; one row in 10 failed with a realistic message).
- real samples / real weights: the done rows of the largest row stores under runs/ (--real auto).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import time
from typing import Callable

import numpy as np
import zarr

from raywsl.store.rows import (CODECS, DEFAULT_CODEC, REASON_BYTES, SMALL_ROW_BYTES, ArraySpec,
                               data_array_layout, encode_strings, meta_chunking, text_array_layout)

RUNS = os.path.join(os.path.dirname(__file__), "..", "..", "runs")


# ------------------------------------------------------------------------------------ data sets

def synthetic_samples(n: int, points: int, surface: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {"points": np.empty((n, points, 3), np.float32), "sdf": np.empty((n, points), np.float32),
           "surface": np.empty((n, surface, 3), np.float32), "normals": np.empty((n, surface, 3), np.float32)}
    for i in range(n):
        r = rng.uniform(0.4, 0.8)
        d = rng.normal(size=(surface, 3))
        normals = d / np.linalg.norm(d, axis=1, keepdims=True)
        out["surface"][i], out["normals"][i] = normals * r, normals
        q = [points // 4, points // 4]
        q.append(points - sum(q))
        near = []
        for count, sigma in zip(q[:2], (0.0224, 0.0707)):
            d = rng.normal(size=(count, 3))
            near.append(d / np.linalg.norm(d, axis=1, keepdims=True) * r + rng.normal(scale=sigma, size=(count, 3)))
        p = np.concatenate([*near, rng.uniform(-1, 1, size=(q[2], 3))]).astype(np.float32)
        out["points"][i], out["sdf"][i] = p, np.linalg.norm(p, axis=1) - r
    return out


def synthetic_small(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"status": rng.choice(np.array([1, 2], np.int8), size=n, p=[0.95, 0.05]),
            "loss": rng.lognormal(-6, 0.5, size=n).astype(np.float32),
            "steps": np.full(n, 2000, np.int32) - rng.integers(0, 2, size=n, dtype=np.int32) * 500,
            "center": rng.normal(scale=0.05, size=(n, 3)), "scale": rng.uniform(0.8, 1.2, size=n)}


def synthetic_text(n: int, seed: int = 0) -> dict[str, list[str]]:
    rng = np.random.default_rng(seed)
    cats = ["airplane", "chair", "table", "lamp", "sofa", "car", "mug", "bench"]
    cat = [cats[i] for i in rng.integers(0, len(cats), size=n)]
    ids = [f"{c}-{i:07d}" for i, c in enumerate(cat)]
    sources = [f"/data/ModelNet40/{c}/train/{c}_{i:04d}.off" for i, c in enumerate(cat)]
    reasons = ["" if rng.random() > 0.1 else
               f"/data/ModelNet40/{c}/train/{c}_{i:04d}.off: mesh is not watertight ({rng.integers(1, 90)} "
               f"boundary edges) and winding numbers are ambiguous; sign unreliable" for i, c in enumerate(cat)]
    return {"shape_id": ids, "source": sources, "category": cat, "reason": reasons}


def real_rows(kind: str, names: list[str], limit: int) -> tuple[str, dict[str, np.ndarray]] | None:
    """The done rows (at most `limit`) of the biggest `kind` store (samples/weights.zarr) under runs/."""
    paths = {os.path.realpath(p) for p in glob.glob(os.path.join(RUNS, "**", f"{kind}.zarr"), recursive=True)}
    best = None
    for path in paths:
        try:
            g = zarr.open_group(path, mode="r")
            done = np.flatnonzero(g["status"][:] == 1)
            size = len(done) * sum(int(np.prod(g[n].shape[1:])) for n in names)
        except (KeyError, ValueError, FileNotFoundError):
            continue
        if best is None or size > best[0]:
            best = (size, path, g, done)
    if best is None or not len(best[3]):
        return None
    _, path, g, done = best
    rows = done[:limit]
    return path, {n: g[n].get_orthogonal_selection((rows,)) for n in names}


# ------------------------------------------------------------------------------------ measuring

def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files
               if f != "zarr.json")


def best_of(repeats: int, f: Callable[[int], tuple[float, float]]) -> tuple[float, float]:
    """(best wall seconds, best CPU seconds) of `repeats` runs of f(i) -> (wall, cpu)."""
    runs = [f(i) for i in range(repeats)]
    return min(w for w, _ in runs), min(c for _, c in runs)


def timed(f: Callable[[], None]) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    f()
    return time.perf_counter() - t0, time.process_time() - c0


def measure(name: str, arrays: dict, layouts: dict[str, Callable[[tuple], dict]], shard: int, codec: str,
            folder: str, repeats: int) -> dict:
    """Write `arrays` shard by shard into fresh arrays of `layouts` with `codec`, read them back; sizes and
    best throughputs. `arrays` values are numpy arrays, or lists of str for text columns."""
    n = len(next(iter(arrays.values())))
    raw = {k: (encode_strings(v, layouts[k](CODECS[codec])["shape"][1], truncate=True) if isinstance(v, list) else v)
           for k, v in arrays.items()}
    nbytes = sum(v.nbytes for v in raw.values())
    stored = {}

    def write(i: int) -> tuple[float, float]:
        path = os.path.join(folder, f"{name}-{codec}-{i}.zarr".replace(" ", "_"))
        shutil.rmtree(path, ignore_errors=True)
        g = zarr.open_group(path, mode="w", zarr_format=3)
        handles = {k: g.create_array(**layouts[k](CODECS[codec])) for k in raw}

        def run():
            for k, v in raw.items():  # one storage object at a time, as RowStore writes them
                step = (handles[k].shards or handles[k].chunks)[0]
                for a in range(0, n, step):
                    handles[k][a:a + step] = v[a:a + step]
        seconds = timed(run)
        stored["bytes"] = folder_bytes(path)
        stored["path"] = path
        return seconds

    def read(_: int) -> tuple[float, float]:
        g = zarr.open_group(stored["path"], mode="r", zarr_format=3)
        handles = {k: g[k] for k in raw}
        back = {k: [] for k in raw}

        def run():
            for a in range(0, n, shard):  # one store shard at a time, as a worker or a read task does
                for k, h in handles.items():
                    back[k].append(h[a:a + shard])
        seconds = timed(run)
        for k, parts in back.items():
            assert np.array_equal(np.concatenate(parts), raw[k]), f"{name}/{k} with {codec} did not round-trip"
        return seconds

    (w, wc), (r, rc) = best_of(repeats, write), best_of(repeats, read)
    for i in range(repeats):
        shutil.rmtree(os.path.join(folder, f"{name}-{codec}-{i}.zarr".replace(" ", "_")), ignore_errors=True)
    return {"data": name, "codec": codec, "rows": n, "raw_per_row": nbytes / n, "bytes_per_row": stored["bytes"] / n,
            "ratio": nbytes / max(1, stored["bytes"]), "write": nbytes / w / 1e6, "read": nbytes / r / 1e6,
            "write_cpu": nbytes / max(wc, 1e-9) / 1e6, "read_cpu": nbytes / max(rc, 1e-9) / 1e6}


def pick(rows: list[dict]) -> dict:
    """The rule of the module docstring."""
    none = next(r for r in rows if r["codec"] == "none")
    fast = [r for r in rows if all(r[f"{op}_cpu"] >= min(100.0, 0.5 * none[f"{op}_cpu"]) for op in ("write", "read"))]
    least = min(r["bytes_per_row"] for r in fast)
    return max((r for r in fast if r["bytes_per_row"] <= 1.02 * least), key=lambda r: r["read_cpu"])


def data_layouts(arrays: dict[str, np.ndarray], shard: int, kind: str) -> dict[str, Callable]:
    n = len(next(iter(arrays.values())))

    def layout(k, v):
        spec = ArraySpec(k, v.shape[1:], str(v.dtype))
        return lambda codecs: {**data_array_layout(spec, n, shard, kind), "compressors": codecs}
    return {k: layout(k, v) for k, v in arrays.items()}


def text_layouts(columns: dict[str, list[str]], shard: int) -> dict[str, Callable]:
    n = len(next(iter(columns.values())))

    def layout(k, v):
        if k == "reason":
            return lambda codecs: {**text_array_layout(k, n, REASON_BYTES, chunk=shard), "compressors": codecs}
        width = max(len(s.encode()) for s in v)
        chunk, per_object = meta_chunking(n, shard)
        return lambda codecs: {**text_array_layout(k, n, width, chunk=chunk, shard=per_object), "compressors": codecs}
    return {k: layout(k, v) for k, v in columns.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", type=int, default=200_000, help="SDF points per shape (ingest.points default)")
    ap.add_argument("--surface", type=int, default=16_384, help="surface points per shape (ingest default)")
    ap.add_argument("--sample-rows", type=int, default=16)
    ap.add_argument("--params", type=int, default=54_785)
    ap.add_argument("--weight-rows", type=int, default=128)
    ap.add_argument("--text-rows", type=int, default=8192)
    ap.add_argument("--real-rows", type=int, default=64, help="rows of a real samples store (weights: 4x)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--codecs", nargs="+", default=list(CODECS), choices=list(CODECS))
    ap.add_argument("--real", choices=["auto", "none"], default="auto",
                    help="also measure the biggest real samples.zarr / weights.zarr under runs/")
    ap.add_argument("--dir", default="/work/scratch/store/codecs")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)

    rng = np.random.default_rng(0)
    sets = []  # (name, arrays, layouts, shard)
    samples = synthetic_samples(args.sample_rows, args.points, args.surface)
    sets.append(("samples", samples, data_layouts(samples, 8, "samples"), 8))
    weights = {"weights": rng.normal(scale=0.05, size=(args.weight_rows, args.params)).astype(np.float32)}
    sets.append(("weights", weights, data_layouts(weights, 64, "weights"), 64))
    small = synthetic_small(4096)
    sets.append(("small", small, data_layouts(small, 8, "samples"), 8))
    text = synthetic_text(args.text_rows)
    sets.append(("text", text, text_layouts(text, 8), 8))
    notes = []
    if args.real == "auto":
        for kind, names, limit, shard in (("samples", ["points", "sdf", "surface", "normals"], args.real_rows, 8),
                                          ("weights", ["weights"], 4 * args.real_rows, 64)):
            found = real_rows(kind, names, limit)
            if found:
                path, arrays = found
                sets.append((f"real {kind}", arrays, data_layouts(arrays, shard, kind), shard))
                shapes = ", ".join(f"{k} {v.shape[1:]}" for k, v in arrays.items())
                notes.append(f"real {kind}: {len(next(iter(arrays.values())))} done rows of {path} ({shapes})")
            else:
                notes.append(f"real {kind}: no store with done rows under {os.path.realpath(RUNS)}")

    results = []
    for name, arrays, layouts, shard in sets:
        for codec in args.codecs:
            results.append(measure(name, arrays, layouts, shard, codec, args.dir, args.repeats))
            r = results[-1]
            print(f"{name:13s} {codec:22s} {r['bytes_per_row']:12,.0f} B/row  ratio {r['ratio']:5.2f}  "
                  f"write {r['write']:7.3g} MB/s ({r['write_cpu']:.3g}/CPU-s)  "
                  f"read {r['read']:7.3g} MB/s ({r['read_cpu']:.3g}/CPU-s)", flush=True)

    print("\nThroughput in MB of raw data per second: wall clock, and per CPU-second of the process.\n")
    print("| data | codec | raw B/shape | stored B/shape | ratio | write MB/s | read MB/s "
          "| write MB/CPU-s | read MB/CPU-s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['data']} | {r['codec']} | {r['raw_per_row']:,.0f} | {r['bytes_per_row']:,.0f} | "
              f"{r['ratio']:.2f} | {r['write']:,.3g} | {r['read']:,.3g} | {r['write_cpu']:,.3g} | "
              f"{r['read_cpu']:,.3g} |")
    print("\npicks (smallest among the fast enough, see the docstring):")
    for name, *_ in sets:
        rows = [r for r in results if r["data"] == name]
        if "none" not in {r["codec"] for r in rows}:
            continue
        p = pick(rows)
        print(f"- {name}: {p['codec']} ({p['ratio']:.2f}x, read {p['read_cpu']:,.3g} MB/CPU-s; "
              f"none reads {next(r for r in rows if r['codec'] == 'none')['read_cpu']:,.3g})")
    print(f"\ndefaults in use (rows.DEFAULT_CODEC): {DEFAULT_CODEC}; small = rows under {SMALL_ROW_BYTES} B")
    for line in notes:
        print(line)


if __name__ == "__main__":
    main()
