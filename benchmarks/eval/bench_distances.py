"""Pairwise distance matrices between 2,048-point clouds of corpus shapes: throughput and error.

    .venv/bin/python benchmarks/eval/bench_distances.py [--clouds 64] [--points 2048] [--device cpu|cuda]
                                                        [--kdtree-clouds 32] [--emd-pairs 8] [--threads 2]
                                                        [--repeats 3]

Chamfer: `chamfer_matrix` (tiled torch, on --device; on CPU with --threads threads, and again with
one) over --clouds clouds against themselves (symmetric: each pair once) and against a second set
of as many (full), side by side with the plain per-pair loop over scipy k-d trees
(`chamfer_matrix_kdtree`, 1 and --threads query workers) on the first --kdtree-clouds clouds (its
per-pair cost does not depend on the set size); the largest difference between the two on those
pairs. Chamfer times are the best of --repeats runs (the cores
may be shared: the load average is printed before and after). The time of a 2,048 x 2,048 matrix
(4.2 M pairs) and of a whole generation evaluation at that size (D_gr full + D_gg and D_rr
symmetric: 8.4 M pairs) are extrapolated from the measured pairs/s, not measured.

EMD: the batched auction (`emd_matrix`, eps 1e-3) against the exact linear assignment on --emd-pairs
pairs of distinct shapes and as many pairs of two independent samples of one shape (the smallest
EMDs, the hardest case for a relative error); time per pair of both, relative error, the bound.

Noise floors: CD between two independent 2,048-point samples of one shape, and F-score at 0.01
between two samples of one shape at 2,048 and 100,000 points (the numbers quoted in the module docs
of generation.py and shape.py).

Clouds: corpus shapes (raywsl.data.corpus, seed 0) normalised into the unit sphere as ingest does,
2,048 points each, seeded per shape with `shape_rng` as evaluation does.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time

import numpy as np
import torch

from raywsl.data.corpus import generate_shape
from raywsl.data.meshes import normalise
from raywsl.geometry.distances import (DEFAULT_EPS, chamfer, chamfer_matrix, chamfer_matrix_kdtree, emd, emd_batch,
                                   resolve_device)
from raywsl.geometry.shape import fscore
from raywsl.geometry.sampling import sample_surface, shape_rng

FULL = 2048 * 2048
SYMMETRIC = 2048 * 2047 // 2


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clouds", type=int, default=64, help="clouds per set for the torch matrices (64)")
    ap.add_argument("--points", type=int, default=2048, help="points per cloud (2048)")
    ap.add_argument("--device", default="cpu", help="torch device: cpu or cuda (cpu)")
    ap.add_argument("--kdtree-clouds", type=int, default=32, help="clouds for the k-d tree baseline (32)")
    ap.add_argument("--emd-pairs", type=int, default=8, help="pairs of each kind for EMD (8; 0: skip)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads and k-d tree workers (2)")
    ap.add_argument("--repeats", type=int, default=3, help="Chamfer timings: best of this many runs (3)")
    return ap.parse_args()


def meshes(count: int, offset: int = 0):
    return [normalise(generate_shape(offset + i, seed=0).mesh, 0.03)[0] for i in range(count)]


def clouds(ms, points: int, seed: int = 0) -> np.ndarray:
    return np.stack([sample_surface(m, points, shape_rng(seed, str(i)))[0] for i, m in enumerate(ms)])


def timed(fn, repeats: int = 1):
    """(best time of `repeats` runs, the output)."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def hours(pairs: int, rate: float) -> str:
    s = pairs / rate
    return f"{s / 86400:.0f} days" if s >= 3 * 86400 else f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min"


def chamfer_section(args, a: np.ndarray, b: np.ndarray) -> None:
    n = len(a)
    chamfer_matrix(a[:4], device=args.device)  # warm-up: thread pools, CUDA context, cuBLAS
    r = args.repeats
    t_sym, d_sym = timed(lambda: chamfer_matrix(a, device=args.device), r)
    t_full, _ = timed(lambda: chamfer_matrix(a, b, device=args.device), r)
    if args.device == "cpu":  # one thread: the per-core figure, and robust when the cores are shared
        torch.set_num_threads(1)
        t_one, _ = timed(lambda: chamfer_matrix(a, device="cpu"), r)
        torch.set_num_threads(args.threads)
    k = min(args.kdtree_clouds, n)
    t_kd1, d_kd = timed(lambda: chamfer_matrix_kdtree(a[:k], workers=1), r)
    t_kd2, _ = timed(lambda: chamfer_matrix_kdtree(a[:k], workers=args.threads), r)
    off = ~np.eye(k, dtype=bool)
    rel = np.abs(d_sym[:k, :k][off] / d_kd[off] - 1).max()
    threads = f"{args.threads} threads, " if args.device == "cpu" else ""
    rows = [
        (f"torch tiled, {args.device}, {threads}symmetric {n} clouds", n * (n - 1) // 2, t_sym),
        (f"torch tiled, {args.device}, {threads}full {n} x {n}", n * n, t_full),
        *([(f"torch tiled, cpu, 1 thread, symmetric {n} clouds", n * (n - 1) // 2, t_one)]
          if args.device == "cpu" else []),
        (f"k-d tree per pair, 1 worker, symmetric {k} clouds", k * (k - 1) // 2, t_kd1),
        (f"k-d tree per pair, {args.threads} workers, symmetric {k} clouds", k * (k - 1) // 2, t_kd2),
    ]
    print(f"\n### Chamfer matrix, {args.points}-point clouds\n")
    print("| implementation | pairs | seconds | pairs/s | 2,048 x 2,048 (4.2 M pairs), extrapolated "
          "| generation eval at 2,048 (8.4 M pairs), extrapolated |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, pairs, t in rows:
        rate = pairs / t
        print(f"| {name} | {pairs:,} | {t:.1f} | {rate:,.0f} | {hours(FULL, rate)} "
              f"| {hours(FULL + 2 * SYMMETRIC, rate)} |")
    print(f"\ntorch (float32 on CPU, float64 products on CUDA) vs k-d tree (float64) on the {k * (k - 1) // 2:,} "
          f"shared pairs: max relative difference {rel:.1e}")


def emd_section(args, a: np.ndarray, resampled: np.ndarray) -> None:
    p = min(args.emd_pairs, len(a) // 2)
    if p == 0:
        return
    distinct = (a[:p], a[p:2 * p])  # shape i against shape p + i
    same = (a[:p], resampled[:p])  # shape i against another sample of itself
    print(f"\n### EMD, {args.points}-point clouds, auction eps = {DEFAULT_EPS:g} vs exact assignment\n")
    print("| pairs | count | EMD range | exact s/pair (1 core) | auction s/pair (batched) | auction pairs/s "
          "| rel. error mean | rel. error max | within [exact, exact + eps] | auction 2,048 x 2,048, extrapolated |")
    print("|---|---:|---|---:|---:|---:|---:|---:|:-:|---:|")
    for name, (x, y) in (("distinct shapes", distinct), ("same shape, resampled", same)):
        t_exact, exact = timed(lambda: np.array([emd(x[i], y[i], exact=True) for i in range(p)]))
        # The p aligned pairs in one batch of the kernel `emd_matrix` runs (it batches 32 pairs of
        # 2,048 points on CPU, up to 1,024 on a GPU).
        tx, ty = (torch.as_tensor(c).to(resolve_device(args.device)) for c in (x, y))
        emd_batch(tx[:1, :64], ty[:1, :64])  # warm-up
        t_auction, approx = timed(lambda: emd_batch(tx, ty).cpu().numpy().astype(np.float64))
        rel = approx / exact - 1
        ok = np.all((approx >= exact - 1e-6) & (approx <= exact + DEFAULT_EPS + 1e-6))
        print(f"| {name} | {p} | {exact.min():.3f}-{exact.max():.3f} | {t_exact / p:.2f} | {t_auction / p:.2f} "
              f"| {p / t_auction:.2f} | {rel.mean() * 100:.3f} % | {rel.max() * 100:.3f} % | {'yes' if ok else 'NO'} "
              f"| {hours(FULL, p / t_auction)} |")


def floor_section(args, ms) -> None:
    cds = [chamfer(clouds([m], args.points, 1)[0], clouds([m], args.points, 2)[0]) for m in ms]
    print(f"\n### Noise floors ({len(ms)} corpus shapes, two independent samples of each)\n")
    print(f"- CD at {args.points} points: min {min(cds):.2e}, median {np.median(cds):.2e}, max {max(cds):.2e}")
    for pts in (args.points, 100_000):
        f = [fscore(clouds([m], pts, 1)[0], clouds([m], pts, 2)[0], 0.01).f for m in ms[:6]]
        print(f"- F-score at tau = 0.01, {pts:,} points ({min(6, len(ms))} shapes): {min(f):.2f}-{max(f):.2f}")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    ms_a, ms_b = meshes(args.clouds), meshes(args.clouds, offset=args.clouds)
    a, b = clouds(ms_a, args.points), clouds(ms_b, args.points)
    resampled = clouds(ms_a, args.points, seed=1)
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.2f}; torch {torch.__version__}, {args.threads} threads, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    print(f"Clouds: {args.clouds} + {args.clouds} corpus shapes, {args.points} points each "
          f"(generated and sampled in {time.perf_counter() - t0:.1f} s)")
    chamfer_section(args, a, b)
    emd_section(args, a, resampled)
    floor_section(args, ms_a[:22])
    print(f"\nTotal {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
