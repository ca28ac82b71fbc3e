"""Batched forward + backward of B shapes' MLPs: baddbmm per layer (the engine's) vs torch.func.vmap.

    .venv/bin/python benchmarks/fit/bench_vmap.py [--preset decoder54k] [--points 8192] [--batch-sizes 1,4,16]
        [--steps 20] [--threads 2] [--device cpu]

Both compute the same per-shape loss gradients (checked); the table gives shape-steps/s (forward,
L1 loss, backward; no optimiser) and their ratio. This is the "batched matmul or vmap: measure and
choose" of the fitting issue; the engine uses baddbmm.
"""

from __future__ import annotations

import argparse
import time

import torch

from raywsl.fit.engine import keep_freed_memory
from raywsl.models.fields import make_field, positional_encoding


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="decoder54k")
    ap.add_argument("--points", type=int, default=8192)
    ap.add_argument("--batch-sizes", default="1,4,16")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the engine does
    field = make_field("mlp", args.preset)
    n_linear, bands = field.n_linear, field.bands

    def one_shape(params, x, y):  # the per-shape forward vmap maps over (F.linear, no batch dim)
        h = positional_encoding(x, bands)
        for i in range(n_linear):
            h = torch.nn.functional.linear(h, params[f"l{i}.weight"], params[f"l{i}.bias"])
            h = torch.relu(h) if i < n_linear - 1 else h
        return (h.squeeze(-1) - y).abs().mean()

    vmapped = torch.func.vmap(torch.func.grad(one_shape))

    def bmm_grads(rows, x, y):
        rows = rows.detach().requires_grad_(True)
        loss = (field.forward(field.layout.unflatten(rows), x) - y).abs().mean(1).sum()
        return torch.autograd.grad(loss, rows)[0]

    print("| B | baddbmm shape-steps/s | vmap shape-steps/s | vmap / baddbmm | max grad diff |")
    print("|---:|---:|---:|---:|---:|")
    for b in [int(v) for v in args.batch_sizes.split(",")]:
        gen = torch.Generator().manual_seed(0)
        rows = field.init_rows(b, gen).to(args.device)
        x = (torch.rand(b, args.points, 3, generator=gen) * 2 - 1).to(args.device)
        y = (x.norm(dim=2) - 0.5)
        timings, grads = {}, {}
        for name, fn in (("bmm", lambda: bmm_grads(rows, x, y)),
                         ("vmap", lambda: field.layout.flatten(vmapped(field.layout.unflatten(rows), x, y)))):
            grads[name] = fn()  # warm-up
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            if args.device == "cuda":
                torch.cuda.synchronize()
            timings[name] = b * args.steps / (time.perf_counter() - t0)
        diff = (grads["bmm"] - grads["vmap"]).abs().max().item()
        print(f"| {b} | {timings['bmm']:,.1f} | {timings['vmap']:,.1f} | {timings['vmap'] / timings['bmm']:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
