"""Fitting throughput: shape-steps/s of the sequential loop, a plain batched PyTorch loop and raywsl's engine.

    .venv/bin/python benchmarks/fit/bench_fit.py [--device auto|cpu|cuda] [--threads 2]
        [--fields decoder54k:8192,hyperdiffusion:2048] [--batch-sizes 1,4,16,64]
        [--steps 30] [--warmup 5] [--seq-shapes 4] [--samples 50000] [--check-every 0]
        [--precision fp32|bf16] [--compile] [--tf32] [--peak-tflops X] [--skip sequential,plain,engine]
        [--repeats 1] [--seed 0]

    The CPU defaults are sized for a few minutes on 2 cores (most of it decoder54k at B = 64).
    GPU (defaults become --batch-sizes 1,16,64,256,1024,4096 --steps 200 --warmup 10):
    .venv/bin/python benchmarks/fit/bench_fit.py --device cuda --peak-tflops 67 [--compile] [--tf32]

The headline figure is shape-steps/s: shapes x Adam steps per second (one step = one forward and
backward over `points` SDF samples per shape, and one optimiser update). Three paths fit the same
shapes from the same initial weights, with the same learning-rate schedule (exp, 1e-2 -> 1e-5 over
warmup + steps), L1 loss, and the same point windows (each shape's samples shuffled once by its
shape id; step t takes samples [t K, (t + 1) K), as raywsl.fit.engine does):

(a) sequential   `raywsl.fit.reference.fit_one`: one shape at a time, nn.Parameter +
                 torch.optim.Adam + LambdaLR, one `loss.item()` per step (today's per-shape loop).
                 It is slow, so only the first --seq-shapes shapes are fitted; its figures are per
                 shape-step and do not depend on B. One untimed call of --warmup steps first.
(b) plain batched  written here: B shapes' weights as stacked per-layer nn.Parameters (B, out, in),
                 the field's batched forward (baddbmm per layer), the loss summed over the per-shape
                 means (so each shape's gradient is its own), torch.optim.Adam(foreach=True) on the
                 stacked tensors with the same LambdaLR schedule; no continuous batching, no
                 per-step host sync. The first --warmup steps are untimed.
(c) engine       `raywsl.fit.engine.BatchedFitter`: one (B, P) row tensor, per-row Adam and schedule,
                 a host check every --check-every steps (loss to host, judge, refill slots). Timed
                 from step --warmup to the end of `fit()` (its checks and result copies included).

Each path runs exactly warmup + steps steps per shape; the timed shape-steps are B x steps for (b)
and (c), and seq-shapes x (warmup + steps) for (a) (after its untimed warm-up call). CUDA is
synchronised before every clock read. On CPU torch uses --threads threads. With --repeats R every
run is made R times and the fastest kept (the cores may be shared: the load average is printed).

FLOPs are counted analytically from the linear layers only (the positional encoding, ReLUs, loss
and Adam are left out, so the figure is a lower bound of the work done):

    FLOP per shape-step = 6 x K x sum over linear layers of (in x out)

(forward 2 K sum(in x out) multiply-adds; backward ~2x the forward: gradients of the activations
and of the weights). decoder54k: sum(in x out) = 39*128 + 3*128*128 + 128 = 54,272, so 2.67 GFLOP
per shape-step at K = 8,192; hyperdiffusion: 27*128 + 2*128*128 + 128 = 36,352, 0.45 GFLOP at
K = 2,048. TFLOP/s = shape-steps/s x FLOP per shape-step / 1e12; "% of peak" divides by
--peak-tflops (e.g. an H100 SXM: 67 fp32, 495 tf32/bf16 dense).

Accuracy: the final loss of a shape is its mean training loss over the last check interval (the
engine's FitResult.loss; `fit_one` and the plain loop report the same window), averaged over the
path's shapes; "max rel. dloss vs (a)" is the largest |loss / loss_sequential - 1| over the shapes
both fitted (the first min(B, seq-shapes)). Batched and sequential agree up to float32 rounding.

Shapes: analytic SDFs, no ingest needed. Shape i (seeded by --seed and i) is a sphere (even i) or a
torus (odd i) of random radii, offset and axis; --samples points each: 25 % near the surface
(sigma 0.01), 25 % near it (sigma 0.05), 50 % uniform in [-1, 1]^3, with exact signed distances.

On CPU, glibc hands each step's large activation buffers back to the OS and the next step faults
them in again (~1 GB of page faults per step for decoder54k at B = 16; a third of the CPU time in the
kernel). The engine turns that off for its process (`engine.keep_freed_memory`, glibc's mallopt);
being process-wide it would also speed up whichever path runs after the engine, so the benchmark
applies it once at the start for every path (--no-malloc-tuning measures the untuned process).

On a GPU a batch size that runs out of memory is reported as OOM, and larger batch sizes of that
path are skipped. Output: a markdown table per field, then one JSON line per row (for RESULTS.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from raywsl.config import FitConfig
from raywsl.fit.engine import (ADAM_BETAS, ADAM_EPS, SCHEDULES, BatchedFitter, ShapeData, keep_freed_memory,
                               shuffled)
from raywsl.models.losses import LOSSES
from raywsl.models.fields import Field, make_field
from raywsl.fit.reference import fit_one

CPU_BATCH_SIZES = "1,4,16,64"
GPU_BATCH_SIZES = "1,16,64,256,1024,4096"
PATHS = ("sequential", "plain batched", "engine")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="torch device (auto: cuda if present)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (2)")
    ap.add_argument("--fields", default="decoder54k:8192,hyperdiffusion:2048",
                    help="fields and points per step, [type/]preset:K,... (type mlp unless given, e.g. "
                         "fourier/shapenet:2048; default decoder54k:8192,hyperdiffusion:2048)")
    ap.add_argument("--batch-sizes", help=f"B values, comma-separated ({CPU_BATCH_SIZES} on CPU, "
                                          f"{GPU_BATCH_SIZES} on cuda)")
    ap.add_argument("--steps", type=int, help="timed steps per shape (30 on CPU, 200 on cuda)")
    ap.add_argument("--warmup", type=int, help="untimed steps first, in the same schedule (5 on CPU, 10 on cuda)")
    ap.add_argument("--seq-shapes", type=int, default=4, help="shapes fitted by the sequential loop (4)")
    ap.add_argument("--samples", type=int, default=50_000, help="SDF samples per shape (50000)")
    ap.add_argument("--check-every", type=int, default=0,
                    help="engine host-check interval (0: the largest divisor of warmup + steps up to 50)")
    ap.add_argument("--lr", type=float, default=1e-2, help="initial learning rate (1e-2; exp schedule to 1e-5)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                    help="fp32, or bf16 autocast for (b) and (c) on cuda (fp32)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the engine's step (fit.compile)")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on cuda, for every path")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="device peak TFLOP/s for '%% of peak' (none)")
    ap.add_argument("--skip", default="", help="paths to leave out, comma-separated: sequential,plain,engine")
    ap.add_argument("--repeats", type=int, default=1,
                    help="time each run this many times and keep the fastest (1; 3 on a shared machine)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the shapes and the initial weights (0)")
    ap.add_argument("--no-malloc-tuning", action="store_true",
                    help="leave glibc's malloc defaults (the engine otherwise tunes them in-process)")
    args = ap.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device == "cuda"
    args.batch_sizes = [int(b) for b in (args.batch_sizes or (GPU_BATCH_SIZES if gpu else CPU_BATCH_SIZES)).split(",")]
    args.steps = args.steps or (200 if gpu else 30)
    args.warmup = (10 if gpu else 5) if args.warmup is None else args.warmup
    total = args.warmup + args.steps
    args.check_every = args.check_every or max(d for d in range(1, min(50, total) + 1) if total % d == 0)
    args.fields = [(p.split(":")[0], int(p.split(":")[1])) for p in args.fields.split(",")]
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    return args


# ------------------------------------------------------------------------------------ shapes

def _directions(rng: np.random.Generator, n: int) -> np.ndarray:
    d = rng.normal(size=(n, 3))
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def analytic_shape(i: int, n: int, seed: int) -> tuple[str, np.ndarray, np.ndarray]:
    """(shape id, points (n, 3), sdf (n,)) of analytic shape i: a sphere (even i) or a torus (odd i)."""
    rng = np.random.default_rng([seed, i])
    center = rng.uniform(-0.15, 0.15, 3)
    rot = np.linalg.qr(rng.normal(size=(3, 3)))[0]  # a random orthonormal frame (the torus axis)
    n_near = n // 4
    if i % 2 == 0:
        r = rng.uniform(0.3, 0.75)
        surface = center + r * _directions(rng, 2 * n_near)

        def sdf(p):
            return np.linalg.norm(p - center, axis=1) - r
        name = f"sphere-{i:05d}"
    else:
        big, small = rng.uniform(0.4, 0.6), rng.uniform(0.1, 0.25)
        u, v = rng.uniform(0, 2 * np.pi, (2, 2 * n_near))
        local = np.stack([(big + small * np.cos(v)) * np.cos(u), (big + small * np.cos(v)) * np.sin(u),
                          small * np.sin(v)], axis=1)
        surface = center + local @ rot.T

        def sdf(p):
            q = (p - center) @ rot  # into the torus frame (axis z)
            return np.hypot(np.hypot(q[:, 0], q[:, 1]) - big, q[:, 2]) - small
        name = f"torus-{i:05d}"
    sigma = np.repeat([0.01, 0.05], [n_near, n_near])[:, None]
    points = np.concatenate([surface + sigma * rng.normal(size=surface.shape),
                             rng.uniform(-1, 1, (n - 2 * n_near, 3))]).astype(np.float32)
    return name, points, sdf(points.astype(np.float64)).astype(np.float32)


# ------------------------------------------------------------------------------------ timing helpers

def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def best_of(repeats: int, fn):
    """The fastest of `repeats` runs of fn() -> (seconds, shape-steps, losses)."""
    return min((fn() for _ in range(max(1, repeats))), key=lambda r: r[0])


def flops_per_shape_step(field: Field, k: int) -> float:
    """6 K sum(in x out) over the linear layers (every 2-D '*.weight' entry of the layout)."""
    macs = sum(math.prod(shape) for name, shape in field.layout.entries if name.endswith(".weight"))
    return 6.0 * k * macs


def schedule_factor(cfg: FitConfig):
    """LambdaLR's factor for 0-based step i, as reference.fit_one: schedule((i + 1) / steps)."""
    schedule, end = SCHEDULES[cfg.schedule], (cfg.lr_end / cfg.lr if cfg.lr > 0 else 1.0)
    return lambda i: float(schedule(torch.tensor(min((i + 1) / cfg.steps, 1.0)), end))


# ------------------------------------------------------------------------------------ the three paths

def run_sequential(field: Field, shapes: list[ShapeData], cfg: FitConfig, device: str, warmup: int):
    """(a): fit_one per shape. Returns (seconds, shape-steps, per-shape final losses)."""
    if warmup:
        fit_one(field, shapes[0], replace(cfg, steps=warmup, check_every=warmup), device)
    sync(device)
    t0 = time.perf_counter()
    results = [fit_one(field, s, cfg, device) for s in shapes]
    sync(device)
    return time.perf_counter() - t0, len(shapes) * cfg.steps, np.array([r.loss for r in results])


def run_plain(field: Field, shapes: list[ShapeData], cfg: FitConfig, device: str, warmup: int,
              autocast: bool):
    """(b): stacked per-layer parameters, torch.optim.Adam(foreach) and LambdaLR, one batch, no slots."""
    dev = torch.device(device)
    b, k = len(shapes), cfg.points_per_step
    arrays = [shuffled(s) for s in shapes]
    points = torch.from_numpy(np.stack([p for p, _ in arrays])).to(dev)  # (B, M, 3)
    sdf = torch.from_numpy(np.stack([d for _, d in arrays])).to(dev)  # (B, M)
    del arrays
    n_samples = sdf.shape[1]
    init = torch.stack([s.init for s in shapes]).to(dev, torch.float32)
    params = {name: torch.nn.Parameter(p.contiguous()) for name, p in field.layout.unflatten(init).items()}
    opt = torch.optim.Adam(params.values(), lr=cfg.lr, betas=ADAM_BETAS, eps=ADAM_EPS, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule_factor(cfg))
    loss_fn, window = LOSSES[cfg.loss], torch.arange(k, device=dev)
    tail = cfg.steps % cfg.check_every or cfg.check_every  # the engine's last check interval
    tail_sum = torch.zeros(b, device=dev)
    t0 = time.perf_counter()
    for t in range(cfg.steps):
        if t == warmup:
            sync(device)
            t0 = time.perf_counter()
        idx = (t * k + window) % n_samples
        x, y = points[:, idx], sdf[:, idx]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            pred = field.forward(params, x)
        per_shape = loss_fn(pred.float(), y, cfg.clamp).mean(1)  # (B,)
        opt.zero_grad(set_to_none=True)
        per_shape.sum().backward()
        opt.step()
        sched.step()
        if t >= cfg.steps - tail:
            tail_sum += per_shape.detach()
    sync(device)
    seconds = time.perf_counter() - t0
    return seconds, b * (cfg.steps - warmup), (tail_sum / tail).cpu().numpy()


def run_engine(field: Field, shapes: list[ShapeData], cfg: FitConfig, device: str, warmup: int):
    """(c): BatchedFitter.fit, timed from its step number `warmup` to the last result."""
    fitter = BatchedFitter(field, cfg, device)
    step, calls, clock = fitter._step_fn, [0], {}

    def timed_step() -> None:
        if calls[0] == warmup:
            sync(device)
            clock["start"] = time.perf_counter()
        calls[0] += 1
        step()

    fitter._step_fn = timed_step
    results = sorted(fitter.fit(shapes), key=lambda r: r.key)
    sync(device)
    seconds = time.perf_counter() - clock.get("start", time.perf_counter())
    bad = [r for r in results if not r.ok or r.steps != cfg.steps]
    if bad:
        print(f"  engine: {len(bad)} shape(s) failed or stopped early, e.g. {bad[0].shape_id}: "
              f"steps {bad[0].steps}, {bad[0].reason or 'no reason'}", file=sys.stderr)
    if calls[0] != cfg.steps:
        print(f"  engine: {calls[0]} step calls for {cfg.steps} steps (check_every {cfg.check_every} does not "
              f"divide them: the extra calls are timed)", file=sys.stderr)
    losses = np.array([r.loss if r.ok else np.nan for r in results])
    return seconds, len(shapes) * (cfg.steps - warmup), losses


# ------------------------------------------------------------------------------------ main

def machine(args) -> str:
    if args.device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if not args.no_malloc_tuning:
        keep_freed_memory()
    if args.device == "cuda" and args.tf32:
        torch.set_float32_matmul_precision("high")  # TF32 matmuls, as the fit engine does (no convolutions here)
    if args.compile:
        import torch._dynamo as dynamo

        # One compiled step per fitter (per field and B): raise dynamo's recompile limit (8) so the
        # later batch sizes are not silently run eagerly.
        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
    gpu = args.device == "cuda"
    autocast = gpu and args.precision == "bf16"
    total = args.warmup + args.steps
    print(f"Command: .venv/bin/python benchmarks/fit/bench_fit.py {shlex.join(sys.argv[1:])}".rstrip())
    print(f"Machine: {machine(args)}; load average {os.getloadavg()[0]:.2f}")
    print(f"Settings: device {args.device}, batch sizes {args.batch_sizes}, {args.warmup} warm-up + {args.steps} "
          f"timed steps, engine check_every {args.check_every}, {args.samples} samples per shape, lr {args.lr:g} "
          f"exp -> 1e-05, l1, precision {args.precision}{' (autocast)' if autocast else ''}, "
          f"compile {args.compile}, tf32 {args.tf32 and gpu}, sequential on {args.seq_shapes} shape(s)")
    if total % args.check_every:
        print(f"Note: check_every {args.check_every} does not divide {total} steps: the engine runs idle steps")

    t0 = time.perf_counter()
    n_shapes = max(args.batch_sizes + [args.seq_shapes])
    data = [analytic_shape(i, args.samples, args.seed) for i in range(n_shapes)]
    print(f"Shapes: {n_shapes} analytic spheres and tori, {args.samples} samples each "
          f"(made in {time.perf_counter() - t0:.1f} s)")
    json_rows = []
    for spec, k in args.fields:
        type_name, _, preset = spec.rpartition("/")
        field = make_field(type_name or "mlp", preset)
        flop = flops_per_shape_step(field, k)
        cfg = FitConfig(steps=total, points_per_step=k, lr=args.lr, check_every=args.check_every,
                        precision=args.precision, compile=args.compile, device=args.device)
        inits = field.init_rows(n_shapes, torch.Generator().manual_seed(args.seed))
        shapes = [ShapeData(i, name, p, d, inits[i]) for i, (name, p, d) in enumerate(data)]
        rows = []  # (path, B, shapes timed, seconds, shape-steps, losses | None, note)

        def record(path, b, n, result, note="", peak=None):
            seconds, shape_steps, losses = result
            rows.append(dict(path=path, B=b, shapes=n, seconds=seconds, shape_steps=shape_steps,
                             losses=losses, note=note, peak_gib=peak))

        seq = None
        if "sequential" not in args.skip:
            n = min(args.seq_shapes, n_shapes)
            seq = best_of(args.repeats, lambda: run_sequential(field, shapes[:n], cfg, args.device, args.warmup))
            record("(a) sequential", 1, n, seq)
        oom = set()
        for b in args.batch_sizes:
            for path, name, fn in (("plain", "(b) plain batched", lambda: run_plain(
                                        field, shapes[:b], replace(cfg, batch_size=b), args.device, args.warmup,
                                        autocast)),
                                   ("engine", "(c) engine", lambda: run_engine(
                                        field, shapes[:b], replace(cfg, batch_size=b), args.device,
                                        args.warmup))):
                if path in args.skip:
                    continue
                if path in oom:
                    record(name, b, b, (math.nan, 0, None), "skipped (OOM at a smaller B)")
                    continue
                if gpu:
                    torch.cuda.reset_peak_memory_stats()
                result, failed = None, None
                try:
                    result = best_of(args.repeats, fn)
                except RuntimeError as e:
                    if not is_oom(e):
                        raise
                    failed = f"OOM: {str(e).splitlines()[0][:80]}"
                free(args.device)  # outside the except block: the traceback no longer pins the tensors
                peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else None
                if failed:
                    oom.add(path)
                    record(name, b, b, (math.nan, 0, None), failed, peak)
                else:
                    record(name, b, b, result, "", peak)
                print(f"  {preset} B={b} {name}: " + (failed or f"{result[1] / result[0]:,.1f} shape-steps/s")
                      + f" (load average {os.getloadavg()[0]:.2f})",
                      file=sys.stderr, flush=True)

        seq_rate = seq[1] / seq[0] if seq else math.nan
        print(f"\n### {preset}: {field.layout.size:,} parameters, {k:,} points per step, "
              f"{flop / 1e9:.2f} GFLOP per shape-step\n")
        print("| path | B | shapes | timed steps | seconds | shape-steps/s | x (a) | TFLOP/s | % of peak "
              "| final loss | max rel. dloss vs (a) |" + (" peak GiB |" if gpu else ""))
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if gpu else ""))
        for r in rows:
            ok = r["shape_steps"] > 0
            rate = r["shape_steps"] / r["seconds"] if ok else math.nan
            tflops = rate * flop / 1e12
            losses = r["losses"]
            dloss = math.nan
            if ok and seq and not r["path"].startswith("(a)"):
                shared = min(len(seq[2]), len(losses))
                dloss = float(np.max(np.abs(losses[:shared] / seq[2][:shared] - 1)))
            final = float(np.mean(losses)) if ok else math.nan
            steps = total if r["path"].startswith("(a)") else args.steps
            peak_pct = 100 * tflops / args.peak_tflops if args.peak_tflops and ok else math.nan
            cells = [r["path"], r["B"], r["shapes"], steps,
                     f"{r['seconds']:.2f}" if ok else "-", f"{rate:,.1f}" if ok else r["note"],
                     f"{rate / seq_rate:.1f}x" if ok and seq else "-", f"{tflops:.3f}" if ok else "-",
                     f"{peak_pct:.1f}" if not math.isnan(peak_pct) else "-",
                     f"{final:.5f}" if ok else "-", f"{dloss:.1e}" if not math.isnan(dloss) else "-"]
            if gpu:
                cells.append(f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-")
            print("| " + " | ".join(str(c) for c in cells) + " |")
            json_rows.append({
                "bench": "fit", "field": preset, "params": field.layout.size, "points_per_step": k,
                "path": r["path"][4:], "B": r["B"], "shapes": r["shapes"], "timed_steps": steps,
                "seconds": round(r["seconds"], 4) if ok else None,
                "shape_steps_per_s": round(rate, 2) if ok else None,
                "x_sequential": round(rate / seq_rate, 2) if ok and seq else None,
                "tflops": round(tflops, 4) if ok else None,
                "peak_pct": round(peak_pct, 2) if not math.isnan(peak_pct) else None,
                "final_loss": round(final, 6) if ok else None,
                "max_rel_dloss_vs_seq": float(f"{dloss:.3g}") if not math.isnan(dloss) else None,
                "peak_gib": round(r["peak_gib"], 2) if r["peak_gib"] is not None else None,
                "note": r["note"] or None, "device": args.device,
                "threads": args.threads if not gpu else None, "precision": args.precision,
                "compile": bool(args.compile), "tf32": bool(args.tf32 and gpu),
                "warmup": args.warmup, "check_every": args.check_every, "samples": args.samples})
    print("\nJSON rows:\n")
    for j in json_rows:
        print(json.dumps(j))
    print(f"\nTotal {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
