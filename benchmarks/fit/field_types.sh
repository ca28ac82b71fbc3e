#!/usr/bin/env bash
# Reconstruction quality per parameterisation at about equal trainable-parameter budgets (the LoRA
# paper's Table 1, CPU-sized), then the weight-space probes of each weight store (its Table 4) and the
# small-data study's weight statistics (its Table 2): 128 procedural shapes, 20% held out (~100 fitted,
# ~9 per category). The base is trained once and shared by lora and mlora (one artifact in the cache).
#   bash benchmarks/fit/field_types.sh [WORK=/tmp/raywsl-field-types]
# Prints the table rows; every run folder keeps metrics.json and probe/probe.json.
# CPU-sized: ~50 min on 2 cores.
set -euo pipefail
WORK=${1:-/tmp/raywsl-field-types}
B=.venv/bin
mkdir -p "$WORK"
QS="-c configs/quickstart.yaml cache.dir=runs/cache data.source=corpus:128 ingest.test_fraction=0.2 data.shapes=0"
BASE="base.preset=small base.steps=1500 base.checkpoint_every=500 base.stages=[[0.5,16,1024],[0.5,8,4096]]"
FIT="fit.steps=400 fit.points_per_step=2048 fit.batch_size=32 fit.shard_size=32 fit.recon_count=32 fit.recon_resolution=64"
s=$(date +%s)
$B/raywsl ingest $QS run.dir="$WORK/base" > "$WORK/ingest.log" 2>&1
$B/raywsl train-base $QS run.dir="$WORK/base" $BASE > "$WORK/base.log" 2>&1
echo "ingest + train-base: $(( $(date +%s) - s )) s"
run_type() {  # name, overrides...
    local name=$1; shift
    local t=$(date +%s)
    $B/raywsl fit $QS run.dir="$WORK/$name" $FIT $BASE "$@" > "$WORK/$name.log" 2>&1
    $B/raywsl probe $QS run.dir="$WORK/$name" $FIT $BASE "$@" --seeds 10 > "$WORK/$name.probe.log" 2>&1 || true
    $B/python benchmarks/fit/field_types_row.py "$WORK/$name" "$name" "$(( $(date +%s) - t ))"
}
$B/python benchmarks/fit/field_types_row.py --header
run_type mlp field.type=mlp field.preset=small
run_type fourier field.type=fourier field.preset=small
run_type fourier-asym field.type=fourier field.preset=small field.asym=true
run_type lora field.type=lora field.preset=default field.rank=20
run_type lora-asym field.type=lora field.preset=default field.rank=20 field.asym=true
run_type mlora field.type=mlora field.preset=default field.rank=20
run_type mlora-asym field.type=mlora field.preset=default field.rank=20 field.asym=true
# the small-data study's decoder, warm-started from one anchor shape (its Table 2 statistics)
run_type decoder54k-warm field.type=mlp field.preset=decoder54k fit.init=warm
# ... with the study's own fitting schedule from the anchor (lr 1e-4, cosine decay)
run_type decoder54k-warm-lr1e-4 field.type=mlp field.preset=decoder54k fit.init=warm fit.lr=1e-4 \
    fit.schedule=cosine fit.lr_end=0
echo
$B/python benchmarks/fit/field_types_row.py --probes "$WORK" mlp fourier fourier-asym lora lora-asym mlora mlora-asym \
    decoder54k-warm decoder54k-warm-lr1e-4
