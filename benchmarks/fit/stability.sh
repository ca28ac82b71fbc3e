#!/usr/bin/env bash
# The weight-space stability experiment (papers/004 §4.2, Figure 3) on the procedural corpus: every
# variant fits the first N training shapes (the paper: 30) from ι1 and from μ + sqrt(1-λ²)(ι1-μ) + λ(ι2-μ)
# (every entry drawn); cosine of the two fits and the Chamfer of the midpoint's mesh (the
# linear-mode-connectivity barrier) per variant and λ. The paper's six representations at ~10k
# parameters: fourier (its standalone MLP, `small`), lora and mlora at rank 20 on the `small` base.
#   bash benchmarks/fit/stability.sh [WORK=/tmp/raywsl-stability] [SHAPES=30]
# Uses the samples and base of benchmarks/fit/field_types.sh (shared through the cache runs/cache;
# made here when missing). Writes $WORK/run/stability/{stability.md,stability.json,stability.png}.
# CPU-sized: ~35 min on 2 cores.
set -euo pipefail
WORK=${1:-/tmp/raywsl-stability}
SHAPES=${2:-30}
B=.venv/bin
QS="cache.dir=runs/cache data.source=corpus:128 ingest.test_fraction=0.2 data.shapes=0"
$B/raywsl ingest -c configs/quickstart.yaml $QS run.dir="$WORK/run" > /dev/null 2>&1
s=$(date +%s)
$B/raywsl stability -c configs/quickstart.yaml --shapes "$SHAPES" --lambdas 0.25,0.5,0.75,1 \
    --variants fourier,fourier-asym,lora,lora-asym,mlora,mlora-asym $QS run.dir="$WORK/run" \
    field.preset=small field.rank=20 fit.steps=400 fit.points_per_step=2048 fit.batch_size=32 \
    fit.recon_resolution=64 base.preset=small base.steps=1500 base.checkpoint_every=500 \
    "base.stages=[[0.5,16,1024],[0.5,8,4096]]"
echo "stability: $(( $(date +%s) - s )) s"
