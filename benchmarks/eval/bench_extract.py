"""Mesh extraction: the dense grid against coarse-to-fine, side by side, on the same fields.

    .venv/bin/python benchmarks/eval/bench_extract.py [--resolutions 128 256] [--coarse 32]
                                                      [--lipschitz 2] [--device auto|cpu|cuda]
                                                      [--threads 1]

Fields: an analytic SDF (two tori fused into a genus-2 shape, in torch) and an MLP of the
small-data study's shape (6-band positional encoding, 39 -> 128x4 -> 1, ReLU, 54,785 params)
fitted to it for `--fit-steps` Adam steps (L1 on 4,096 points a step, half uniform in the cube,
half near the surface; lr 5e-3, cosine decay). Evaluating the MLP is what costs; the analytic
field is nearly free.

For each field and resolution: one dense and one coarse-to-fine extraction (`extract_mesh`,
one run each after a small warm-up), their wall times and ratio, the grid points evaluated, and
how far the two meshes are apart: face counts, the largest vertex difference (when the vertex
counts match) and the Chamfer distance between their vertex sets (mean nearest-neighbour
distance, both ways, averaged; 0 for identical meshes). `max |f| / distance`: how much the
field overestimates the distance to its own surface (the dense mesh at the last resolution),
at most, over the 65^3 grid points: coarse-to-fine is guaranteed exact while it stays below
`--lipschitz`.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import igl
import numpy as np
import torch
from scipy.spatial import cKDTree

from raywsl.geometry.extract import extract_mesh
from raywsl.geometry.topology import topology


def torus(p, cx, R=0.4, r=0.12):
    q = p - torch.tensor([cx, 0.0, 0.0], device=p.device)
    return torch.hypot(q[..., :2].norm(dim=-1) - R, q[..., 2]) - r


def double_torus(p):
    return torch.minimum(torus(p, -0.4), torus(p, 0.4))


class MLP(torch.nn.Module):
    """[p, sin(2^k pi p), cos(2^k pi p)] for k < 6 (39 inputs) -> 4 x 128 ReLU -> 1."""

    def __init__(self, bands: int = 6, width: int = 128, depth: int = 4):
        super().__init__()
        self.register_buffer("freqs", torch.pi * 2.0 ** torch.arange(bands))
        dims = [3 + 6 * bands] + [width] * depth
        layers = [m for a, b in zip(dims, dims[1:]) for m in (torch.nn.Linear(a, b), torch.nn.ReLU())]
        self.net = torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))

    def forward(self, p):
        x = (p[..., None] * self.freqs).flatten(-2)
        return self.net(torch.cat([p, x.sin(), x.cos()], dim=-1)).squeeze(-1)


def training_points(n: int, device, gen: torch.Generator) -> torch.Tensor:
    """Half uniform in the cube, half near the surface (rejection from a blurred cube sample)."""
    uniform = torch.rand(n // 2, 3, generator=gen, device=device) * 2 - 1
    cand = torch.rand(8 * n, 3, generator=gen, device=device) * 2 - 1
    near = cand[double_torus(cand).abs() < 0.05][: n - n // 2]
    return torch.cat([uniform, near + 0.01 * torch.randn(near.shape, generator=gen, device=device)])


def fit(steps: int, device) -> tuple[MLP, float]:
    torch.manual_seed(0)
    mlp = MLP().to(device)
    opt = torch.optim.Adam(mlp.parameters(), lr=5e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator(device).manual_seed(0)
    for _ in range(steps):
        p = training_points(4096, device, gen)
        loss = (mlp(p) - double_torus(p)).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        p = training_points(100_000, device, gen)
        return mlp.eval(), float((mlp(p) - double_torus(p)).abs().mean())


def overestimate(field, mesh, n: int, device) -> float:
    """max |f(x)| / distance(x, mesh) over the (n + 1)^3 grid points x: how much the field
    overestimates the distance to its own surface (1 for a true SDF). Coarse-to-fine is exact when
    this stays below `lipschitz` (see raywsl/eval/extract.py)."""
    x = np.linspace(-1, 1, n + 1)
    points = np.stack(np.meshgrid(x, x, x, indexing="ij"), axis=-1).reshape(-1, 3)
    with torch.no_grad():
        f = field(torch.from_numpy(points).float().to(device)).cpu().numpy()
    v, faces = np.asarray(mesh.vertices), np.asarray(mesh.faces, np.int64)
    d = np.sqrt(igl.point_mesh_squared_distance(points, v, faces)[0])
    return float((np.abs(f) / np.maximum(d, 1e-12)).max())


def chamfer(a: np.ndarray, b: np.ndarray) -> float:
    return 0.5 * (cKDTree(b).query(a)[0].mean() + cKDTree(a).query(b)[0].mean())


def compare(name: str, field, res: int, args) -> dict:
    kw = dict(lipschitz=args.lipschitz, chunk=args.chunk, device=args.device)
    dense = extract_mesh(field, res, **kw)
    fine = extract_mesh(field, res, coarse=args.coarse, **kw)
    row = {"field": name, "res": res, "mesh": dense.mesh, "dense_s": dense.seconds, "c2f_s": fine.seconds,
           "dense_pts": dense.evaluated, "c2f_pts": fine.evaluated, "reason": dense.reason or fine.reason}
    if dense.ok and fine.ok:
        a, b = np.asarray(dense.mesh.vertices), np.asarray(fine.mesh.vertices)
        same = a.shape == b.shape and dense.mesh.faces.shape == fine.mesh.faces.shape
        row |= {"faces": (len(dense.mesh.faces), len(fine.mesh.faces)), "chamfer": chamfer(a, b),
                "max_dv": float(np.abs(a - b).max()) if same else None,
                "topology": tuple(topology(m)["components"] for m in (dense.mesh, fine.mesh))}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--resolutions", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--coarse", type=int, default=32, help="coarse-to-fine start resolution (32)")
    ap.add_argument("--lipschitz", type=float, default=2.0, help="Lipschitz bound coarse-to-fine assumes (2)")
    ap.add_argument("--chunk", type=int, default=1 << 18, help="points per field call (262144)")
    ap.add_argument("--fit-steps", type=int, default=200, help="Adam steps fitting the MLP (200)")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: per-core numbers)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(args.device)

    print(f"command: {' '.join([os.path.relpath(sys.executable), *sys.argv])}")
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                   platform.machine())
    gpu = f", {torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else ""
    print(f"machine: {cpu}, {os.cpu_count()} cores{gpu}; torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads); load average {os.getloadavg()[0]:.1f} at start")

    t0 = time.perf_counter()
    fitted, l1 = fit(args.fit_steps, dev)
    print(f"fitted MLP: {sum(p.numel() for p in fitted.parameters()):,} params, {args.fit_steps} steps "
          f"in {time.perf_counter() - t0:.0f} s, mean |error| {l1:.4f} on held-out points", flush=True)
    fields = {"analytic double torus": double_torus, "MLP fitted to it": fitted}
    extract_mesh(double_torus, 32, device=dev)  # warm-up
    print("\n| field | max \\|f\\| / distance | cells | dense s | coarse-to-fine s | speed-up "
          "| points evaluated (c2f / dense) | faces dense / c2f | max vertex diff | Chamfer "
          "| components dense / c2f |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, field in fields.items():
        rows = [compare(name, field, res, args) for res in args.resolutions]
        over = overestimate(field, rows[-1]["mesh"], 64, dev) if rows[-1]["mesh"] is not None else float("nan")
        for r in rows:
            head = f"| {name} | {over:.2f} | {r['res']}^3 | {r['dense_s']:.2f} | {r['c2f_s']:.2f} "
            if r["reason"]:
                print(head + f"| | | {r['reason']} |")
                continue
            dv = "-" if r["max_dv"] is None else f"{r['max_dv']:.1e}"
            print(head + f"| **{r['dense_s'] / r['c2f_s']:.1f}x** | {r['c2f_pts'] / r['dense_pts']:.1%} "
                  f"| {r['faces'][0]:,} / {r['faces'][1]:,} | {dv} | {r['chamfer']:.1e} "
                  f"| {r['topology'][0]} / {r['topology'][1]} |", flush=True)
    print(f"\ncoarse-to-fine from {args.coarse}^3, lipschitz {args.lipschitz}; "
          f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
