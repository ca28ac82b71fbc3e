#!/usr/bin/env bash
# Thousands of shapes on a laptop CPU: corpus -> ingest -> fit with each init strategy, timed.
#   bash benchmarks/fit/scale_cpu.sh [N=2000] [WORK=/tmp/raywsl-scale]
# Small settings (the `tiny` field, 200 steps of 1,024 points) so the whole run takes ~12 min on 2 cores.
set -euo pipefail
N=${1:-2000}
WORK=${2:-/tmp/raywsl-scale}
B=.venv/bin
mkdir -p "$WORK"
t0=$(date +%s)
$B/raywsl corpus "$WORK/corpus" --n "$N" --seed 0 > "$WORK/corpus.log" 2>&1
t1=$(date +%s); echo "corpus: $N shapes in $((t1 - t0)) s"
# one config of the samples for every run folder: they share the ingested store ($WORK/cache)
DATA="data.source=$WORK/corpus/manifest.csv ingest.points=8192 ingest.surface_points=1024 ingest.shard_size=16"
$B/raywsl ingest run.dir="$WORK/run" $DATA > "$WORK/ingest.log" 2>&1
t2=$(date +%s); echo "ingest: $(grep '  ingest ' "$WORK/ingest.log") in $((t2 - t1)) s"
for init in shared random warm; do
    s=$(date +%s)
    $B/raywsl fit run.dir="$WORK/run-$init" $DATA field.preset=tiny fit.init=$init fit.steps=200 \
        fit.points_per_step=1024 fit.batch_size=16 fit.shard_size=64 fit.recon_count=16 \
        fit.recon_resolution=64 > "$WORK/fit-$init.log" 2>&1
    e=$(date +%s); echo "fit $init: $(grep '  fit ' "$WORK/fit-$init.log") in $((e - s)) s"
done
$B/python - "$WORK" <<'PY'
import sys
from raywsl.eval.weights import cosine_stats
from raywsl.store.weights import open_weights, weights_summary
for init in ("shared", "random", "warm"):
    store = open_weights(f"{sys.argv[1]}/run-{init}/weights.zarr")
    c = cosine_stats(store.group["weights"][:])
    print(f"{init}: loss median {weights_summary(store)['loss_median']:.4f}, "
          f"mean pairwise cosine {c['mean']:.3f} (std {c['std']:.3f})")
PY
