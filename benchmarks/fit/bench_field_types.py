"""Fitting throughput of every field type in the batched engine, side by side in one run.

    .venv/bin/python benchmarks/fit/bench_field_types.py [--device cpu|cuda] [--batch-size 16]
        [--points 2048] [--steps 30] [--warmup 5] [--rank 20] [--repeats 1]

Fits the same B analytic shapes (bench_fit.py's spheres and tori) with BatchedFitter for each of
mlp, mlp-asym (preset small), lora, lora-asym, mlora, mlora-asym (rank --rank on the small modulated
base) and deepsdf_latent (the small DeepSDF decoder), and reports shape-steps/s and the ratio to the
plain MLP. Throughput does not depend on how well a base was trained, so the bases here are fresh
(untrained) networks saved as checkpoints; --base / --deepsdf take trained checkpoint folders instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_fit import analytic_shape, machine, sync  # noqa: E402

from raywsl.base.autodecoder import AutoDecoder, AutoDecoderSettings  # noqa: E402
from raywsl.models.bases import make_base  # noqa: E402
from raywsl.config import FitConfig  # noqa: E402
from raywsl.fit.engine import BatchedFitter, ShapeData, keep_freed_memory  # noqa: E402
from raywsl.models.fields import make_field  # noqa: E402


def fresh_checkpoint(model: str, preset: str, folder: str) -> str:
    net = make_base(model, preset)
    AutoDecoder(net, lambda net, x, z: net.decode(x, z), 4, net.config["latent"], AutoDecoderSettings()).save(folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--points", type=int, default=2048, help="SDF samples per shape per step")
    ap.add_argument("--steps", type=int, default=30, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--lr", type=float, default=1e-3, help="fitting learning rate (exp schedule to 1e-5)")
    ap.add_argument("--rank", type=int, default=20, help="LoRA rank per layer (20: ~10k parameters, as mlp small)")
    ap.add_argument("--base", default="", help="a modulated base checkpoint folder (default: a fresh small one)")
    ap.add_argument("--deepsdf", default="", help="a DeepSDF checkpoint folder (default: a fresh small one)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per type, the fastest kept")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    tmp = tempfile.mkdtemp(prefix="bench-field-types-")
    base = args.base or fresh_checkpoint("modulated", "small", os.path.join(tmp, "base"))
    deepsdf = args.deepsdf or fresh_checkpoint("deepsdf", "small", os.path.join(tmp, "deepsdf"))
    variants = {
        "mlp": ("mlp", "small", {}), "mlp-asym": ("mlp", "small", {"asym": True}),
        "lora": ("lora", "default", {"base": base, "rank": args.rank}),
        "lora-asym": ("lora", "default", {"base": base, "rank": args.rank, "asym": True}),
        "mlora": ("mlora", "default", {"base": base, "rank": args.rank}),
        "mlora-asym": ("mlora", "default", {"base": base, "rank": args.rank, "asym": True}),
        "deepsdf_latent": ("deepsdf_latent", "default", {"base": deepsdf}),
    }
    total = args.warmup + args.steps
    cfg = FitConfig(steps=total, batch_size=args.batch_size, points_per_step=args.points, check_every=total,
                    lr=args.lr, device=args.device)
    data = [analytic_shape(i, 20_000, 0) for i in range(args.batch_size)]
    print(f"# field types in the engine: {machine(args)}, "
          f"B={args.batch_size}, K={args.points}, {args.steps} timed steps after {args.warmup}")
    print("| field | trainable params | shape-steps/s | vs mlp |")
    print("|---|---:|---:|---:|")
    reference = None
    for name, (kind, preset, options) in variants.items():
        field = make_field(kind, preset, **options)
        init = field.init_rows(1, torch.Generator().manual_seed(0))[0]
        shapes = [ShapeData(i, sid, p, s, init) for i, (sid, p, s) in enumerate(data)]

        def run() -> float:
            fitter = BatchedFitter(field, cfg, args.device)
            step, calls, clock = fitter._step_fn, [0], {}

            def timed_step() -> None:
                if calls[0] == args.warmup:
                    sync(args.device)
                    clock["start"] = time.perf_counter()
                calls[0] += 1
                step()

            fitter._step_fn = timed_step
            results = list(fitter.fit(shapes))
            sync(args.device)
            seconds = time.perf_counter() - clock["start"]
            # every shape must run every step in one attempt, or the batch was not full all along
            bad = [r for r in results if not r.ok or r.steps != total or r.restarts]
            if bad or calls[0] != total:
                raise RuntimeError(f"{name}: {len(bad)} shapes failed, restarted or stopped early "
                                   f"(e.g. {bad[0].shape_id}: {bad[0].reason or bad[0].steps}); lower --lr")
            return len(shapes) * args.steps / seconds

        rate = max(run() for _ in range(max(1, args.repeats)))  # the fastest run: the cores may be shared
        reference = reference or rate
        print(f"| {name} | {field.layout.size:,} | {rate:,.0f} | {rate / reference:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
