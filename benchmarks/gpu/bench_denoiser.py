"""Denoiser training throughput on one device: rows/s of raywsl's own training step, per model size and precision.

    python benchmarks/gpu/bench_denoiser.py --out runs/gpu/denoiser.json [--seconds 60] [--cases quickstart,...]
    python benchmarks/gpu/bench_denoiser.py --smoke --out /tmp/denoiser.json      (CPU, a few seconds)

No Ray, no store: the step is `raywsl.diffusion.train.DenoiserUpdate` (DDPM loss, backward, global-norm
clipping, AdamW, EMA) on the denoiser `build_denoiser` makes for a config, fed random standardised rows
of the config's field layout. That is what one Ray Train worker runs per step, minus reading rows, so
the figure is the ceiling of `raywsl train` on that device.

Cases (model sizes):
    quickstart        configs/quickstart.yaml: mlp small (10,177 parameters), tiny DiT, batch 32
    decoder54k-base   the same with field.preset=decoder54k (54,785) and a base DiT (512 x 8), batch 256
    hyperdiffusion    configs/hyperdiffusion.yaml: mlp hyperdiffusion (36,737), DiT 2880 x 12 x 16, batch 256
Variants (each case):
    fp32              what `raywsl train` runs: fp32, t and noise drawn on the CPU (seeded per step) and copied
    tf32              fp32 weights, TF32 matmuls (torch.set_float32_matmul_precision("high")); not a raywsl option
    bf16              bf16 autocast around the loss; not a raywsl option (the train loop has no autocast)
    bf16+cuda-rng     bf16 with t and noise drawn on the device: what drawing them on the CPU costs
The non-fp32 variants say what a precision option for `raywsl train` would gain.

Each case gets an equal share of --seconds; in it each variant warms up (2 steps), then runs until its
share of the time or --max-steps. Writes --out (JSON: one row per case x variant with rows/s, steps
timed, ms/step, peak GPU memory, last loss) and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
import traceback
from contextlib import nullcontext

import torch

# Repo root on sys.path: the script runs from a checkout without `pip install -e .` on the device.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from raywsl.config import load_config  # noqa: E402
from raywsl.diffusion.train import DenoiserUpdate  # noqa: E402
from raywsl.models.denoiser import build_denoiser, make_diffusion, tokenizer_options  # noqa: E402
from raywsl.models.dit import EMA, MODELS, make_dit  # noqa: E402
from raywsl.models.fields import field_from_config  # noqa: E402
from raywsl.models.tokenizers import make_tokenizer  # noqa: E402

CASES: dict[str, tuple[str, list[str]]] = {
    "quickstart": ("configs/quickstart.yaml", []),
    "decoder54k-base": ("configs/quickstart.yaml", ["field.preset=decoder54k", "diffusion.model=base",
                                                    "train.batch_size=256"]),
    "hyperdiffusion": ("configs/hyperdiffusion.yaml", []),
}
VARIANTS = ["fp32", "tf32", "bf16", "bf16+cuda-rng"]
WARMUP = 2


def run_variant(update: DenoiserUpdate, batch: int, n_params: int, device: torch.device, variant: str,
                seconds: float, max_steps: int) -> dict:
    """Time `update` on random rows until `seconds` or `max_steps`; a dict of the figures."""
    torch.set_float32_matmul_precision("high" if variant == "tf32" else "highest")
    bf16 = variant.startswith("bf16") and device.type == "cuda"
    rng_device = device if variant.endswith("cuda-rng") else torch.device("cpu")
    rows = torch.randn(batch, n_params, device=device)  # standardised rows: N(0, 1) per parameter
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step(k: int):
        gen = torch.Generator(device=rng_device).manual_seed(1000 + k)  # as the train loop: one seeded draw a step
        with torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext():
            return update(rows, gen, k)

    for k in range(WARMUP):
        outcome = step(k)
    sync(device)
    t0, steps = time.perf_counter(), 0
    while steps < max_steps and (steps == 0 or time.perf_counter() - t0 < seconds):
        outcome = step(WARMUP + steps)  # update() reads the loss back (.tolist()): each step ends synchronised
        steps += 1
    sync(device)
    elapsed = time.perf_counter() - t0
    return {"variant": variant, "steps": steps, "seconds": round(elapsed, 3),
            "ms_per_step": round(1e3 * elapsed / steps, 3), "rows_per_s": round(steps * batch / elapsed, 1),
            "loss": float(outcome.losses.float().mean()), "skipped_steps": update.skipped,
            "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(name: str, device: torch.device, variants: list[str], seconds: float, max_steps: int,
             smoke: bool) -> list[dict]:
    path, overrides = CASES[name]
    cfg = load_config(path, overrides + ["mlflow.enabled=false"])
    layout = field_from_config(cfg).layout
    batch = 4 if smoke else cfg.train.batch_size
    if smoke and name != "quickstart":  # too large for a CPU: check the case, count its parameters, no steps
        return [size_only(name, cfg, layout, batch)]
    with torch.device(device):  # parameters made on the device: the 2.07B-parameter DiT inits in seconds there
        denoiser = build_denoiser(cfg, layout)
        ema = EMA(denoiser, cfg.train.ema)
    opt = torch.optim.AdamW(denoiser.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    update = DenoiserUpdate(denoiser, denoiser, ema, opt, make_diffusion(cfg), cfg.train)
    base = {"case": name, "config": path, "overrides": overrides, "field": f"{cfg.field.type} {cfg.field.preset}",
            "row_params": layout.size, "tokens": denoiser.tokenizer.n_tokens, "dit": cfg.diffusion.model,
            "dit_params": sum(p.numel() for p in denoiser.parameters()), "batch": batch}
    results = []
    share = seconds / max(1, len(variants))
    for variant in variants:
        try:
            results.append({**base, **run_variant(update, batch, layout.size, device, variant, share, max_steps)})
        except Exception as e:  # one variant failing (out of memory, say) leaves the others standing
            results.append({**base, "variant": variant, "error": f"{type(e).__name__}: {e}",
                            "traceback": traceback.format_exc()[-2000:]})
        print(row_text(results[-1]), flush=True)
    del update, opt, ema, denoiser
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def size_only(name: str, cfg, layout, batch: int) -> dict:
    """The case's sizes without its memory: the tokenizer (small) on the CPU, the DiT on the meta device."""
    tokenizer = make_tokenizer(cfg.diffusion.tokenizer, layout, MODELS[cfg.diffusion.model]["dim"],
                               **tokenizer_options(cfg))
    with torch.device("meta"):
        dit = make_dit(cfg.diffusion.model, tokenizer.n_tokens)
    row = {"case": name, "variant": "sizes only (smoke)", "config": CASES[name][0], "overrides": CASES[name][1],
           "field": f"{cfg.field.type} {cfg.field.preset}", "row_params": layout.size, "tokens": tokenizer.n_tokens,
           "dit": cfg.diffusion.model, "dit_params": sum(p.numel() for p in dit.parameters())
           + sum(p.numel() for p in tokenizer.parameters()), "batch": batch}
    print(row_text(row), flush=True)
    return row


def row_text(r: dict) -> str:
    if "steps" not in r and "error" not in r:
        return f"| {r['case']} | {r['variant']}: {r['dit_params']:,} DiT parameters, {r['tokens']} tokens | | | | |"
    if "error" in r:
        return f"| {r['case']} | {r['variant']} | failed: {r['error'][:120]} | | | |"
    return (f"| {r['case']} | {r['variant']} | {r['rows_per_s']:,.0f} | {r['ms_per_step']:.2f} | {r['steps']} | "
            f"{r['peak_gib'] if r['peak_gib'] is not None else '-'} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file of the results")
    ap.add_argument("--seconds", type=float, default=60.0, help="time budget of the timed loops, all cases together")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--max-steps", type=int, default=500, help="timed steps per variant at most")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU check of the script: quickstart at batch 4, one step per variant; the other cases "
                         "built on the meta device (parameter counts, no steps)")
    args = ap.parse_args()
    cases, variants = args.cases.split(","), args.variants.split(",")
    for name in cases:
        if name not in CASES:
            ap.error(f"--cases: unknown case {name!r}; known: {', '.join(CASES)}")
    for name in variants:
        if name not in VARIANTS:
            ap.error(f"--variants: unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    if args.smoke:
        device, args.max_steps = torch.device("cpu"), 1
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        json.dump({"error": "no CUDA device (run with --smoke to check the script on a CPU)"}, open(args.out, "w"))
        print("bench_denoiser: no CUDA device", file=sys.stderr)
        return 3
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "seconds_budget": args.seconds,
            "smoke": args.smoke}
    print(f"# denoiser training step on {info['device']} (torch {info['torch']}): rows/s of DenoiserUpdate")
    print("| case | variant | rows/s | ms/step | steps timed | peak GiB |")
    print("|---|---|---:|---:|---:|---:|")
    results: list[dict] = []
    for name in cases:
        try:
            results += run_case(name, device, variants, args.seconds / len(cases), args.max_steps, args.smoke)
        except Exception as e:  # the model does not fit, say: the next case still runs
            results.append({"case": name, "error": f"{type(e).__name__}: {e}",
                            "traceback": traceback.format_exc()[-2000:]})
            print(f"| {name} | - | failed: {results[-1]['error'][:120]} | | | |", flush=True)
    with open(args.out, "w") as f:
        json.dump({**info, "results": results}, f, indent=2, default=str)
    failed = [r for r in results if "error" in r]
    bad = [r for r in results if "loss" in r and not math.isfinite(r["loss"])]
    if bad:
        print(f"bench_denoiser: non-finite loss in {[(r['case'], r['variant']) for r in bad]}", file=sys.stderr)
    return 1 if failed or bad else 0


if __name__ == "__main__":
    sys.exit(main())
