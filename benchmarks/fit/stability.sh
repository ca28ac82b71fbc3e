#!/usr/bin/env bash
# The weight-space stability experiment (papers/004, Figure 3) on the quickstart corpus: every field
# variant fits the first N shapes from i1 and from sqrt(1-l^2) i1 + l i2; cosine of the two fits and
# the Chamfer of the midpoint's mesh (the linear-mode-connectivity barrier) per variant and l.
#   bash benchmarks/fit/stability.sh [WORK=/tmp/raywsl-stability] [SHAPES=8]
# The quickstart's samples (the cache runs/cache: made by `make quickstart`, else here); trains the base
# (lora, mlora) first. Writes $WORK/run/stability/{stability.md,stability.json,stability.png}.
# CPU-sized: ~25 min on 2 cores.
set -euo pipefail
WORK=${1:-/tmp/raywsl-stability}
SHAPES=${2:-8}
B=.venv/bin
QS="-c configs/quickstart.yaml cache.dir=runs/cache"
$B/raywsl ingest $QS run.dir="$WORK/run" > /dev/null 2>&1
s=$(date +%s)
$B/raywsl stability $QS --shapes "$SHAPES" --lambdas 0,0.25,0.5,0.75,1 \
    --variants mlp,mlp-asym,lora,lora-asym,mlora,mlora-asym run.dir="$WORK/run" \
    field.preset=small field.rank=20 fit.steps=400 fit.points_per_step=2048 fit.batch_size=32 \
    fit.recon_resolution=64 base.preset=small base.steps=1500 base.checkpoint_every=500 \
    "base.stages=[[0.5,16,1024],[0.5,8,4096]]"
echo "stability: $(( $(date +%s) - s )) s"
