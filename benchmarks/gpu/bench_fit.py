"""Fitting throughput on one GPU, every path side by side in one run: the sequential loop, the engine's
batched bmm in TF32, bf16 autocast, bf16 + torch.compile, and the fused Triton kernel (TF32 and bf16),
with their final losses; then the fused kernel's block sizes, and a profile of its step.

    python benchmarks/gpu/bench_fit.py --out $OUT/fit.json [--seconds 240] [--batch 1024]
        [--fields decoder54k:8192,hyperdiffusion:2048] [--steps 40] [--warmup 10]
    python benchmarks/gpu/bench_fit.py --smoke      # CPU, Triton's interpreter, tiny sizes: the script runs

Every path fits the same B shapes (analytic spheres and tori, benchmarks/fit/bench_fit.py) from the
same initial rows with the same schedule and point windows for warmup + steps steps; shape-steps/s
counts the timed steps (after the warm-up). "final loss" is the mean over shapes of each shape's mean
training loss over its last check interval; "rel. dloss" compares it with the TF32 engine's on the
same shapes. The sequential loop (raywsl.fit.reference.fit_one) fits --seq-shapes shapes.

The time budget (--seconds) is checked between runs: a run that would start after it is skipped and
reported as such, so the script ends near the budget whatever the device. Results: one JSON file
(rows, the block-size sweep, the profile's top kernels), and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if __name__ == "__main__" and "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks" / "fit")]
from bench_fit import (analytic_shape, flops_per_shape_step, free, is_oom, run_engine,  # noqa: E402
                       run_sequential, sync)

from raywsl.config import FitConfig  # noqa: E402
from raywsl.fit.engine import ShapeData  # noqa: E402
from raywsl.models.fields import make_field  # noqa: E402

# (name, fit.precision, fit.compile, fit.kernel)
PATHS = [
    ("engine tf32 (bmm)", "tf32", False, "torch"),
    ("engine bf16", "bf16", False, "torch"),
    ("engine bf16 + compile", "bf16", True, "torch"),
    ("fused tf32", "tf32", False, "triton"),
    ("fused bf16", "bf16", False, "triton"),
]
TUNINGS = [(32, 4), (64, 4), (64, 8), (128, 8)]  # (block_points, warps) of the forward-backward kernel


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="", help="JSON file of the results (none: stdout only)")
    ap.add_argument("--seconds", type=float, default=240.0, help="time budget; later runs are skipped (240)")
    ap.add_argument("--fields", default="decoder54k:8192,hyperdiffusion:2048", help="preset:K,... (mlp fields)")
    ap.add_argument("--batch", type=int, default=1024, help="shapes fitted at once, B (1024)")
    ap.add_argument("--steps", type=int, default=40, help="timed steps (40)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps first (10)")
    ap.add_argument("--seq-shapes", type=int, default=2, help="shapes of the sequential loop (2)")
    ap.add_argument("--samples", type=int, default=50_000, help="SDF samples per shape (50000)")
    ap.add_argument("--smoke", action="store_true", help="CPU, interpreter, tiny sizes: check the script runs")
    args = ap.parse_args()
    if args.smoke:
        args.fields, args.batch, args.steps, args.warmup, args.samples = "tiny:64", 2, 4, 2, 512
        args.seq_shapes = 1
    args.fields = [(p.split(":")[0], int(p.split(":")[1])) for p in args.fields.split(",")]
    return args


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        sys.exit("bench_fit: no CUDA device (use --smoke to check the script on a CPU)")
    left = lambda: args.seconds - (time.perf_counter() - start)  # noqa: E731
    total = args.warmup + args.steps
    check_every = max(d for d in range(1, min(50, total) + 1) if total % d == 0)
    data = [analytic_shape(i, args.samples, 0) for i in range(args.batch)]
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "batch": args.batch,
           "steps": args.steps, "warmup": args.warmup, "samples": args.samples, "rows": [], "tuning": [],
           "profile": {}}

    def emit(row: dict) -> None:
        out["rows"].append(row)
        rate = row.get("shape_steps_per_s")
        print(f"  {row['field']} {row['path']}: " + (f"{rate:,.0f} shape-steps/s, final loss {row['final_loss']:.5f}"
                                                     if rate else row.get("note", "")), flush=True)

    for preset, k in args.fields:
        field = make_field("mlp", preset)
        flop = flops_per_shape_step(field, k)
        inits = field.init_rows(args.batch, torch.Generator().manual_seed(0))
        shapes = [ShapeData(i, name, p, d, inits[i]) for i, (name, p, d) in enumerate(data)]
        base = FitConfig(steps=total, batch_size=args.batch, points_per_step=k, check_every=check_every,
                         device=device)
        reference = None
        if left() > 0:
            seq = run_sequential(field, shapes[:args.seq_shapes], base, device, args.warmup)
            emit(dict(field=preset, path="sequential", B=1, shape_steps_per_s=seq[1] / seq[0],
                      final_loss=float(np.mean(seq[2])), seconds=seq[0]))
        for name, precision, compile_, kernel in PATHS:
            row = dict(field=preset, path=name, B=args.batch, points=k)
            if left() <= 0:
                emit({**row, "note": "skipped: time budget spent"})
                continue
            cfg = replace(base, precision=precision, compile=compile_, kernel=kernel)
            torch.set_float32_matmul_precision("highest")  # each fitter sets what its precision needs
            try:
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                seconds, shape_steps, losses = run_engine(field, shapes, cfg, device, args.warmup)
            except Exception as e:  # one failing path is reported; the others still run
                free(device)
                emit({**row, "note": ("OOM: " if is_oom(e) else "failed: ") + f"{type(e).__name__}: {e}"[:300]})
                continue
            rate = shape_steps / seconds
            if reference is None:
                reference = losses
            emit({**row, "shape_steps_per_s": rate, "tflops": rate * flop / 1e12, "seconds": seconds,
                  "final_loss": float(np.nanmean(losses)),
                  "max_rel_dloss_vs_tf32": float(np.nanmax(np.abs(losses / reference - 1))),
                  "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None})
            free(device)

    # Block sizes of the fused kernel: the gradient call alone, decoder-sized, bf16 and TF32.
    from raywsl.kernels.mlp import MLPSpec, Tuning, loss_and_grad

    preset, k = args.fields[0]
    field = make_field("mlp", preset)
    c = field.config
    rows = field.init_rows(args.batch, torch.Generator().manual_seed(0)).to(device)
    x = (torch.rand(args.batch, k, 3, device=device) * 2 - 1)
    y = x.norm(dim=2) - 0.5
    flop = flops_per_shape_step(field, k)
    for half in (True, False):
        spec = MLPSpec(c["bands"], c["hidden"], c["layers"], "l1", half=half)
        torch.set_float32_matmul_precision("high")
        for bm, warps in TUNINGS if not args.smoke else TUNINGS[:1]:
            entry = dict(field=preset, half=half, block_points=bm, warps=warps)
            if left() <= 0:
                out["tuning"].append({**entry, "note": "skipped: time budget spent"})
                continue
            tuning = Tuning(block_points=bm, warps=warps)
            try:
                loss_and_grad(rows, x, y, spec, tuning)
                sync(device)
                reps = 3 if args.smoke else 20
                t0 = time.perf_counter()
                for _ in range(reps):
                    loss_and_grad(rows, x, y, spec, tuning)
                sync(device)
                rate = reps * args.batch / (time.perf_counter() - t0)
                out["tuning"].append({**entry, "gradients_per_s": rate, "tflops": rate * flop / 1e12})
                print(f"  fused {preset} bf16={half} BM={bm} warps={warps}: {rate:,.0f} gradients/s "
                      f"({rate * flop / 1e12:.1f} TFLOP/s)", flush=True)
            except Exception as e:
                out["tuning"].append({**entry, "note": f"failed: {type(e).__name__}: {e}"[:300]})
                free(device)

    # Where a fused step's time goes: the top kernels of a few gradient calls.
    if left() > 0:
        spec = MLPSpec(c["bands"], c["hidden"], c["layers"], "l1", half=True)
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(3):
                loss_and_grad(rows, x, y, spec)
            sync(device)
        key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
        events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:12]
        out["profile"] = {"calls": 3, "batch": args.batch, "top": [
            {"name": e.key[:80], "us": getattr(e, key, 0), "count": e.count} for e in events]}
        print(prof.key_averages().table(sort_by=key, row_limit=12), flush=True)

    out["seconds"] = time.perf_counter() - start
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"bench_fit: {len(out['rows'])} rows, {out['seconds']:.0f} s" + (f" -> {args.out}" if args.out else ""))


if __name__ == "__main__":
    main()
