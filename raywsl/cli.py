"""The `raywsl` command: `raywsl <verb> [-c CONFIG.yaml] [key.sub=value ...]`.

Each verb is one function below, registered in VERBS. Verbs that run a stage take a config (typed,
validated before any work starts, saved as config.yaml in the run folder); `--help` lists every
config key with its default.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable

import fsspec

from raywsl import layout as L
from raywsl import tracking
from raywsl.config import Config, ConfigError, describe, dump_yaml, load_config

log = logging.getLogger("raywsl")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def config_keys_help() -> str:
    rows = describe(Config)
    width = max(len(k) for k, _, _ in rows)
    return "config keys (default, meaning):\n" + "\n".join(
        f"  {k:{width}s}  {d!r:>12}  {h}" for k, d, h in rows)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="YAML config file (defaults are the laptop setup)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.add_argument("--restart", action="store_true",
                   help="delete this stage's existing output if it was made with another config")


def _setup(args: argparse.Namespace, verb: str) -> tuple[Config, L.RunLayout]:
    """Load and validate the config, make the run folder, save config.yaml, log to logs/<verb>.log."""
    cfg = load_config(args.config, args.overrides)
    run = L.RunLayout(cfg.run_dir)
    fs, root = fsspec.core.url_to_fs(run.root)
    fs.makedirs(L.join(root, L.LOGS), exist_ok=True)
    with fs.open(L.join(root, L.CONFIG), "w") as f:
        f.write(dump_yaml(cfg))
    root_logger = logging.getLogger()
    for h in [h for h in root_logger.handlers if getattr(h, "raywsl_log", False)]:
        root_logger.removeHandler(h)  # one command's log file per process (tests run many)
        h.close()
    if "://" not in run.root:
        handler = logging.FileHandler(run.log_file(verb))
        handler.raywsl_log = True
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.DEBUG)
        logging.getLogger().addHandler(handler)
    return cfg, run


# ------------------------------------------------------------------------------------- verbs

def cmd_corpus(args: argparse.Namespace) -> int:
    from raywsl.data.corpus import write_corpus
    from raywsl.runtime import ray_session

    categories = args.categories.split(",") if args.categories else None
    if args.ray:
        with ray_session():
            manifest = write_corpus(args.out_dir, args.n, seed=args.seed, categories=categories,
                                    resolution=args.resolution, use_ray=True)
    else:
        manifest = write_corpus(args.out_dir, args.n, seed=args.seed, categories=categories,
                                resolution=args.resolution)
    log.info("wrote %d shapes, manifest %s", args.n, manifest)
    return 0


def _store_stage(args: argparse.Namespace, verb: str, run: Callable) -> tuple[dict, str]:
    """Run a stage that fills a row store (ingest, fit) inside the run folder's MLflow run; returns
    its summary and the "N done, K failed" line."""
    cfg, _ = _setup(args, verb)
    with tracking.run_context(cfg, verb, restart=args.restart):
        summary = run(cfg, restart=args.restart)
        tracking.log_metrics({f"{verb}_done": summary["done"], f"{verb}_failed": summary["failed"]})
    pending = f", {summary['pending']} pending" if summary["pending"] else ""
    return summary, f"{summary['done']} done, {summary['failed']} failed{pending}"


def cmd_ingest(args: argparse.Namespace) -> int:
    from raywsl.ingest.pipeline import ingest

    summary, counts = _store_stage(args, "ingest", ingest)
    print(counts)
    return 0 if summary["done"] > 0 else 1


def cmd_fit(args: argparse.Namespace) -> int:
    from raywsl.fit.pipeline import fit

    summary, counts = _store_stage(args, "fit", fit)
    recon = summary.get("recon")
    quality = (f"; recon Chamfer {recon['recon_cd_median']:.3g} (median), IoU {recon['recon_iou_mean']:.3f}"
               if recon else "")
    print(counts + quality)
    return 0 if summary["done"] > 0 else 1


def cmd_train_base(args: argparse.Namespace) -> int:
    from raywsl.base.train import train_base

    cfg, run = _setup(args, "train-base")
    with tracking.run_context(cfg, "train-base", restart=args.restart):
        metrics = train_base(cfg, restart=args.restart)
        tracking.log_metrics({f"base_{k}": v for k, v in metrics.items()})
    print(f"base field trained: step {metrics.get('step')}, loss {metrics.get('loss', float('nan')):.4g}; "
          f"checkpoint in {run.checkpoints}/")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from raywsl.diffusion.train import train

    cfg, run = _setup(args, "train")
    with tracking.run_context(cfg, "train", restart=args.restart):
        metrics = train(cfg, restart=args.restart)
    print(f"denoiser trained: step {metrics.get('step')}, loss {metrics.get('loss', float('nan')):.4g}; "
          f"checkpoint in {run.checkpoints}/{L.DIFFUSION_FINAL}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from raywsl.diffusion.sample import sample

    cfg, run = _setup(args, "sample")
    with tracking.run_context(cfg, "sample"):
        summary = sample(cfg)
    print(f"{summary['count']} rows sampled, {summary['count'] - summary['no_surface']} meshes in {run.generated}/")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from raywsl.eval.run import EvalError
    from raywsl.run import run_all

    cfg, run = _setup(args, "run")
    try:
        with tracking.run_context(cfg, "run", restart=args.restart):
            result = run_all(cfg, restart=args.restart)
    except EvalError as e:
        print(f"raywsl run: error: {e}", file=sys.stderr)
        return 2
    m = result["metrics"]
    keys = ("recon_cd_median", "mmd_cd", "cov_cd", "1nna_cd", "valid_share", "weights_attractor_share")
    print(", ".join(f"{k} {m[k]:.4g}" for k in keys if isinstance(m.get(k), (int, float))))
    print("stages: " + ", ".join(f"{k} {v:.0f}s" for k, v in result["stage_seconds"].items()))
    print(f"report: {result['report']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from raywsl.eval.run import EvalError, evaluate

    cfg, run = _setup(args, "eval")
    try:
        with tracking.run_context(cfg, "eval"):
            result = evaluate(cfg)
    except EvalError as e:
        print(f"raywsl eval: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (dict, list))}, indent=2))
    print(f"wrote {run.metrics} and {run.eval}/")
    return 0


def cmd_stability(args: argparse.Namespace) -> int:
    from raywsl.eval.stability import StabilityError, run_stability

    cfg, run = _setup(args, "stability")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    try:
        lambdas = [float(v) for v in args.lambdas.split(",") if v.strip()]
    except ValueError:
        print(f"raywsl stability: error: --lambdas: comma-separated numbers in [0, 1], got {args.lambdas!r}",
              file=sys.stderr)
        return 2
    try:
        with tracking.run_context(cfg, "stability"):
            run_stability(cfg, variants, lambdas, args.shapes)
    except StabilityError as e:
        print(f"raywsl stability: error: {e}", file=sys.stderr)
        return 2
    with fsspec.open(L.join(run.stability, "stability.md")) as f:
        print(f.read().decode().split("\n\n- ")[0])  # the table, without the conventions
    print(f"wrote {run.stability}/ (stability.json, stability.md, stability.png)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from raywsl.store.inspect import format_summary, inspect_path

    info = inspect_path(args.path)
    print(json.dumps(info, indent=2) if args.json else format_summary(info))
    return 0


def _corpus_args(p: argparse.ArgumentParser) -> None:
    from raywsl.data.corpus import CATEGORIES

    p.add_argument("out_dir", help="folder for meshes/ and manifest.csv")
    p.add_argument("--n", type=int, required=True, help="number of shapes")
    p.add_argument("--seed", type=int, default=0, help="shape i depends only on (seed, i)")
    p.add_argument("--categories", default="", help=f"comma-separated subset of {','.join(CATEGORIES)}")
    p.add_argument("--resolution", type=int, default=64, help="marching-cubes grid cells across")
    p.add_argument("--ray", action="store_true", help="generate in parallel as a Ray Data job")


def _stability_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--variants", default="mlp,mlp-asym,lora,lora-asym,mlora,mlora-asym",
                   help="field variants, comma-separated: <field.type> or <field.type>-asym; field.preset, "
                        "field.rank, ... come from the config")
    p.add_argument("--lambdas", default="0,0.25,0.5,0.75,1", help="perturbation strengths in [0, 1]")
    p.add_argument("--shapes", type=int, default=8, help="the first N ingested shapes (the paper: 30)")


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a store (samples.zarr, weights.zarr) or a run folder")
    p.add_argument("--json", action="store_true", help="print the stable JSON summary")


# verb -> (help, argument builder, handler, takes a config)
VERBS: dict[str, tuple[str, Callable, Callable, bool]] = {
    "corpus": ("generate a procedural, categorised mesh corpus", _corpus_args, cmd_corpus, False),
    "ingest": ("meshes -> SDF samples in samples.zarr (Ray Data, resumable)", _add_config_args, cmd_ingest, True),
    "fit": ("SDF samples -> one fitted neural field per shape in weights.zarr (Ray Data actors, resumable)",
            _add_config_args, cmd_fit, True),
    "train-base": ("SDF samples -> the base network field.type needs (modulated base field, DeepSDF decoder) "
                   "+ one latent per shape (Ray Train, resumable)",
                   _add_config_args, cmd_train_base, True),
    "train": ("weights.zarr -> a diffusion denoiser over weight rows (Ray Train, resumable)",
              _add_config_args, cmd_train, True),
    "sample": ("the trained denoiser -> new weight rows and their meshes in generated/", _add_config_args,
               cmd_sample, True),
    "run": ("every stage, meshes to report.html: corpus, ingest, fit, train, sample, eval, report "
            "(stages already done are skipped)", _add_config_args, cmd_run, True),
    "eval": ("evaluate generated meshes against a reference set: MMD / COV / 1-NNA, novelty, topology",
             _add_config_args, cmd_eval, True),
    "stability": ("fit shapes from init i1 and sqrt(1-l^2) i1 + l i2: cosine and linear-mode-connectivity "
                  "barrier per field variant (papers/004, Figure 3)", _stability_args, cmd_stability, True),
    "inspect": ("summarise a store or a run folder", _inspect_args, cmd_inspect, False),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raywsl", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, (help_text, add_args, handler, takes_config) in VERBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter,
                           epilog=config_keys_help() if takes_config else None)
        add_args(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    logging.getLogger().handlers[0].setLevel(logging.DEBUG if args.verbose else logging.INFO)
    logging.getLogger("raywsl").setLevel(logging.DEBUG)  # the log file gets raywsl's debug lines
    from raywsl.data.sources import SourceError
    from raywsl.fit.fields import FieldError
    from raywsl.store.rows import StoreError

    try:
        return args.handler(args)
    except (ConfigError, SourceError, StoreError, FieldError) as e:
        print(f"raywsl {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
