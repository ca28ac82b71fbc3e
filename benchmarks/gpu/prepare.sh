#!/usr/bin/env bash
# The CPU side of a GPU run (issue 17): the Python packages raywsl needs that the device image lacks,
# as one carried archive, .whl/site.tar.xz (the device has no network). Run it here before the device
# call; benchmarks/gpu/run.sh unpacks the archive to /tmp/site there.
#   bash benchmarks/gpu/prepare.sh            (~5 min the first time, mostly xz; seconds when up to date)
#
# Why an archive and not the wheels: the working tree that travels is capped at 64 MiB, and the wheels
# alone are 143 MB (Ray's is 79). So the wheels are installed here into build/gpu-site (pip --target
# for Python 3.12, x86-64, no dependencies: the set is resolved here), then pruned of what a Python-only
# single-node run never loads (Ray's Java jar, 32 MB; RLlib, ray.llm, the dashboard's source maps;
# MLflow's web UI; libigl's static libraries, headers and docs), their ELF binaries stripped of symbols,
# and packed with xz (about twice deflate's ratio on these binaries): ~44 MB in all.
#
# The set: every distribution that pip resolves for raywsl's runtime dependencies (pyproject.toml, with
# Ray's extras default, data, train, tune), at the versions this checkout's .venv runs (the tested
# ones), minus the packages the device image already has (IMAGE below, from the device notes' package
# list, read 2026-11-17) and minus torch / triton (the image's CUDA build). mesh-to-sdf stays behind:
# raywsl imports it only for the slow reference SDF backend (pyrender, OpenGL).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}   # a Python with pip; its installed versions pin the set
CACHE=$ROOT/build/gpu-wheels             # downloaded wheels (ignored, never travels)
SITE=$ROOT/build/gpu-site                # the installed and pruned set (ignored, never travels)
DEST=$ROOT/.whl                          # what travels: carry [".whl"]
LIMIT=$((64 * 1024 * 1024))
RECIPE=3  # bump when the pruning below changes: the archive is rebuilt
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}")
# pip, less the warnings this machine's pip configuration prints for each package its local indexes lack
pip() { "$PY" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

# The device image's Python packages (the device notes, KINDS.md, "Python packages already there").
IMAGE="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp"

mkdir -p "$CACHE" "$DEST" .git/info
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude  # never committed

# 1. The top-level requirements, pinned to this .venv's versions; every other version constrained likewise.
version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
RAY_VERSION=$(sed -n 's/^RAY_VERSION := //p' Makefile)
cat > "$CACHE/requirements.txt" <<EOF
ray[default,data,train,tune]==$RAY_VERSION
zarr==$(version zarr)
trimesh==$(version trimesh)
libigl==$(version libigl)
mlflow==$(version mlflow)
EOF
pip freeze --exclude-editable 2>/dev/null | grep -viE '^(torch|triton|raywsl)[=@ ]|^#|^-e ' \
    > "$CACHE/constraints.txt"

# 2. Resolve for the device's Python (3.12, x86-64) and keep what the image lacks.
pip install --quiet --dry-run --ignore-installed "${TARGET[@]}" --target "$CACHE/resolve" \
    -c "$CACHE/constraints.txt" -r "$CACHE/requirements.txt" --report "$CACHE/resolve.json"
IMAGE="$IMAGE" "$PY" - "$CACHE/resolve.json" > "$CACHE/carry.txt" <<'PY'
import json, os, re, sys
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
image = set(os.environ["IMAGE"].split())
for item in json.load(open(sys.argv[1]))["install"]:
    name, ver = item["metadata"]["name"], item["metadata"]["version"]
    if norm(name) not in image:
        print(f"{norm(name)}=={ver}")
PY
echo "prepare: $(wc -l < "$CACHE/carry.txt") distributions to carry (the rest of the resolved set is in the image)"

STAMP="recipe $RECIPE, set $(sort "$CACHE/carry.txt" | sha1sum | cut -c1-12)"
if [[ -f $DEST/site.tar.xz && -f $DEST/packages.txt && "$(head -1 "$DEST/packages.txt")" == "# $STAMP" ]]; then
    echo "prepare: $DEST/site.tar.xz is up to date"
else
    # 3. Download, install for 3.12 into SITE (no bytecode: the device's 3.12 writes its own), prune, strip.
    pip download --quiet --no-deps "${TARGET[@]}" -d "$CACHE" -r "$CACHE/carry.txt"
    rm -rf "$SITE"
    wheels=()
    while read -r spec; do
        name=${spec%%==*} ver=${spec##*==}
        # a wheel file's name spells the project with underscores, any case
        wheel=$(ls "$CACHE" | grep -iE "^${name//-/[-_.]}-${ver//./\\.}-.*\.whl$" | head -1 || true)
        [[ -n $wheel ]] || { echo "prepare: no wheel for $spec in $CACHE" >&2; exit 1; }
        wheels+=("$CACHE/$wheel")
    done < "$CACHE/carry.txt"
    pip install --quiet --no-deps --no-index --no-compile "${TARGET[@]}" --target "$SITE" "${wheels[@]}"
    (cd "$SITE"
     rm -rf ray/jars ray/rllib ray/llm mlflow/server/js lib64 include share
     find ray/dashboard -name '*.map' -delete
     find . -type f \( -name '*.so' -o -name '*.so.*' \) -exec strip --strip-unneeded {} + \
         || echo "prepare: strip could not read some libraries (kept as they were)"
     strip ray/core/src/ray/gcs/gcs_server ray/core/src/ray/raylet/raylet
     # console scripts: pip wrote this machine's interpreter into them; the device's is python3 on PATH
     for f in bin/*; do
         if head -c 2 "$f" | grep -q '#!'; then sed -i '1s|^#!.*python.*$|#!/usr/bin/env python3|' "$f"; fi
     done)
    rm -f "$DEST"/*.whl "$DEST/site.tar.xz.tmp"
    echo "prepare: packing $(du -sh "$SITE" | cut -f1) with xz -9 (a few minutes on 2 cores)"
    tar -C "$SITE" -cf - . | xz -9 -T0 > "$DEST/site.tar.xz.tmp"
    mv "$DEST/site.tar.xz.tmp" "$DEST/site.tar.xz"
    { echo "# $STAMP"; cat "$CACHE/carry.txt"; } > "$DEST/packages.txt"
fi

# 4. Every requirement of a carried distribution (Python 3.12 on Linux; Ray with its four extras) is met
#    by another carried one or by a package of the image (its version there is not known here).
IMAGE="$IMAGE" "$PY" - "$SITE" <<'PY'
import os, re, sys
from importlib.metadata import PathDistribution
from pathlib import Path
from packaging.requirements import Requirement
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
image = set(os.environ["IMAGE"].split())
dists = {norm(d.metadata["Name"]): d for d in (PathDistribution(p) for p in Path(sys.argv[1]).glob("*.dist-info"))}
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "os_name": "posix"}
missing, checked = [], 0
for name, dist in sorted(dists.items()):
    extras = ["default", "data", "train", "tune"] if name == "ray" else []
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker and not any(req.marker.evaluate({**env, "extra": e}) for e in extras or [""]):
            continue
        checked += 1
        dep = norm(req.name)
        if dep in dists:
            if req.specifier and not req.specifier.contains(dists[dep].version, prereleases=True):
                missing.append(f"{name} needs {req}, carried {dists[dep].version}")
        elif dep not in image:
            missing.append(f"{name} needs {req}: neither carried nor in the image")
print(f"prepare: {len(dists)} distributions carried, {checked} requirements checked, "
      f"{'all met' if not missing else f'{len(missing)} unmet'}")
for line in missing:
    print(f"  unmet: {line}")
sys.exit(1 if missing else 0)
PY

# 5. The sizes: what travels is the working tree (tracked + untracked-not-ignored files) plus .whl.
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
carried=$(du -sb "$DEST" | cut -f1)
total=$((tree + carried))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "prepare: .whl $(mib "$carried") + working tree $(mib "$tree") = $(mib "$total") of the 64 MiB that may travel"
if (( total > LIMIT )); then
    echo "prepare: over the limit: the device call would be refused" >&2
    exit 1
fi
