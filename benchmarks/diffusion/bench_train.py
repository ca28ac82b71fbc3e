"""Denoiser training throughput under Ray Train: rows/s with 1 and 2 DDP workers, side by side.

    .venv/bin/python benchmarks/diffusion/bench_train.py [-c configs/quickstart.yaml] [--steps 300]
        [--batch-size 32] [--model tiny] [--workers 1,2] [--use-gpu]

Trains the denoiser on the weight store of the config (in the cache: run `make quickstart` first)
once per worker count from scratch, with the same global batch, into a temporary folder (nothing is
published), and reports the rows/s of the last checkpoint interval
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

from raywsl import cache
from raywsl.config import load_config
from raywsl.diffusion.train import train
from raywsl.stages import plan_for
from raywsl.store.rows import RowStore, StoreError


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-c", "--config", default="configs/quickstart.yaml")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--tokenizer", default="layer")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--use-gpu", action="store_true")
    args = ap.parse_args()
    rows = []
    for workers in [int(w) for w in args.workers.split(",")]:
        cfg = load_config(args.config, [f"train.steps={args.steps}", f"train.batch_size={args.batch_size}",
                                        f"train.checkpoint_every={args.steps // 3}", f"diffusion.model={args.model}",
                                        f"diffusion.tokenizer={args.tokenizer}", f"scaling.num_workers={workers}",
                                        f"scaling.use_gpu={str(args.use_gpu).lower()}", "mlflow.enabled=false"])
        plan = plan_for(cfg)
        try:
            RowStore.open(plan.weights)
        except StoreError:
            sys.exit(f"{args.config} has no fitted weight store in {plan.cache}: run `make quickstart` first")
        out = tempfile.mkdtemp(prefix="bench-train-")
        t0 = time.perf_counter()
        metrics = train(cfg, plan, out, restart=True)  # from scratch: the worker counts share one work folder
        rows.append((workers, metrics["rows_per_s"], time.perf_counter() - t0))
        shutil.rmtree(out, ignore_errors=True)
        cache.remove(cache.work_dir(plan["train"]))
    base = rows[0][1]
    print(f"# denoiser training: {args.model} DiT, {args.tokenizer} tokens, global batch {args.batch_size}, "
          f"{args.steps} steps, {os.cpu_count()} cores{' + GPUs' if args.use_gpu else ''}")
    print("| DDP workers | rows/s (steady) | vs 1 worker | wall s (whole call) |")
    print("|---:|---:|---:|---:|")
    for workers, rate, wall in rows:
        print(f"| {workers} | {rate:,.0f} | {rate / base:.2f}x | {wall:.0f} |")


if __name__ == "__main__":
    main()
