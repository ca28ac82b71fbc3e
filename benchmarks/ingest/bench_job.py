"""A whole `raywsl ingest` job against mesh-to-sdf, per core, on the same meshes.

    .venv/bin/python benchmarks/ingest/bench_job.py [--dir DIR] [--points N] [--m2s-shapes K]
                                                    [--ray-cpus C] [--json OUT] [key.sub=value ...]

About 8 minutes with the defaults on a 2-core machine (the job ~45 s, in-process ~30 s, mesh-to-sdf
~65 s per shape).

1. Meshes (written once into DIR/meshes, kept for later runs): the five primitives of bench_sdf.py
   (icosphere, subdivided box, torus, and two open ones: the sphere without its cap, the torus with
   3 % of its faces removed) as .obj, and corpus shapes 0..42 as .ply, shape i at marching-cubes
   resolution (64, 128, 16, 32)[i % 4]: 48 meshes, 220 to 74,456 faces.
2. The job: `raywsl ingest -c DIR/job/job.yaml data.source=DIR/meshes ingest.points=N
   ray.num_cpus=C [key.sub=value ...]` in a subprocess, from an empty cache and run folder (so a
   new MLflow sqlite store too), Ray start and stop, CLI and imports included. Its CPU time is that
   of every process it starts: this script makes itself the child subreaper (prctl
   PR_SET_CHILD_SUBREAPER), so Ray's daemons and workers stay its descendants when their parents
   exit, and polls their CPU time (/proc/PID/stat, every 0.1 s) until they are gone. RUSAGE_CHILDREN
   alone undercounts: the raylet ignores SIGCHLD, so its workers' CPU time is never handed up.
   Core-seconds per shape = that CPU time / shapes; the CPU time per kind of process is printed too.
3. Per core (this process pinned to one core, one libigl / BLAS thread, as bench_sdf.py; CPU time of
   this process, which other load on the machine moves less than wall time): every mesh through
   `sample_mesh` in-process (the job's per-shape work without Ray, the store write or the CLI), and
   `--m2s-shapes` of them with `ingest.backend=mesh_to_sdf` (surface_point_method='sample',
   sign_method='normal', 10 M surface samples): the shapes at evenly spaced ranks of the face count,
   smallest and largest included.

The ratio on those shapes: their mesh-to-sdf seconds over their share of the job's core-seconds
(the job's total split between shapes in proportion to their in-process time, so Ray start,
loading and writing are charged to them as to every other shape). Also printed: mean mesh-to-sdf
seconds over the job's mean core-seconds per shape, and the in-process ratio (no job overhead).
Load averages are printed per part: on a shared machine compare runs made at similar load.
`--job-only` (with `--json`) times the job alone, to compare variants of it.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS_SHAPES = 43
CORPUS_RESOLUTIONS = (64, 128, 16, 32)  # shape i at CORPUS_RESOLUTIONS[i % 4]
MESH_SET = "primitives5+corpus43/v1"  # bump when the mesh set changes: the folder is rewritten
PR_SET_CHILD_SUBREAPER = 36
THREAD_VARS = ("IGL_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=os.path.join(ROOT, "runs", "bench_job"),
                    help="folder for the meshes, the job's run folder and cache (runs/bench_job)")
    ap.add_argument("--points", type=int, default=200_000, help="query points per shape (200000)")
    ap.add_argument("--surface-points", type=int, default=16_384, help="surface points per shape (16384)")
    ap.add_argument("--ray-cpus", type=int, default=1, help="ray.num_cpus of the job (1)")
    ap.add_argument("--m2s-shapes", type=int, default=6, help="shapes run through mesh-to-sdf (6; 0: none)")
    ap.add_argument("--skip-job", action="store_true", help="only the per-core part")
    ap.add_argument("--job-only", action="store_true", help="only the job (to compare variants of it)")
    ap.add_argument("--m2s-from", help="take the mesh-to-sdf seconds from this earlier --json output instead "
                                       "of running it (for iterating on igl; a full run measures both)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value", help="more config overrides for the job")
    return ap.parse_args()


# ------------------------------------------------------------------------------------ meshes

def write_meshes(folder: str) -> None:
    """The 48 benchmark meshes as files in `folder` (kept when the mesh set is unchanged)."""
    import numpy as np
    import trimesh

    from raywsl.data.corpus import generate_shape

    stamp = os.path.join(folder, ".mesh_set")
    if os.path.exists(stamp) and open(stamp).read() == MESH_SET:
        return
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    sphere = trimesh.creation.icosphere(subdivisions=5)
    box = trimesh.creation.box(extents=[1.2, 0.8, 1.6])
    for _ in range(5):  # 12 -> 12,288 faces
        box = box.subdivide()
    torus = trimesh.creation.torus(0.6, 0.25, major_sections=128, minor_sections=64)
    cap = sphere.triangles_center[:, 2] < 0.6
    kept = np.random.default_rng(0).random(len(torus.faces)) > 0.03
    primitives = {
        "sphere": sphere, "box": box, "torus": torus,
        "cut_sphere_open": trimesh.Trimesh(sphere.vertices, sphere.faces[cap], process=False),
        "torus_holes_open": trimesh.Trimesh(torus.vertices, torus.faces[kept], process=False),
    }
    for name, mesh in primitives.items():
        mesh.export(os.path.join(folder, f"{name}.obj"))
    for i in range(CORPUS_SHAPES):
        shape = generate_shape(i, seed=0, resolution=CORPUS_RESOLUTIONS[i % len(CORPUS_RESOLUTIONS)])
        shape.mesh.export(os.path.join(folder, f"{shape.shape_id}.ply"))
    with open(stamp, "w") as f:
        f.write(MESH_SET)


def mesh_files(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith((".obj", ".ply")))


# ------------------------------------------------------------------------------------ the job

def _processes() -> dict[int, tuple[int, str, float]]:
    """{pid: (parent pid, command line, CPU seconds so far)} of every readable process."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        out[int(pid)] = (int(fields[1]), cmdline, (int(fields[11]) + int(fields[12])) / tick)
    return out


def _descendants_of_self(procs: dict | None = None) -> dict[int, tuple[int, str, float]]:
    """This process's descendants (as subreaper it inherits every orphaned one)."""
    procs = _processes() if procs is None else procs
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        out[pid] = procs[pid]
        todo.extend(children.get(pid, []))
    return out


# What the job's processes are, by their command line (Ray workers retitle themselves "ray::...").
PROCESS_KINDS = (("ray::", "Ray workers (shard tasks, Ray Data helpers)"),
                 ("default_worker.py", "Ray workers (shard tasks, Ray Data helpers)"),
                 ("setup_worker.py", "Ray workers (shard tasks, Ray Data helpers)"),
                 ("raywsl ingest", "driver (raywsl CLI)"), ("dashboard/agent.py", "dashboard agent"),
                 ("dashboard.py", "dashboard (+ its modules)"), ("ray-dashboard-", "dashboard (+ its modules)"),
                 ("multiprocessing.forkserver", "dashboard (+ its modules)"),
                 ("runtime_env/agent", "runtime env agent"), ("log_monitor", "log monitor"),
                 ("monitor.py", "autoscaler monitor"))


def _kind(cmdline: str) -> str:
    exe = os.path.basename(cmdline.split(" ")[0])
    if exe in ("raylet", "gcs_server"):  # their arguments name the worker scripts
        return exe
    return next((kind for key, kind in PROCESS_KINDS if key in cmdline), exe or "?")


class CpuByProcess(threading.Thread):
    """Polls the CPU seconds of this process's descendants while the job runs. Their sum is the
    job's CPU time: RUSAGE_CHILDREN alone misses processes reaped by a parent that ignores SIGCHLD
    (Ray's daemons do). What a process spends after its last poll is missed (< `every` s each)."""

    def __init__(self, every: float = 0.1):
        super().__init__(daemon=True)
        self.every, self.stop = every, threading.Event()
        self.seen: dict[int, list] = {}  # pid -> [kind, CPU seconds]

    def run(self) -> None:
        while not self.stop.is_set():
            for pid, (_, cmdline, cpu) in _descendants_of_self().items():
                entry = self.seen.setdefault(pid, ["?", 0.0])
                if cmdline:  # the latest: a child shows this script's until it execs; a zombie shows none
                    entry[0] = _kind(cmdline)
                entry[1] = max(entry[1], cpu)
            self.stop.wait(self.every)

    def total(self) -> float:
        return sum(cpu for _, cpu in self.seen.values())

    def by_kind(self) -> dict[str, list]:
        """{kind: [CPU seconds, processes]}, most CPU first."""
        out: dict[str, list] = {}
        for kind, cpu in self.seen.values():
            entry = out.setdefault(kind, [0.0, 0])
            entry[0] += cpu
            entry[1] += 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1][0]))


def _reap_all(timeout: float) -> list[int]:
    """Reap every child (Ray's processes exit shortly after the job); returns those still alive
    after `timeout` s, which are then killed (they were started by this run) and reaped too."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            return []
        alive = list(_descendants_of_self())
        if not alive:
            return []
        if time.monotonic() > deadline:
            for pid in alive:
                os.kill(pid, signal.SIGKILL)
            for pid in alive:
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
            return alive
        time.sleep(0.2)


def run_job(args: argparse.Namespace, folder: str, env: dict[str, str]) -> dict:
    """`raywsl ingest` on `folder` from an empty cache: wall seconds, CPU seconds of it and every
    process it started, and what its run folder recorded."""
    work = os.path.join(args.dir, "job")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    config = os.path.join(work, "job.yaml")
    with open(config, "w") as f:
        f.write(f"run:\n  dir: {work}/run\ncache:\n  dir: {work}/cache\ndata:\n  source: {folder}\n"
                f"ingest:\n  surface_points: {args.surface_points}\n")
    cmd = [os.path.join(os.path.dirname(sys.executable), "raywsl"), "ingest", "-c", config,
           f"data.source={folder}", f"ingest.points={args.points}", f"ray.num_cpus={args.ray_cpus}",
           *args.overrides]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = [os.getloadavg()[0]]
    t0 = time.perf_counter()
    poll = CpuByProcess()
    poll.start()
    with open(os.path.join(work, "job.out"), "w") as out:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
        rc = proc.wait()
    wall = time.perf_counter() - t0
    left = _reap_all(timeout=60)
    poll.stop.set()
    poll.join()
    load.append(os.getloadavg()[0])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {rc}); see {work}/job.out and {work}/run/logs/")
    reaped = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    log = open(os.path.join(work, "run", "logs", "ingest.log")).read()
    shard_s = [float(s) for s in re.findall(r"shard \d+: \d+ done, \d+ failed in ([0-9.]+)s", log)]
    stages = json.load(open(os.path.join(work, "run", "stages.json")))
    return {"cmd": cmd, "wall": wall, "load": load, "cpu": max(poll.total(), reaped), "cpu_reaped": reaped,
            "lingering": left, "shard_s": shard_s, "ingest_stage_s": stages["stages"]["ingest"]["seconds"],
            "by_kind": poll.by_kind()}


# ------------------------------------------------------------------------------------ per core

def per_core(args: argparse.Namespace, files: list[str]) -> list[dict]:
    """In-process `sample_mesh` (igl) on every mesh and mesh-to-sdf on a few, pinned to one core."""
    from raywsl.config import IngestConfig
    from raywsl.data.meshes import load_mesh
    from raywsl.geometry.sampling import sample_mesh

    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])
    print(f"per core: load average {os.getloadavg()[0]:.1f} at the start", file=sys.stderr, flush=True)
    ic = IngestConfig(points=args.points, surface_points=args.surface_points)
    rows = []
    sample_mesh("warm-up", files[0], IngestConfig(points=1000, surface_points=100), 0)
    for path in files:
        shape_id = os.path.splitext(os.path.basename(path))[0]
        mesh = load_mesh(path, ic.max_faces)
        t0 = time.process_time()
        values, reason = sample_mesh(shape_id, path, ic, 0)
        rows.append({"shape": shape_id, "faces": len(mesh.faces), "closed": bool(mesh.is_watertight),
                     "igl_s": time.process_time() - t0, "m2s_s": None})
        if values is None:
            raise RuntimeError(f"{path}: {reason}")
    by_faces = sorted(range(len(rows)), key=lambda i: rows[i]["faces"])
    k = min(args.m2s_shapes, len(rows))
    picked = sorted({by_faces[round(j * (len(rows) - 1) / max(k - 1, 1))] for j in range(k)}) if k else []
    if args.m2s_from:
        earlier = {r["shape"]: r["m2s_s"] for r in json.load(open(args.m2s_from))["shapes"]}
        for r in rows:
            r["m2s_s"] = earlier.get(r["shape"])
        return rows
    m2s = IngestConfig(points=args.points, surface_points=args.surface_points, backend="mesh_to_sdf")
    for i in picked:
        t0 = time.process_time()
        values, reason = sample_mesh(rows[i]["shape"], files[i], m2s, 0)
        rows[i]["m2s_s"] = time.process_time() - t0
        if values is None:
            raise RuntimeError(f"{files[i]}: mesh-to-sdf: {reason}")
        print(f"  mesh-to-sdf {rows[i]['shape']} ({rows[i]['faces']:,} faces): {rows[i]['m2s_s']:.1f} s",
              file=sys.stderr, flush=True)
    return rows


# ------------------------------------------------------------------------------------ main

def main() -> None:
    args = parse_args()
    job_env = dict(os.environ)  # the job runs with the environment it would have from a shell
    for var in THREAD_VARS:  # this process: one thread, before numpy / libigl start their pools
        os.environ[var] = "1"
    t_start = time.perf_counter()
    folder = os.path.join(args.dir, "meshes")
    write_meshes(folder)
    files = mesh_files(folder)
    print(f"command: {' '.join([os.path.relpath(sys.executable), *sys.argv])}")
    print(f"meshes: {len(files)} in {folder}; {args.points:,} query points, {args.surface_points:,} surface points")

    job = None
    if not args.skip_job:
        job = run_job(args, folder, job_env)
        print(f"job: {' '.join(os.path.relpath(c) if c.startswith('/') else c for c in job['cmd'])}")
        print(f"job: wall {job['wall']:.1f} s, CPU {job['cpu']:.1f} s (all its processes; "
              f"{job['cpu_reaped']:.1f} s of it in RUSAGE_CHILDREN), "
              f"{job['cpu'] / job['wall']:.2f} cores busy on average; ingest stage {job['ingest_stage_s']} s; "
              f"{len(job['shard_s'])} shard tasks, {sum(job['shard_s']):.1f} s in them"
              + (f"; {len(job['lingering'])} processes killed after the job" if job["lingering"] else "")
              + f"; load average {job['load'][0]:.1f} -> {job['load'][1]:.1f}")
        print(f"job: {job['cpu'] / len(files):.2f} core-s per shape, {job['wall'] / len(files):.2f} wall-s per shape")
        print("job: CPU s by process: "
              + ", ".join(f"{kind} {cpu:.1f}" + (f" ({n} processes)" if n > 1 else "")
                          for kind, (cpu, n) in job["by_kind"].items() if cpu >= 0.05))

    if args.job_only:
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "job": job}, f, indent=1)
        return
    load = os.getloadavg()[0]
    rows = per_core(args, files)
    load = (load, os.getloadavg()[0])
    igl_total = sum(r["igl_s"] for r in rows)
    print(f"\nper core (CPU time of this process, pinned to one core; load average {load[0]:.1f} -> {load[1]:.1f})")
    print(f"in-process sample_mesh (igl): {igl_total:.1f} s for {len(rows)} shapes, "
          f"{igl_total / len(rows):.2f} s per shape")
    if job:
        print(f"job overhead over in-process sampling: {job['cpu'] - igl_total:.1f} core-s "
              f"({(job['cpu'] - igl_total) / len(rows):.2f} per shape)")
    picked = [r for r in rows if r["m2s_s"] is not None]
    print("\n| shape | faces | closed | in-process igl s | job core-s (share) | mesh-to-sdf s | ratio vs job | "
          "ratio in-process |")
    print("|---|---:|:-:|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: r["faces"]):
        share = job["cpu"] * r["igl_s"] / igl_total if job else float("nan")
        m2s = f"{r['m2s_s']:.1f}" if r["m2s_s"] is not None else "-"
        ratio = f"{r['m2s_s'] / share:.0f}x" if r["m2s_s"] is not None and job else "-"
        ratio_in = f"{r['m2s_s'] / r['igl_s']:.0f}x" if r["m2s_s"] is not None else "-"
        print(f"| {r['shape']} | {r['faces']:,} | {'yes' if r['closed'] else 'no'} | {r['igl_s']:.2f} "
              f"| {share:.2f} | {m2s} | {ratio} | {ratio_in} |")
    if picked:
        m2s_sum = sum(r["m2s_s"] for r in picked)
        igl_sum = sum(r["igl_s"] for r in picked)
        print(f"\nmesh-to-sdf on {len(picked)} shapes: {m2s_sum / len(picked):.1f} s per shape (1 core)")
        print(f"in-process ratio on them (no job overhead): {m2s_sum / igl_sum:.1f}x")
        if job:
            share = job["cpu"] * igl_sum / igl_total
            print(f"RATIO, whole job per core, on those shapes: {m2s_sum / share:.1f}x "
                  f"(their share of the job's CPU: {share:.1f} core-s)")
            print(f"mean mesh-to-sdf s / job core-s per shape (all {len(rows)}): "
                  f"{m2s_sum / len(picked) / (job['cpu'] / len(rows)):.1f}x")
    print(f"\nbench_job.py took {time.perf_counter() - t_start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "job": job, "shapes": rows}, f, indent=1)


if __name__ == "__main__":
    main()
