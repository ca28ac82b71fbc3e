"""raywsl's CUDA code paths, each run once through the CLI on one GPU and reported ok or failed.

    python benchmarks/gpu/cuda_paths.py --out runs/gpu/paths.json --work /tmp/raywsl-gpu [--budget 200]
        [--only quickstart,fit-tf32,...]
    python benchmarks/gpu/cuda_paths.py --smoke --out /tmp/paths.json --work /tmp/paths     (no GPU: configs only)

Paths, in this order (a later one reuses the earlier ones' corpus and samples through the shared cache):
    quickstart   `raywsl run -c configs/quickstart.yaml scaling.use_gpu=true` with fit.device=cuda,
                 fit.precision=bf16, fit.compile=true, eval.device=cuda, eval.distances=[cd,emd]: bf16
                 autocast and torch.compile in the fitting engine on CUDA, one GPU per fitting actor, Ray
                 Train on a GPU (NCCL backend, one worker), sample, recon and eval as GPU tasks
    fit-tf32     `raywsl fit` with fit.precision=tf32 (TF32 matmuls), no compile
    fit-triton   `raywsl fit` with fit.kernel=triton (the fused Triton step), fp32
    train-base   `raywsl train-base -c configs/quickstart_deepsdf_latent.yaml` on a GPU (Ray Train, NCCL),
                 300 steps
Extra overrides for a path: the environment variable GPU_PATH_<NAME>, NAME upper-cased with - as _
(GPU_PATH_QUICKSTART="train.steps=400").

Each path runs in its own process group with its own time limit, cut to what is left of --budget; one
that fails or times out never stops the next (a path with under 20 s left is skipped, and says so).
For each: ok / failed / timeout / skipped, exit code, seconds, the last lines of its output, its run
folder's stages (computed or reused, seconds) and metrics, and the processes seen on the GPU while it
ran (NVML, polled every 0.5 s: Ray names its workers, e.g. ray::_FitActor), the evidence that the
work ran on the GPU and not quietly on the CPU. --smoke (no GPU) only checks that every path's config
loads and validates.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

QUICKSTART = "configs/quickstart.yaml"
DEEPSDF = "configs/quickstart_deepsdf_latent.yaml"
GPU = ["scaling.use_gpu=true"]
# The DeepSDF quickstart on the quickstart's samples: its `raywsl ingest` then reuses the quickstart's
# artifact (train-base refuses to start without one) instead of making another corpus.
SAME_SAMPLES = ["data.source=corpus:64", "data.shapes=32", "ingest.test_fraction=0.33"]


def paths(work: Path) -> list[dict]:
    """The paths: name, raywsl commands (argv lists, config overrides included; run one after the other),
    time limit (s, all its commands together), what it exercises."""
    def shared(name: str) -> list[str]:
        return [f"run.dir={work / name}", f"cache.dir={work / 'cache'}"]

    return [
        {"name": "quickstart", "limit": 170,
         "argvs": [["run", "-c", QUICKSTART, *GPU, "fit.device=cuda", "fit.precision=bf16", "fit.compile=true",
                  "eval.device=cuda", "eval.distances=[cd,emd]", *shared("quickstart")]],
         "exercises": "fit bf16 autocast + torch.compile on CUDA, one GPU per fitting actor, Ray Train (NCCL, "
                      "1 GPU worker), sample / recon / eval (cd, emd) as GPU tasks"},
        {"name": "fit-tf32", "limit": 60,
         "argvs": [["fit", "-c", QUICKSTART, *GPU, "fit.device=cuda", "fit.precision=tf32", *shared("fit-tf32")]],
         "exercises": "fit with TF32 matmuls on CUDA (no compile)"},
        {"name": "fit-triton", "limit": 60,
         "argvs": [["fit", "-c", QUICKSTART, *GPU, "fit.device=cuda", "fit.kernel=triton", "fit.precision=fp32",
                   *shared("fit-triton")]],
         "exercises": "fit with the fused Triton kernel (fit.kernel=triton), fp32"},
        {"name": "train-base", "limit": 120,
         "argvs": [[verb, "-c", DEEPSDF, *SAME_SAMPLES, *GPU, "base.workers=1", "base.steps=300",
                    "base.checkpoint_every=100", *shared("train-base")] for verb in ("ingest", "train-base")],
         "exercises": "train-base (DeepSDF auto-decoder) under Ray Train on a GPU (NCCL)"},
    ]


def extra_overrides(name: str) -> list[str]:
    return shlex.split(os.environ.get("GPU_PATH_" + name.upper().replace("-", "_"), ""))


class GpuProcesses:
    """The processes NVML sees on GPU 0 while it runs: {pid: command line} (Ray's workers name themselves)."""

    def __init__(self, interval: float = 0.5):
        self.seen: dict[int, str] = {}
        self.error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(interval,), daemon=True)

    def __enter__(self) -> "GpuProcesses":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _poll(self, interval: float) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            while not self._stop.is_set():
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if p.pid not in self.seen:
                        self.seen[p.pid] = _cmdline(p.pid)
                self._stop.wait(interval)
            pynvml.nvmlShutdown()
        except Exception as e:  # no NVML: the path still runs, its evidence is then its log alone
            self.error = f"{type(e).__name__}: {e}"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:160]
    except OSError:
        return "?"


def run_path(path: dict, limit: float, log_dir: Path) -> dict:
    """Run one path's raywsl commands in turn, each in its own process group, killed (the whole group)
    when the path's `limit` runs out; the first that fails ends the path."""
    log = log_dir / f"{path['name']}.log"
    t0 = time.perf_counter()
    status, rc, commands, pids = "ok", 0, [], []
    with open(log, "w") as out, GpuProcesses() as gpu:
        for argv in path["argvs"]:
            argv = [sys.executable, "-m", "raywsl.cli", *argv, *extra_overrides(path["name"])]
            commands.append("raywsl " + shlex.join(argv[3:]))
            pids.append(None)
            out.write(f"$ {commands[-1]}\n")
            out.flush()
            proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            pids[-1] = proc.pid  # also its session id and process group
            try:
                rc = proc.wait(timeout=max(1.0, limit - (time.perf_counter() - t0)))
            except subprocess.TimeoutExpired:
                status, rc = "timeout", None
                _kill_group(proc)
                break
            if rc != 0:
                status = "failed"
                break
    tail = log.read_text(errors="replace").splitlines()[-40:]
    return {"status": status, "rc": rc, "seconds": round(time.perf_counter() - t0, 1), "limit_s": round(limit),
            "commands": commands, "pids": pids, "gpu_processes": sorted(set(gpu.seen.values())),
            "gpu_poll_error": gpu.error, "tail": tail, **run_folder(path)}


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the command's process group (its own session: nothing else is in it), up to 10 s for the
    command to end, then SIGKILL to what is left of the group (Ray's daemons that outlive their driver)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_folder(path: dict) -> dict:
    """The run folder's stages.json (computed / reused and seconds per stage) and metrics.json, if written."""
    run_dir = Path(next(a.split("=", 1)[1] for a in path["argvs"][-1] if a.startswith("run.dir=")))
    found = {}
    stages = run_dir / "stages.json"
    if stages.exists():
        found["stages"] = {name: {"reused": s.get("reused"), "seconds": s.get("seconds")}
                           for name, s in json.loads(stages.read_text()).get("stages", {}).items()}
    metrics = run_dir / "metrics.json"
    if metrics.exists():
        m = json.loads(metrics.read_text())
        found["metrics"] = {k: v for k, v in m.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    return found


def check_configs(all_paths: list[dict]) -> list[dict]:
    """--smoke: every path's overrides load and validate (no GPU asked for, nothing run)."""
    from raywsl.config import load_config
    from raywsl.models.registry import check_config

    results = []
    for path in all_paths:
        try:
            for argv in path["argvs"]:
                config = argv[argv.index("-c") + 1]
                check_config(load_config(ROOT / config, argv[argv.index("-c") + 2:] + extra_overrides(path["name"])))
            results.append({"name": path["name"], "status": "skipped: no CUDA (config validated)"})
        except Exception as e:
            results.append({"name": path["name"], "status": "failed", "error": f"{type(e).__name__}: {e}"})
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file of the results")
    ap.add_argument("--work", required=True, help="folder of the run folders, the shared cache and the path logs")
    ap.add_argument("--budget", type=float, default=200.0, help="seconds for all paths together (200)")
    ap.add_argument("--only", default="", help="comma-separated path names (default: all)")
    ap.add_argument("--smoke", action="store_true", help="no GPU: validate the paths' configs only")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    chosen = paths(work)
    if args.only:
        names = args.only.split(",")
        unknown = set(names) - {p["name"] for p in chosen}
        if unknown:
            ap.error(f"--only: unknown paths {sorted(unknown)}; known: {[p['name'] for p in chosen]}")
        chosen = [p for p in chosen if p["name"] in names]
    if args.smoke:
        results = check_configs(chosen)
    else:
        results = []
        deadline = time.monotonic() + args.budget
        for path in chosen:
            left = deadline - time.monotonic()
            if left < 20:
                results.append({"name": path["name"], "status": "skipped: no time left",
                                "exercises": path["exercises"]})
            else:
                print(f"cuda_paths: {path['name']} (limit {min(path['limit'], left):.0f} s): {path['exercises']}",
                      flush=True)
                results.append({"name": path["name"], "exercises": path["exercises"],
                                **run_path(path, min(path["limit"], left), work / "logs")})
            print(f"cuda_paths: {path['name']}: {results[-1]['status']}"
                  + (f" in {results[-1]['seconds']} s" if "seconds" in results[-1] else ""), flush=True)
            Path(args.out).write_text(json.dumps({"paths": results}, indent=2))  # kept if this script is killed
    Path(args.out).write_text(json.dumps({"paths": results}, indent=2))
    print("| path | status | s | GPU processes seen |")
    print("|---|---|---:|---|")
    for r in results:
        procs = "; ".join(p.split()[0] for p in r.get("gpu_processes", []))
        print(f"| {r['name']} | {r['status']}{': ' + r['error'] if 'error' in r else ''} | {r.get('seconds', '')} "
              f"| {procs} |")
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
