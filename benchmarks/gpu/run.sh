#!/usr/bin/env bash
# Issue 17's GPU script: every GPU figure and every CUDA code path of raywsl in one run of < 8 minutes
# on one GPU, results under $OUT. Prepare on the CPU side first: bash benchmarks/gpu/prepare.sh
# (the packages the device image lacks, as .whl/site.tar.xz). benchmarks/gpu/README.md has the device call.
#   OUT=/some/dir bash benchmarks/gpu/run.sh            on the GPU machine (OUT defaults to runs/gpu)
#   OUT=/some/dir bash benchmarks/gpu/run.sh --cpu-smoke    here, ~1 min: the plumbing; the denoiser and paths
#       steps in their CPU forms (a few steps; configs validated), fit and chamfer skipped unless SMOKE_BENCHES=1
#
# Steps, each with its own time limit; a failed or timed-out step is recorded and the next one runs:
#   0 setup      unpack .whl/site.tar.xz to /tmp/site (PYTHONPATH), import checks, nvidia-smi / torch facts
#   1 fit        benchmarks/gpu/bench_fit.py      fitting throughput, every path (FIT_SECONDS, default 100)
#   2 chamfer    benchmarks/gpu/bench_chamfer.py  fused vs tiled-torch Chamfer matrix (CHAMFER_ARGS)
#   3 denoiser   benchmarks/gpu/bench_denoiser.py denoiser training rows/s (DENOISER_SECONDS, default 30)
#   4 paths      benchmarks/gpu/cuda_paths.py     the quickstart with scaling.use_gpu=true, fit tf32 / triton,
#                                                 train-base on a GPU (PATHS_SECONDS, default 200)
# STEPS="0 4" runs only those. TOTAL_SECONDS (default 470) caps the whole: a step's limit is cut to what
# is left, keeping 20 s for the summary.
#
# $OUT gets at most 8 files, none deeper than $OUT/file (the device tool returns 8 files, 2 folders deep):
#   summary.md   the step table, each step's own tables, failures with the end of their output
#   results.json every step's status and seconds, the environment, and the four JSON results merged
#   fit.json chamfer.json denoiser.json paths.json   each step's own results
#   steps.log    every step's full output, in order
#   runs.tar.gz  the CUDA paths' run folders (config, stages, metrics, logs) and Ray's error logs
set -u -o pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
SMOKE=0
for arg in "$@"; do
    case $arg in
        --cpu-smoke) SMOKE=1 ;;
        *) echo "run.sh: unknown argument $arg (known: --cpu-smoke)" >&2; exit 2 ;;
    esac
done
OUT=${OUT:-$ROOT/runs/gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=${GPU_WORK:-/tmp/raywsl-gpu}      # run folders, cache, per-step logs: big, never under $OUT
SITE=${GPU_SITE:-$([[ $SMOKE == 1 ]] && echo "$WORK/site" || echo /tmp/site)}  # where .whl/site.tar.xz goes
rm -rf "$WORK"
mkdir -p "$WORK/steps"
LOG=$OUT/steps.log
: > "$LOG"
START=$(date +%s)
TOTAL_SECONDS=${TOTAL_SECONDS:-$([[ $SMOKE == 1 ]] && echo 1200 || echo 470)}  # the CPU smoke is slower
STEPS=${STEPS:-0 1 2 3 4}
PY=${PYTHON:-python3}
if [[ $SMOKE == 1 && -z ${PYTHON:-} && -x $ROOT/.venv/bin/python ]]; then PY=$ROOT/.venv/bin/python; fi
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg RAY_USAGE_STATS_ENABLED=0 TORCHINDUCTOR_CACHE_DIR=$WORK/inductor
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

note() { echo "[run.sh $(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# step NAME LIMIT COMMAND...: run it under `timeout` (its whole process group), output to $WORK/steps/NAME.log
# and steps.log; status to $WORK/steps/NAME.json. The limit is cut to what TOTAL_SECONDS leaves.
step() {
    local name=$1 limit=$2; shift 2
    local left=$(( TOTAL_SECONDS - 20 - ($(date +%s) - START) ))
    (( limit > left )) && limit=$left
    if (( limit < 10 )); then
        record "$name" "skipped: no time left" "" 0 0
        return
    fi
    note "step $name (limit ${limit}s): $*"
    local t0 rc status
    t0=$(date +%s%N)
    timeout --kill-after=15 "$limit" "$@" > "$WORK/steps/$name.log" 2>&1
    rc=$?
    cat "$WORK/steps/$name.log" >> "$LOG"
    case $rc in
        0) status=ok ;;
        124|137) status=timeout ;;
        *) status=failed ;;
    esac
    record "$name" "$status" "$rc" "$limit" "$(( ($(date +%s%N) - t0) / 1000000 ))"
    note "step $name: $status (exit $rc)"
}

record() {  # name status rc limit milliseconds
    "$PY" - "$WORK/steps/$1.json" "$@" <<'PY' || echo "{\"step\": \"$1\", \"status\": \"$2\"}" > "$WORK/steps/$1.json"
import json, sys
path, name, status, rc, limit, ms = sys.argv[1:]
json.dump({"step": name, "status": status, "rc": int(rc) if rc else None, "limit_s": int(limit),
           "seconds": round(int(ms) / 1000, 1)}, open(path, "w"))
PY
    [[ $2 == skipped* ]] && note "step $1: $2"
}

want() { [[ " $STEPS " == *" $1 "* ]]; }

# ---------------------------------------------------------------- 0: setup (in this shell: it exports)
if want 0; then
    note "step setup"
    t0=$(date +%s%N)
    status=ok
    PY312=$("$PY" -c "import sys; print(int(sys.version_info[:2] == (3, 12)))")
    if [[ -f .whl/site.tar.xz ]]; then
        # the packages the image lacks, installed and pruned on the CPU side (prepare.sh); unpacking is all
        rm -rf "$SITE" && mkdir -p "$SITE"
        # tar -J needs the xz program; Python's tarfile (lzma) where the image has none
        if ! { timeout 120 tar -xJf .whl/site.tar.xz -C "$SITE" >> "$LOG" 2>&1 || timeout 180 "$PY" -c \
               "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='tar')" \
               .whl/site.tar.xz "$SITE" >> "$LOG" 2>&1; }; then
            status=failed
            note "could not unpack .whl/site.tar.xz"
        elif [[ $PY312 == 1 ]]; then
            export PYTHONPATH=$SITE:$PYTHONPATH PATH=$SITE/bin:$PATH
            note "unpacked .whl/site.tar.xz to $SITE ($(find "$SITE" -type f | wc -l) files): on PYTHONPATH"
        else  # its compiled modules are CPython 3.12's: here only the archive is checked
            note "unpacked .whl/site.tar.xz to $SITE ($(find "$SITE" -type f | wc -l) files); $PY is not 3.12:" \
                 "not used"
        fi
    elif compgen -G ".whl/*.whl" > /dev/null; then  # wheels carried as they are
        timeout 300 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" .whl/*.whl >> "$LOG" 2>&1 && export PYTHONPATH=$SITE:$PYTHONPATH \
            PATH=$SITE/bin:$PATH || status=failed
    else
        note "no .whl/site.tar.xz: using the Python packages installed here"
    fi
    # The facts and the import check: one Python, its output to setup.json and steps.log.
    timeout 120 "$PY" - "$WORK/steps/env.json" 2>&1 <<'PY' | tee -a "$WORK/steps/setup.log" >> "$LOG" || status=failed
import importlib, json, os, platform, subprocess, sys, time
env = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "python": sys.version.split()[0], "machine": platform.node(),
       "cpus": os.cpu_count(), "imports": {}}
try:
    q = "name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,clocks.sm,clocks.mem,power.limit,temperature.gpu"
    out = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=30)
    env["nvidia_smi"] = dict(zip(q.split(","), [v.strip() for v in out.stdout.strip().split(",")])) \
        if out.returncode == 0 else {"error": (out.stderr or out.stdout).strip()[-300:]}
except (OSError, subprocess.SubprocessError) as e:
    env["nvidia_smi"] = {"error": f"{type(e).__name__}: {e}"}
for name in ["torch", "triton", "numpy", "ray", "zarr", "numcodecs", "trimesh", "igl", "mlflow", "skimage", "scipy",
             "sklearn", "pandas", "pyarrow", "pydantic", "raywsl.cli"]:
    t0 = time.perf_counter()
    try:
        mod = importlib.import_module(name)
        env["imports"][name] = {"version": getattr(mod, "__version__", ""), "from": os.path.dirname(mod.__file__),
                                "seconds": round(time.perf_counter() - t0, 2)}
    except Exception as e:
        env["imports"][name] = {"error": f"{type(e).__name__}: {e}"}
try:
    import torch
    env["cuda"] = torch.cuda.is_available()
except ImportError:
    env["cuda"] = False
if env["cuda"]:
    p = torch.cuda.get_device_properties(0)
    env["device"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                     "memory_gib": round(p.total_memory / 2**30, 1), "torch_cuda": torch.version.cuda,
                     "nccl": ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else ""}
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(json.dumps(env, indent=2))
bad = [k for k, v in env["imports"].items() if "error" in v]
if bad:
    print(f"setup: cannot import {bad}", file=sys.stderr)
    sys.exit(1)
PY
    # Requirements of the carried packages that the image's versions do not meet (a warning: the run goes on).
    if [[ -d $SITE ]]; then
        timeout 60 "$PY" - "$SITE" 2>&1 <<'PY' | tee -a "$WORK/steps/setup.log" >> "$LOG"
import sys
from importlib.metadata import PathDistribution, PackageNotFoundError, version
from pathlib import Path
from packaging.requirements import Requirement
unmet = []
for info in Path(sys.argv[1]).glob("*.dist-info"):
    dist = PathDistribution(info)
    extras = ["default", "data", "train", "tune"] if dist.metadata["Name"] == "ray" else [""]
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in extras):
            continue
        try:
            have = version(req.name)
        except PackageNotFoundError:
            unmet.append(f"{dist.metadata['Name']}: {req} (missing)")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            unmet.append(f"{dist.metadata['Name']}: {req} (have {have})")
print("setup: requirements of the carried packages: " + ("all met" if not unmet else f"{len(unmet)} unmet"))
for line in unmet:
    print("  unmet:", line)
PY
    fi
    record setup "$status" "$([[ $status == ok ]] && echo 0 || echo 1)" 120 "$(( ($(date +%s%N) - t0) / 1000000 ))"
    note "step setup: $status"
fi
CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [[ $SMOKE == 0 && $CUDA == 0 ]]; then
    note "no CUDA device: the GPU steps will fail (run with --cpu-smoke to check the script on a CPU)"
fi
SMOKE_ARG=()
[[ $SMOKE == 1 ]] && SMOKE_ARG=(--smoke)

# ---------------------------------------------------------------- 1-4: the measurements
FIT_SECONDS=${FIT_SECONDS:-100}
DENOISER_SECONDS=${DENOISER_SECONDS:-30}
PATHS_SECONDS=${PATHS_SECONDS:-200}
read -r -a CHAMFER_EXTRA <<< "${CHAMFER_ARGS:---sweep-seconds 15 --torch-seconds 10 --max-seconds 30}"
missing_or_run() {  # NAME LIMIT SCRIPT ARGS...
    local name=$1 limit=$2 script=$3; shift 3
    if [[ ! -f $script ]]; then
        echo "$script is not in this checkout" > "$WORK/steps/$name.log"
        record "$name" "failed: $script missing" 1 0 0
        return
    fi
    step "$name" "$limit" "$PY" "$script" "$@"
}
if want 1; then
    if [[ $SMOKE == 1 && ${SMOKE_BENCHES:-0} == 0 ]]; then
        record fit "skipped: no CUDA (SMOKE_BENCHES=1 runs bench_fit.py --smoke)" "" 0 0
    elif [[ $SMOKE == 1 ]]; then
        missing_or_run fit 300 benchmarks/gpu/bench_fit.py --smoke --out "$OUT/fit.json"
    else
        missing_or_run fit $((FIT_SECONDS + 60)) benchmarks/gpu/bench_fit.py --seconds "$FIT_SECONDS" \
            --out "$OUT/fit.json"
    fi
fi
if want 2; then
    if [[ $SMOKE == 1 && ${SMOKE_BENCHES:-0} == 0 ]]; then
        record chamfer "skipped: no CUDA (SMOKE_BENCHES=1 runs bench_chamfer.py --smoke)" "" 0 0
    elif [[ $SMOKE == 1 ]]; then
        missing_or_run chamfer 300 benchmarks/gpu/bench_chamfer.py --smoke --out "$OUT/chamfer.json"
    else
        missing_or_run chamfer 90 benchmarks/gpu/bench_chamfer.py "${CHAMFER_EXTRA[@]}" --out "$OUT/chamfer.json"
    fi
fi
if want 3; then
    missing_or_run denoiser $((DENOISER_SECONDS + 45)) benchmarks/gpu/bench_denoiser.py \
        --seconds "$DENOISER_SECONDS" "${SMOKE_ARG[@]}" --out "$OUT/denoiser.json"
fi
if want 4; then
    # its paths run in sessions of their own, out of reach of `timeout`: its budget must end first
    left=$(( TOTAL_SECONDS - 20 - ($(date +%s) - START) - 30 ))
    (( PATHS_SECONDS > left )) && PATHS_SECONDS=$left
    missing_or_run paths $((PATHS_SECONDS + 30)) benchmarks/gpu/cuda_paths.py --budget "$PATHS_SECONDS" \
        --work "$WORK/paths" "${SMOKE_ARG[@]}" --out "$OUT/paths.json"
    if [[ $SMOKE == 0 ]]; then  # Ray daemons a killed path left behind (this machine is ours alone)
        timeout 30 "$PY" -m ray.scripts.scripts stop --force >> "$LOG" 2>&1 || true
    fi
fi

# ---------------------------------------------------------------- summary
note "summary"
if [[ -d $WORK/paths ]]; then  # the run folders' small files and Ray's error logs, one archive
    (cd "$WORK" && find paths -maxdepth 2 \( -name config.yaml -o -name stages.json -o -name metrics.json \
        -o -name logs \) -print0 > "$WORK/runs.list")
    if [[ $SMOKE == 0 ]]; then  # this machine's Ray sessions are the paths' own (not so on a shared CPU machine)
        find /tmp/ray -path '*/logs/*.err' -size +0 -print0 2>/dev/null >> "$WORK/runs.list"
    fi
    (cd "$WORK" && tar -czf runs.tar.gz --null -T runs.list 2>/dev/null)
    if (( $(stat -c %s "$WORK/runs.tar.gz" 2>/dev/null || echo 0) > 15 * 1024 * 1024 )); then
        note "runs.tar.gz over 15 MiB with Ray's logs: without them"
        (cd "$WORK" && find paths -maxdepth 2 \( -name config.yaml -o -name stages.json -o -name metrics.json \
            -o -name logs \) -print0 | tar -czf runs.tar.gz --null -T - 2>/dev/null)
    fi
    if [[ -f $WORK/runs.tar.gz ]] && (( $(stat -c %s "$WORK/runs.tar.gz") < 15 * 1024 * 1024 )); then
        mv "$WORK/runs.tar.gz" "$OUT/runs.tar.gz"
    fi
fi
timeout 60 "$PY" - "$OUT" "$WORK/steps" "$SMOKE" "$START" <<'PY' || note "summary failed"
import json, sys, time
from pathlib import Path
out, steps, smoke, start = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", float(sys.argv[4])
order = ["setup", "fit", "chamfer", "denoiser", "paths"]
records = {p.stem: json.loads(p.read_text()) for p in steps.glob("*.json") if p.stem != "env"}
env = json.loads((steps / "env.json").read_text()) if (steps / "env.json").exists() else {}
results = {"smoke": smoke, "wall_s": round(time.time() - start), "env": env,
           "steps": [records[n] for n in order if n in records]}
for name in ["fit", "chamfer", "denoiser", "paths"]:
    f = out / f"{name}.json"
    try:
        results[name] = json.loads(f.read_text()) if f.exists() else None
    except ValueError as e:
        results[name] = {"error": f"unreadable {f.name}: {e}"}
(out / "results.json").write_text(json.dumps(results, indent=2, default=str))

dev = env.get("nvidia_smi", {})
lines = [f"# GPU run{' (CPU smoke)' if smoke else ''}: {env.get('date', '?')}", "",
         f"- device: {dev.get('name', dev.get('error', '?'))}, driver {dev.get('driver_version', '?')}, "
         f"{dev.get('memory.total', '?')}, max clocks SM {dev.get('clocks.max.sm', '?')} / memory "
         f"{dev.get('clocks.max.mem', '?')}, power limit {dev.get('power.limit', '?')}",
         f"- python {env.get('python', '?')}, torch {env.get('imports', {}).get('torch', {}).get('version', '?')}, "
         f"triton {env.get('imports', {}).get('triton', {}).get('version', '?')}, ray "
         f"{env.get('imports', {}).get('ray', {}).get('version', '?')}, {env.get('cpus', '?')} CPUs, "
         f"CUDA {env.get('device', {}).get('torch_cuda', '-')}, NCCL {env.get('device', {}).get('nccl', '-')}",
         f"- whole script: {results['wall_s']} s", "", "| step | status | s | limit s |", "|---|---|---:|---:|"]
for r in results["steps"]:
    lines.append(f"| {r['step']} | {r['status']} | {r.get('seconds', '')} | {r.get('limit_s', '')} |")
for name in order:
    log = steps / f"{name}.log"
    if not log.exists():
        continue
    text = log.read_text(errors="replace").splitlines()
    table = [t for t in text if t.startswith("|") or t.startswith("# ")]
    if name == "setup":  # the import and requirement checks, not the facts (they are above)
        lines += ["", "## setup", "", "```", *[t for t in text if t.startswith(("setup:", "  unmet:"))], "```"]
    elif table:
        lines += ["", f"## {name}", "", *table]
    elif records.get(name, {}).get("status") == "ok":  # no markdown table printed: the end of its output
        lines += ["", f"## {name}", "", "```", *text[-30:], "```"]
    if records.get(name, {}).get("status") != "ok":
        lines += ["", f"### {name}: {records.get(name, {}).get('status', 'not run')}, the end of its output", "",
                  "```", *text[-25:], "```"]
paths = results.get("paths") or {}
for p in paths.get("paths", []) if isinstance(paths, dict) else []:
    if p.get("status") not in ("ok",) and p.get("tail"):
        lines += ["", f"### path {p['name']}: {p['status']}", "", "```", *p["tail"][-20:], "```"]
    if p.get("gpu_processes"):
        lines += ["", f"path {p['name']}: on the GPU: " + "; ".join(p["gpu_processes"])]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY

# At most 8 files come back: past 8, everything but the seven below goes into extras.tar.gz (runs.tar.gz too).
CORE="summary.md results.json fit.json chamfer.json denoiser.json paths.json steps.log"
if (( $(find "$OUT" -type f | wc -l) > 8 )); then
    extras=()
    while IFS= read -r -d '' f; do
        rel=${f#"$OUT"/}
        [[ " $CORE " == *" $rel "* ]] || extras+=("$rel")
    done < <(find "$OUT" -type f -print0)
    (cd "$OUT" && tar -czf "$WORK/extras.tar.gz" "${extras[@]}" && rm -f "${extras[@]}" \
        && find . -mindepth 1 -type d -empty -delete && mv "$WORK/extras.tar.gz" extras.tar.gz)
    note "packed ${#extras[@]} files into extras.tar.gz (8 files come back at most)"
fi
note "done in $(( $(date +%s) - START )) s: $OUT/summary.md"
