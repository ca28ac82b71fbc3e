#!/usr/bin/env bash
# The topology probes (issue 18) per parameterisation on the procedural corpus, CPU-sized:
#   bash benchmarks/probes/topology.sh [runs/probes]        then: .venv/bin/python benchmarks/probes/table.py runs/probes
# One corpus of 48 blobs, brackets and pebbles (6 held out; shared ingest in <dir>/cache); for mlp, mlora, mlora-asym and
# deepsdf_latent: fit (train-base first where needed), train-encoder, then
#   probe phase                      the study's protocol: Fibonacci sphere -> noisy sphere through the encoder
#                                    (also through an encoder trained on even samplings only; EVEN_ONLY=1: just that)
#   probe phase --space weights      linear in weight space from a blob to pebbles (1 -> 3 components)
#   probe subspace (weights, condition) on the brackets.
# Each run's figures land in <dir>/<name>/probe/{phase,subspace}-<space>/ and its MLflow run.
set -euo pipefail
DIR=${1:-runs/probes}
RAYWSL=${RAYWSL:-.venv/bin/raywsl}
COMMON=(data.source=corpus:48:blob,bracket,pebbles data.shapes=0 ingest.points=20000 ingest.surface_points=2048
        ingest.shard_size=4 ingest.test_fraction=0.15 fit.recon_count=0 "cache.dir=$DIR/cache")
PHASE=(--steps ${PHASE_STEPS:-31} --seeds ${SEEDS:-3} --resolution ${RESOLUTION:-40})
SUBSPACE=(--category bracket --dims 2,4,8 --radii 0.5,1,2 --samples ${SAMPLES:-6} --paths 3 --path-steps 5
          --resolution ${RESOLUTION:-40})
declare -A CONFIGS=(
  [mlp]="configs/quickstart.yaml"
  [mlora]="configs/quickstart_mlora_asym.yaml field.asym=false"
  [mlora-asym]="configs/quickstart_mlora_asym.yaml"
  [deepsdf_latent]="configs/quickstart_deepsdf_latent.yaml"
)
for name in ${NAMES:-mlp mlora mlora-asym deepsdf_latent}; do
  read -r config extra <<<"${CONFIGS[$name]}"
  args=(-c "$config" ${extra:-} "run.dir=$DIR/$name" "${COMMON[@]}")
  echo "=== $name: $(date +%T)"
  # The study's path again through an encoder trained on even samplings only (encoder.uneven=0; the
  # default trains half its steps on uneven subsets, which teaches it to ignore unevenness).
  "$RAYWSL" probe phase "${args[@]}" encoder.uneven=0 "${PHASE[@]}" --sigma 1.0
  rm -rf "$DIR/$name/probe/phase-cloud-even-encoder-sigma1"
  mv "$DIR/$name/probe/phase-cloud" "$DIR/$name/probe/phase-cloud-even-encoder-sigma1"
  "$RAYWSL" probe phase "${args[@]}" encoder.uneven=0 "${PHASE[@]}"
  rm -rf "$DIR/$name/probe/phase-cloud-even-encoder"
  mv "$DIR/$name/probe/phase-cloud" "$DIR/$name/probe/phase-cloud-even-encoder"
  [ -n "${EVEN_ONLY:-}" ] && continue
  "$RAYWSL" train-encoder "${args[@]}"
  "$RAYWSL" probe phase "${args[@]}" "${PHASE[@]}" --sigma 1.0     # much more uneven: kept as phase-cloud-sigma1/
  rm -rf "$DIR/$name/probe/phase-cloud-sigma1" && mv "$DIR/$name/probe/phase-cloud" "$DIR/$name/probe/phase-cloud-sigma1"
  "$RAYWSL" probe phase "${args[@]}" "${PHASE[@]}"                 # the defaults (sigma 0.3)
  "$RAYWSL" probe phase "${args[@]}" "${PHASE[@]}" --space weights --from blob --to pebbles
  "$RAYWSL" probe subspace "${args[@]}" "${SUBSPACE[@]}" --space weights
  "$RAYWSL" probe subspace "${args[@]}" "${SUBSPACE[@]}" --space condition
done
echo "=== done: $(date +%T)"
