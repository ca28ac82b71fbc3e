"""Ingest and fit end to end at two dataset sizes: is the cost per shape flat, and the driver's memory bounded?

    .venv/bin/python benchmarks/scale/bench_e2e.py [--sizes 2000,20000] [--dir /work/scratch/e2e]

For each size N: a procedural corpus of N shapes (written once, not timed), then `raywsl ingest` and
`raywsl fit` of it, each in a fresh process (as a user runs them), with a tiny field and small point
counts so that the figure is the job's own overhead per shape (Ray Data blocks, store bookkeeping,
the driver's loops), not the SDF or the fitting. Reported per command: wall seconds, seconds per
shape, the marginal seconds per shape between the two sizes (which cancels Ray's start-up), and the
driver process's peak resident memory (ru_maxrss; Ray's workers are other processes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

INGEST = ["ingest.points=256", "ingest.surface_points=64"]
FIT = ["field.type=mlp", "field.preset=tiny", "fit.steps=20", "fit.points_per_step=256", "fit.check_every=10",
       "fit.batch_size=64", "fit.recon_count=0"]

# Runs one raywsl command in this child process and prints its exit code and peak memory as JSON.
CHILD = """
import json, resource, sys, time
from raywsl.cli import main
t0 = time.perf_counter()
code = main(sys.argv[1:])
print(json.dumps({"code": code, "seconds": time.perf_counter() - t0,
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        sys.exit(f"raywsl {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["code"] != 0:
        sys.exit(f"raywsl {' '.join(args)} exited {out['code']}:\n{proc.stderr[-3000:]}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="2000,20000", help="dataset sizes (2000,20000)")
    ap.add_argument("--dir", default="/work/scratch/e2e", help="working folder (corpora and run folders)")
    ap.add_argument("--resolution", type=int, default=32, help="corpus mesh resolution (32)")
    args = ap.parse_args()
    from raywsl.data.corpus import write_corpus

    root = Path(args.dir)
    results = {}
    for n in [int(s) for s in args.sizes.split(",")]:
        corpus = root / f"corpus{n}"
        if not (corpus / "manifest.csv").exists():
            t0 = time.perf_counter()
            write_corpus(corpus, n, seed=0, resolution=args.resolution, progress=False)
            print(f"corpus of {n}: {time.perf_counter() - t0:.0f} s", flush=True)
        run_dir = root / f"n{n}" / "run"  # its cache: n{n}/cache (contract.default_cache_dir)
        subprocess.run(["rm", "-rf", str(run_dir.parent)], check=True)
        common = [f"data.source={corpus / 'manifest.csv'}", f"run.dir={run_dir}", *INGEST]
        results[n] = {"ingest": run(["ingest", *common]), "fit": run(["fit", *common, *FIT])}
        for stage, r in results[n].items():
            print(f"N={n} {stage}: {r['seconds']:.1f} s, {r['seconds'] / n * 1e3:.2f} ms/shape, "
                  f"driver peak {r['maxrss_mb']:.0f} MB", flush=True)
        subprocess.run(["du", "-sh", str(run_dir.parent / "cache")], check=False)

    sizes = sorted(results)
    print("\n| stage | N | wall s | ms per shape | driver peak MB |\n|---|---|---|---|---|")
    for stage in ("ingest", "fit"):
        for n in sizes:
            r = results[n][stage]
            print(f"| {stage} | {n:,} | {r['seconds']:.1f} | {r['seconds'] / n * 1e3:.2f} | {r['maxrss_mb']:.0f} |")
    if len(sizes) >= 2:
        a, b = sizes[0], sizes[-1]
        for stage in ("ingest", "fit"):
            marginal = (results[b][stage]["seconds"] - results[a][stage]["seconds"]) / (b - a)
            print(f"{stage}: marginal {marginal * 1e3:.2f} ms/shape between N={a:,} and N={b:,} "
                  f"(vs {results[a][stage]['seconds'] / a * 1e3:.2f} ms/shape at N={a:,} incl. start-up)")
    print(f"\ncommand: {' '.join(sys.argv)}; {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
