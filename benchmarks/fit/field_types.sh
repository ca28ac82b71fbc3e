#!/usr/bin/env bash
# Reconstruction quality per field type at about equal trainable-parameter budgets (issue 6's table),
# on the quickstart corpus (its 32 training shapes): train the base once, then fit every type on the same samples;
# deepsdf_latent (a 32-d latent of a shared decoder) trains its own decoder with the same budget.
#   bash benchmarks/fit/field_types.sh [WORK=/tmp/raywsl-field-types]
# The quickstart's samples (shared through the cache runs/cache: made by `make quickstart`, else here).
# CPU-sized: ~10 min on 2 cores. The lora and mlora runs share one trained base (one artifact).
set -euo pipefail
WORK=${1:-/tmp/raywsl-field-types}
B=.venv/bin
rm -rf "$WORK" && mkdir -p "$WORK"
QS="-c configs/quickstart.yaml cache.dir=runs/cache"
s=$(date +%s)
$B/raywsl ingest $QS run.dir="$WORK/samples" > "$WORK/ingest.log" 2>&1
BASE="base.preset=small base.steps=1500 base.checkpoint_every=500 base.stages=[[0.5,16,1024],[0.5,8,4096]]"
$B/raywsl train-base $QS run.dir="$WORK/base" $BASE > "$WORK/base.log" 2>&1
echo "train-base: $(grep '  train-base' "$WORK/base.log") ($(( $(date +%s) - s )) s)"
FIT="fit.steps=400 fit.points_per_step=2048 fit.batch_size=16 fit.shard_size=16 fit.recon_count=32 fit.recon_resolution=64"
run_type() {  # name, overrides...
    local name=$1; shift
    local t=$(date +%s)
    $B/raywsl fit $QS run.dir="$WORK/$name" $FIT $BASE "$@" > "$WORK/$name.log" 2>&1
    $B/python - "$WORK/$name" "$name" "$(( $(date +%s) - t ))" <<'PY'
import json, sys
from raywsl.store.weights import open_weights
run, name, seconds = sys.argv[1:]
m = json.load(open(f"{run}/metrics.json"))
params = open_weights(f"{run}/weights.zarr").attrs["params"]
print(f"| {name} | {params:,} | {m['recon_cd_median']:.5f} | {m['recon_cd_mean']:.5f} | {m['recon_iou_mean']:.3f} | "
      f"{m['fit_loss_median']:.4f} | {seconds} |")
PY
}
echo "| field | trainable params | recon CD median | recon CD mean | IoU mean | fit loss median | fit s |"
echo "|---|---:|---:|---:|---:|---:|---:|"
run_type mlp field.type=mlp field.preset=small
run_type mlp-asym field.type=mlp field.preset=small field.asym=true
run_type lora field.type=lora field.preset=default field.rank=20
run_type lora-asym field.type=lora field.preset=default field.rank=20 field.asym=true
run_type mlora field.type=mlora field.preset=default field.rank=20
run_type mlora-asym field.type=mlora field.preset=default field.rank=20 field.asym=true
# DeepSDF: `raywsl fit` trains its decoder first (same base.* budget), rows are the trained latents refined
run_type deepsdf_latent field.type=deepsdf_latent field.preset=default fit.init=trained fit.loss=clamped_l1 \
    fit.lr=5e-3 fit.steps=200 base.loss=clamped_l1 base.latent_reg=1e-5
