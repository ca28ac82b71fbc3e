"""Row-store bookkeeping alone, from 10^3 to 10^6 rows: is the cost per shard flat?

    .venv/bin/python benchmarks/store/bench_bookkeeping.py                       # 10^3 .. 10^6 rows
    .venv/bin/python benchmarks/store/bench_bookkeeping.py --sizes 1000 10000 --shard-size 64

Each row is one float32 (`x`), so what is timed is the store's own work: creating the store (ids,
sources and categories written by the driver), committing every shard (`write_shard`: x, status,
reason, marker; one row in 400 fails with a reason), `pending_shards()` (one listing of the
markers), `status()` of the whole store, `shard_done(k)` (a sample of shards), `summary()`, planning
a Ray Data read (`RowStoreDatasource(...).get_read_tasks`: one task per shard) and running a sample
of the read tasks in this process (no Ray). Whole-store operations are divided by the number of
shards: a flat column is a cost linear in the store (O(1) per shard); a growing one is quadratic.
The stores are written under --dir (local disk) and deleted afterwards (--keep keeps them).
Times are wall clock; the same table in CPU time of this process follows (zarr works in threads; CPU
time is what other processes on a shared machine disturb least).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import time

import numpy as np

from raywsl.store.datasource import RowStoreDatasource
from raywsl.store.rows import DONE, FAILED, ArraySpec, RowStore


CPU: dict[str, float] = {}  # CPU seconds of the last run of each timed step


def timed(f, name: str | None = None):
    t0, c0 = time.perf_counter(), time.process_time()
    out = f()
    if name:
        CPU[name] = time.process_time() - c0
    return time.perf_counter() - t0, out


def run(n: int, shard: int, folder: str, read_tasks: int, sample: int, keep: bool) -> dict:
    path = os.path.join(folder, f"rows{n}-shard{shard}.zarr")
    shutil.rmtree(path, ignore_errors=True)
    categories = ["airplane", "chair", "table", "lamp", "sofa", "car", "mug", "bench"]
    ids = [f"{categories[i % 8]}-{i:07d}" for i in range(n)]
    sources = [f"/data/ModelNet40/{categories[i % 8]}/train/{i:07d}.off" for i in range(n)]
    out = {"rows": n, "shards": -(-n // shard)}
    out["create"], _ = timed(lambda: RowStore.create(
        path, kind="samples", ids=ids, sources=sources, categories=[categories[i % 8] for i in range(n)],
        shard_size=shard, arrays=[ArraySpec("x", ())], fingerprint="bench"), "create")
    store = RowStore.open(path, mode="r+")  # a worker opens the store once, then writes its shards

    def commit_all():
        for k in range(store.n_shards):
            rows = store.shard_rows(k)
            m = rows.stop - rows.start
            status = np.full(m, DONE, np.int8)
            reason = [""] * m
            if rows.start % 400 < m:  # one row in 400 fails
                status[0], reason[0] = FAILED, f"{sources[rows.start]}: mesh is not watertight"
            store.write_shard(k, {"x": np.arange(rows.start, rows.stop, dtype=np.float32)}, status, reason)
    out["commit"], _ = timed(commit_all, "commit")

    store = RowStore.open(path)  # the driver
    runs = [(timed(store.pending_shards, "pending"), CPU["pending"]) for _ in range(3)]  # the best of 3
    (out["pending"], pending), CPU["pending"] = min(t for t, _ in runs), min(c for _, c in runs)
    assert pending == [], pending[:5]
    out["status"], status = timed(store.status, "status")
    assert (status != 0).all() and (status == FAILED).sum() == len(range(0, n, 400))
    ks = random.Random(0).sample(range(store.n_shards), min(sample, store.n_shards))
    t, done = timed(lambda: [store.shard_done(k) for k in ks], "shard_done")
    assert all(done)
    out["shard_done"] = t / len(ks)
    out["summary"], summary = timed(store.summary, "summary")
    assert summary["failed"] == len(range(0, n, 400)) and summary["shards"]["done"] == store.n_shards
    out["plan"], tasks = timed(lambda: RowStoreDatasource(path, ["x"]).get_read_tasks(1), "plan")
    assert len(tasks) == store.n_shards
    chosen = random.Random(1).sample(tasks, min(read_tasks, len(tasks)))
    t, blocks = timed(lambda: [b for task in chosen for b in task()], "read_task")
    assert sum(b.num_rows for b in blocks) == sum(task.metadata.num_rows for task in chosen)
    out["read_task"] = t / len(chosen)
    out["cpu"] = {**CPU, "shard_done": CPU["shard_done"] / len(ks), "read_task": CPU["read_task"] / len(chosen)}
    if not keep:
        shutil.rmtree(path, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    ap.add_argument("--shard-size", type=int, default=8)
    ap.add_argument("--read-tasks", type=int, default=200, help="read tasks run per size")
    ap.add_argument("--shard-done-sample", type=int, default=2000, help="shards whose marker is tested")
    ap.add_argument("--dir", default="/work/scratch/store/bookkeeping")
    ap.add_argument("--keep", action="store_true", help="keep the stores")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    results = []
    for n in args.sizes:
        t0 = time.perf_counter()
        r = run(n, args.shard_size, args.dir, args.read_tasks, args.shard_done_sample, args.keep)
        results.append(r)
        print(f"{n:>9,} rows: {time.perf_counter() - t0:.1f} s in all; " +
              ", ".join(f"{k} {v:.3g}" for k, v in r.items() if k not in ("rows", "shards", "cpu")), flush=True)

    us = 1e6
    for title, get in (("wall clock", lambda r, k: r[k]), ("CPU time of this process", lambda r, k: r["cpu"][k])):
        print(f"\nShards of {args.shard_size} rows, {title}: microseconds per shard (whole-store operations "
              f"divided by the number of shards; shard_done and a read task per call).\n")
        print("| rows | shards | create | commit (write_shard) | pending_shards() | status() | shard_done(k) "
              "| summary() | plan read tasks | run a read task |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in results:
            s = r["shards"]
            print(f"| {r['rows']:,} | {s:,} | {get(r, 'create') / s * us:,.1f} | {get(r, 'commit') / s * us:,.0f} | "
                  f"{get(r, 'pending') / s * us:,.2f} | {get(r, 'status') / s * us:,.1f} | "
                  f"{get(r, 'shard_done') * us:,.1f} | {get(r, 'summary') / s * us:,.1f} | "
                  f"{get(r, 'plan') / s * us:,.1f} | {get(r, 'read_task') * us:,.0f} |")
    print("\nTotals, wall clock, seconds:")
    print("\n| rows | create s | commit all s | pending_shards() s | status() s | summary() s | plan s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['rows']:,} | {r['create']:.2f} | {r['commit']:.1f} | {r['pending']:.3f} | {r['status']:.2f} | "
              f"{r['summary']:.2f} | {r['plan']:.2f} |")


if __name__ == "__main__":
    main()
