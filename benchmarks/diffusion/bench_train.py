"""Denoiser training throughput under Ray Train: rows/s with 1 and 2 DDP workers, side by side.

    .venv/bin/python benchmarks/diffusion/bench_train.py [RUN_DIR=runs/quickstart] [--steps 300]
        [--batch-size 32] [--model tiny] [--workers 1,2] [--use-gpu]

Trains `raywsl train` on RUN_DIR's weight store (a copy of it, in a temporary run folder) once per
worker count, with the same global batch, and reports the rows/s of the last checkpoint interval
(steady state: Ray start-up, dataset reads and the first steps excluded) and the wall time of the
whole call. On a 2-core CPU two gloo workers share the cores: the figure says what DDP costs there,
not what it gains on a cluster.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from raywsl import contract as C
from raywsl.config import load_config
from raywsl.diffusion.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", nargs="?", default="runs/quickstart")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--tokenizer", default="layer")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--use-gpu", action="store_true")
    args = ap.parse_args()
    if not os.path.exists(os.path.join(args.run_dir, C.WEIGHTS)):
        sys.exit(f"{args.run_dir} has no weight store: run `make quickstart` first")
    rows = []
    for workers in [int(w) for w in args.workers.split(",")]:
        tmp = tempfile.mkdtemp(prefix="bench-train-")
        for name in (C.SAMPLES, C.WEIGHTS):
            shutil.copytree(os.path.join(args.run_dir, name), os.path.join(tmp, name))
        cfg = load_config(None, [f"run.dir={tmp}", f"train.steps={args.steps}", f"train.batch_size={args.batch_size}",
                                 f"train.checkpoint_every={args.steps // 3}", f"diffusion.model={args.model}",
                                 f"diffusion.tokenizer={args.tokenizer}", f"scaling.num_workers={workers}",
                                 f"scaling.use_gpu={str(args.use_gpu).lower()}", "mlflow.enabled=false"])
        t0 = time.perf_counter()
        metrics = train(cfg)
        rows.append((workers, metrics["rows_per_s"], time.perf_counter() - t0))
        shutil.rmtree(tmp, ignore_errors=True)
    base = rows[0][1]
    print(f"# denoiser training: {args.model} DiT, {args.tokenizer} tokens, global batch {args.batch_size}, "
          f"{args.steps} steps, {os.cpu_count()} cores{' + GPUs' if args.use_gpu else ''}")
    print("| DDP workers | rows/s (steady) | vs 1 worker | wall s (whole call) |")
    print("|---:|---:|---:|---:|")
    for workers, rate, wall in rows:
        print(f"| {workers} | {rate:,.0f} | {rate / base:.2f}x | {wall:.0f} |")


if __name__ == "__main__":
    main()
