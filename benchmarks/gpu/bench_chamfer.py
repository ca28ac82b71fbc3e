"""The Chamfer matrix on one GPU: the fused Triton kernel against the tiled torch path, with their agreement.

    python benchmarks/gpu/bench_chamfer.py --out $OUT/chamfer.json [--clouds 2048] [--points 2048]
                                           [--modes tensor,fma] [--sweep-seconds 60] [--torch-seconds 20]
    python benchmarks/gpu/bench_chamfer.py --smoke --out /tmp/chamfer.json     (CPU interpreter, tiny sizes)

Clouds: --clouds clouds of --points points on random ellipsoid surfaces in the unit sphere, made on the
device (the kernel's speed does not depend on the shapes; its accuracy is checked on them).

Sections, each written to --out as soon as it is done (a timeout keeps what was measured):
1. check: the fused matrix (every mode) against the exact float64 k-d trees on --check-clouds clouds:
   max relative error off the diagonal.
2. fused: the symmetric --clouds x --clouds matrix (`raywsl.kernels.chamfer.chamfer_matrix(A)`, one
   directed pass plus its transpose) per mode with the default tuning: seconds, pairs/s (distinct
   pairs, as the torch path counts them), distances/s; compile time apart. A mode whose estimate
   (from a slice of rows) exceeds --max-seconds is extrapolated from that slice instead, and says so.
3. torch: the tiled torch path (`raywsl.geometry.distances.chamfer_matrix`, float64 products) on the
   same clouds: the whole matrix if it is estimated under --torch-seconds, else a slice of rows
   sized to take about --torch-seconds, extrapolated to the symmetric matrix (and said so); the
   fused matrix's max relative error against it on those rows; the speed-up.
4. sweep: block sizes, warps and stages per mode on --sweep-clouds clouds (pairs/s of each, or its
   error), for at most --sweep-seconds; the best config, and the full matrix again with it if it
   beats the default.
The target (issue 17): the 2,048 x 2,048 matrix of 2,048-point clouds in under a minute on one H100.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

# Triton's interpreter where there is no GPU (--smoke); it must be on before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Repo root on sys.path: the script runs from a checkout without `pip install -e .` on the device.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import triton  # noqa: E402

from raywsl.geometry.distances import chamfer_matrix as torch_chamfer_matrix  # noqa: E402
from raywsl.geometry.distances import chamfer_matrix_kdtree  # noqa: E402
from raywsl.kernels import chamfer as kc  # noqa: E402

TARGET_S = 60.0
# (block_m, block_n, warps, stages) tried by the sweep, per mode (the modes take turns), the default first.
SWEEP = {
    "tensor": [(128, 64, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 128, 4, 3),
               (256, 64, 8, 3), (128, 64, 4, 2), (128, 32, 4, 3)],
    "fma": [(64, 64, 4, 2), (32, 64, 4, 2), (128, 64, 4, 3), (64, 64, 8, 2), (32, 128, 4, 2), (64, 128, 8, 2),
            (16, 128, 4, 2)],
}
SMOKE_SWEEP = [(16, 32, 4, 2), (32, 16, 4, 2)]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file of the results")
    ap.add_argument("--clouds", type=int, default=2048, help="clouds in the set (2048)")
    ap.add_argument("--points", type=int, default=2048, help="points per cloud (2048)")
    ap.add_argument("--modes", default="tensor,fma", help="kernel modes to time (tensor,fma)")
    ap.add_argument("--check-clouds", type=int, default=8, help="clouds checked against the k-d trees (8)")
    ap.add_argument("--max-seconds", type=float, default=120, help="extrapolate a fused run estimated above this")
    ap.add_argument("--torch-seconds", type=float, default=20, help="time budget of the torch path (20)")
    ap.add_argument("--sweep-seconds", type=float, default=60, help="time budget of the tuning sweep (60; 0: none)")
    ap.add_argument("--sweep-clouds", type=int, default=512, help="clouds of the sweep's matrix (512)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, for a CPU in Triton's interpreter")
    args = ap.parse_args()
    if args.smoke:
        args.clouds, args.points, args.check_clouds, args.sweep_clouds = 5, 40, 4, 3
        args.torch_seconds = min(args.torch_seconds, 2)
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in args.modes if m not in kc.MODES]
    if unknown:
        ap.error(f"--modes: {unknown} not in {list(kc.MODES)}")
    return args


def surface_clouds(k: int, n: int, device: torch.device, seed: int) -> torch.Tensor:
    """k clouds of n points on ellipsoids (radii 0.3-1.0, centres within 0.1 of the origin): (k, n, 3) float32."""
    g = torch.Generator(device=device).manual_seed(seed)
    u = torch.randn(k, n, 3, generator=g, device=device)
    u = u / u.norm(dim=2, keepdim=True)
    radii = 0.3 + 0.7 * torch.rand(k, 1, 3, generator=g, device=device)
    shift = 0.2 * torch.rand(k, 1, 3, generator=g, device=device) - 0.1
    return (u * radii + shift).contiguous()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def max_rel_error(got: np.ndarray, want: np.ndarray) -> float:
    """Over the entries where want > 0 (off the diagonal of a set against itself)."""
    keep = want > 0
    return float(np.abs(got[keep] / want[keep] - 1).max()) if keep.any() else float("nan")


def fused_full(a: torch.Tensor, tuning: kc.Tuning, max_seconds: float, device: torch.device) -> dict:
    """The symmetric matrix of `a` with `tuning`: measured, or extrapolated from a slice of rows when the
    slice says it would take over max_seconds."""
    na, n = a.shape[:2]
    t_compile, _ = timed(lambda: kc.chamfer_matrix(a[:2], tuning=tuning), device)  # compiles (first use)
    rows = min(na, max(1, (1 << 17) // na))  # ~131 k directed pairs
    t_slice, _ = timed(lambda: kc.directed_chamfer_matrix(a[:rows], a, tuning), device)
    estimate = t_slice * na / rows
    row = {"tuning": asdict(tuning), "compile_and_first_call_s": round(t_compile, 3), "estimate_s": round(estimate, 3)}
    if estimate > max_seconds:
        seconds, extrapolated = estimate, True
    else:
        seconds, _ = timed(lambda: kc.chamfer_matrix(a, tuning=tuning), device)
        extrapolated = False
    pairs = na * (na - 1) // 2
    row.update(seconds=round(seconds, 4), extrapolated=extrapolated, pairs=pairs,
               pairs_per_s=round(pairs / seconds), directed_pairs_per_s=round(na * na / seconds),
               distances_per_s=float(f"{na * na * n * n / seconds:.4g}"), under_target=seconds < TARGET_S)
    if extrapolated:
        row["note"] = f"extrapolated from {rows} rows x {na} clouds (directed) in {t_slice:.2f} s"
    return row


def main() -> int:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = {
        "benchmark": "chamfer matrix: fused Triton kernel vs tiled torch",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu (Triton interpreter) "
                                                                                  f"{platform.processor()}",
        "torch": torch.__version__, "triton": triton.__version__, "smoke": args.smoke,
        "clouds": args.clouds, "points": args.points, "target_s": TARGET_S,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        path.write_text(json.dumps(out, indent=1))

    def section(name: str, fn) -> None:
        """Run one section; a failure is recorded (and printed) and the next section still runs."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - report every failure, keep measuring
            out.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
            print(f"{name}: FAILED {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
        save()

    print(f"device: {out['device']}; {args.clouds} clouds x {args.points} points", flush=True)
    a = surface_clouds(args.clouds, args.points, device, args.seed)
    defaults = {m: kc.DEFAULTS[m] for m in args.modes}
    if args.smoke:
        defaults = {m: replace(t, block_m=16, block_n=32) for m, t in defaults.items()}

    def check() -> None:
        c = a[:args.check_clouds]
        want = chamfer_matrix_kdtree(c.cpu().numpy())
        out["check_vs_kdtree"] = {"clouds": len(c)}
        for mode, tuning in defaults.items():
            err = max_rel_error(kc.chamfer_matrix(c, tuning=tuning).cpu().numpy(), want)
            out["check_vs_kdtree"][mode] = {"max_rel_error": err}
            print(f"check {mode}: max relative error vs float64 k-d trees on {len(c)} clouds: {err:.2e}", flush=True)

    def fused() -> None:
        out["fused"] = {}
        for mode, tuning in defaults.items():
            row = fused_full(a, tuning, args.max_seconds, device)
            out["fused"][mode] = row
            save()
            print(f"fused {mode}: {args.clouds} x {args.clouds} symmetric in {row['seconds']:.2f} s"
                  f"{' (extrapolated)' if row['extrapolated'] else ''}: {row['pairs_per_s']:,} pairs/s, "
                  f"{row['distances_per_s']:.3g} distances/s "
                  f"(first call, with the compile: {row['compile_and_first_call_s']} s)",
                  flush=True)

    def torch_path() -> None:
        na = args.clouds
        pairs = na * (na - 1) // 2
        host = a.cpu().numpy()
        torch_chamfer_matrix(host[:2], host[:4], device=device)  # warm-up: CUDA context, kernels
        t1, _ = timed(lambda: torch_chamfer_matrix(host[:1], host, device=device), device)
        estimate = t1 * pairs / na
        if estimate <= args.torch_seconds:
            seconds, d = timed(lambda: torch_chamfer_matrix(host, device=device), device)
            rows, extrapolated, measured = na, False, seconds
        else:
            rows = int(min(na, max(1, args.torch_seconds / t1)))
            measured, d = timed(lambda: torch_chamfer_matrix(host[:rows], host, device=device), device)
            seconds, extrapolated = measured * pairs / (rows * na), True
        row = {"seconds": round(seconds, 3), "extrapolated": extrapolated, "pairs": pairs,
               "pairs_per_s": round(pairs / seconds)}
        if extrapolated:
            row["note"] = (f"extrapolated from {rows} rows x {na} clouds ({rows * na:,} pairs) "
                           f"in {measured:.2f} s to the {pairs:,} pairs of the symmetric matrix")
        out["torch_tiled"] = row
        print(f"torch tiled: {na} x {na} symmetric in {seconds:.1f} s{' (extrapolated)' if extrapolated else ''}: "
              f"{row['pairs_per_s']:,} pairs/s", flush=True)
        out["agreement_vs_torch"] = {"rows": rows}
        for mode, tuning in defaults.items():
            err = max_rel_error(kc.chamfer_matrix(a[:rows], a, tuning=tuning).cpu().numpy(), d[:rows])
            out["agreement_vs_torch"][mode] = {"max_rel_error": err}
            print(f"agreement {mode} vs torch (float64 products) on {rows} rows: max relative error {err:.2e}",
                  flush=True)
            if mode in out.get("fused", {}):
                speedup = seconds / out["fused"][mode]["seconds"]
                out["fused"][mode]["speedup_vs_torch"] = round(speedup, 1)
                print(f"speed-up {mode} vs torch tiled: {speedup:.1f}x", flush=True)

    def sweep() -> None:
        sub = a[:args.sweep_clouds]
        k = len(sub)
        rows, t_end = [], time.perf_counter() + args.sweep_seconds
        out["sweep"] = {"clouds": k, "rows": rows}
        lists = [[(mode, *c) for c in (SMOKE_SWEEP if args.smoke else SWEEP[mode])] for mode in args.modes]
        turns = [c for group in itertools.zip_longest(*lists) for c in group if c is not None]
        for mode, bm, bn, warps, stages in turns:
            if time.perf_counter() > t_end:
                out["sweep"]["stopped"] = "time budget spent"
                break
            tuning = kc.Tuning(mode=mode, block_m=bm, block_n=bn, warps=warps, stages=stages)
            row = asdict(tuning)
            try:
                timed(lambda: kc.chamfer_matrix(sub[:2], tuning=tuning), device)  # compile
                seconds, _ = timed(lambda: kc.chamfer_matrix(sub, tuning=tuning), device)
                row.update(seconds=round(seconds, 4), directed_pairs_per_s=round(k * k / seconds))
                print(f"sweep {mode} BM={bm} BN={bn} warps={warps} stages={stages}: "
                      f"{row['directed_pairs_per_s']:,} directed pairs/s", flush=True)
            except Exception as e:  # noqa: BLE001 - a config that does not compile or run is a result
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(f"sweep {mode} BM={bm} BN={bn} warps={warps} stages={stages}: FAILED {row['error']}",
                      flush=True)
            rows.append(row)
            save()
        ok = [r for r in rows if "error" not in r]
        if not ok:
            return
        best = max(ok, key=lambda r: r["directed_pairs_per_s"])
        out["sweep"]["best"] = best
        tuning = kc.Tuning(**{f: best[f] for f in asdict(kc.Tuning())})
        print(f"sweep best: {asdict(tuning)}", flush=True)
        if tuning != defaults.get(tuning.mode) or tuning.mode not in out.get("fused", {}):
            row = fused_full(a, tuning, args.max_seconds, device)
            out["fused_best"] = row
            print(f"fused best ({tuning.mode}): {args.clouds} x {args.clouds} symmetric in {row['seconds']:.2f} s"
                  f"{' (extrapolated)' if row['extrapolated'] else ''}: {row['pairs_per_s']:,} pairs/s", flush=True)

    section("check", check)
    section("fused", fused)
    section("torch", torch_path)
    if args.sweep_seconds > 0:
        section("sweep", sweep)
    times = [r["seconds"] for r in [*out.get("fused", {}).values(), out.get("fused_best", {})] if "seconds" in r]
    if times:
        out["best_fused_s"] = min(times)
        out["target_met"] = min(times) < TARGET_S and not args.smoke
        print(f"target ({args.clouds} x {args.clouds} under {TARGET_S:.0f} s): best fused {min(times):.2f} s"
              f"{'' if not args.smoke else ' (smoke: interpreter, not a timing)'}", flush=True)
    save()
    print(f"wrote {path}", flush=True)
    return 1 if out.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
