#!/usr/bin/env bash
# Generation metrics of each preset at a small scale (2-core CPU): configs/hyperdiffusion.yaml shrunk,
# configs/quickstart_mlora_asym.yaml and configs/quickstart_deepsdf_latent.yaml on 32 shapes, a
# ~10k-parameter row (MLP small, mLoRA rank 20 on the small base; DeepSDF: a 32-d latent), a tiny DiT
# trained 1,200 steps with x0 prediction, 16 samples, metrics against the held-out split.
#   bash benchmarks/diffusion/presets.sh [WORK=/tmp/raywsl-presets]      (~25 min)
set -euo pipefail
WORK=${1:-/tmp/raywsl-presets}
B=.venv/bin
mkdir -p "$WORK"
SMALL="data.source=corpus:32 data.shapes=0 ingest.test_fraction=0.2 ingest.points=20000 ingest.surface_points=2048 ingest.shard_size=4
  fit.steps=400 fit.points_per_step=2048 fit.batch_size=16 fit.shard_size=16 fit.device=cpu fit.recon_count=8
  fit.recon_resolution=64 diffusion.model=tiny diffusion.prediction=x0 diffusion.token_size=0 train.steps=1200
  train.batch_size=32 train.lr=1e-3 train.checkpoint_every=400 sample.count=16 sample.resolution=64
  scaling.use_gpu=false eval.distances=[cd,emd] eval.emd_eps=0.01"
BASE="base.preset=small base.steps=1500 base.use_gpu=false base.workers=2 base.checkpoint_every=500
  base.stages=[[0.5,16,1024],[0.5,8,4096]]"
run_preset() {  # name, config, extra overrides...
    local name=$1 config=$2; shift 2
    local t=$(date +%s)
    $B/raywsl run -c "$config" run.dir="$WORK/$name" $SMALL "$@" > "$WORK/$name.log" 2>&1
    $B/python - "$WORK/$name" "$name" "$(( $(date +%s) - t ))" <<'PY'
import json, sys
run, name, seconds = sys.argv[1:]
m = json.load(open(f"{run}/metrics.json"))
print(f"| {name} | {m['recon_cd_median']:.4f} | {m['mmd_cd']:.4f} | {100 * m['cov_cd']:.0f} | {100 * m['1nna_cd']:.0f} | "
      f"{m['mmd_emd']:.3f} | {100 * m['cov_emd']:.0f} | {100 * m['1nna_emd']:.0f} | {m['valid_share']:.2f} | "
      f"{m['weights_distinct_nearest']} | {m['weights_attractor_share']:.2f} | {seconds} |")
PY
}
echo "| preset (small) | recon CD | MMD-CD | COV-CD % | 1-NNA-CD % | MMD-EMD | COV-EMD % | 1-NNA-EMD % | valid | distinct nearest | attractor share | s |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
run_preset hyperdiffusion configs/hyperdiffusion.yaml field.preset=small
run_preset mlora_asym configs/quickstart_mlora_asym.yaml $BASE field.rank=20
run_preset deepsdf_latent configs/quickstart_deepsdf_latent.yaml
