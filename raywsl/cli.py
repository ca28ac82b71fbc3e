"""The `raywsl` command: `raywsl <verb> [-c CONFIG.yaml] [key.sub=value ...]`.

Each verb is one function below, registered in VERBS. Verbs that run a stage take a config (typed,
validated before any work starts, saved as config.yaml in the run folder); `--help` lists every
config key with its default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Any, Callable

import fsspec

from raywsl import cache
from raywsl import contract as C
from raywsl.config import Config, ConfigError, describe, load_config
from raywsl.progress import console, setup_logging

log = logging.getLogger("raywsl")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def config_keys_help() -> str:
    rows = describe(Config)
    width = max(len(k) for k, _, _ in rows)
    return "config keys (default, meaning):\n" + "\n".join(
        f"  {k:{width}s}  {d!r:>12}  {h}" for k, d, h in rows)


def _add_config_args(p: argparse.ArgumentParser, restart: bool = True) -> None:
    p.add_argument("-c", "--config", help="YAML config file (defaults are the laptop setup)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    if restart:  # only for verbs that produce stage artifacts
        p.add_argument("--restart", action="store_true",
                       help="delete the artifacts of this command's stages and compute them again")


def load(args: argparse.Namespace) -> Config:
    """The command's config: typed, validated (registries included) before any work starts."""
    from raywsl.models.registry import check_config

    return check_config(load_config(args.config, args.overrides))


def _stages(args: argparse.Namespace, verb: str, stages: list[str], then: Callable | None = None,
            inputs: tuple[str, ...] = ()):
    """Run `stages` for the command's config: refused (nothing written) when the first one's inputs are
    missing; else the run folder records them (config.yaml, logs/<verb>.log, stages.json, MLflow).
    `then(cfg, outcomes)` names more stages to run after them, given what they did. `inputs`: stages
    run first to make what `stages` consume when it is missing (reused otherwise, even with --restart)."""
    from raywsl.stages import check, open_run, plan_for, run_stages

    cfg = load(args)
    plan = plan_for(cfg, base=stages == ["train-base"], encoder="train-encoder" in stages)
    stages = [s for s in (*inputs, *stages) if s in plan]
    check(cfg, plan, stages[0])
    console.info("raywsl %s: %s (cache %s)", verb, plan.run.root, plan.cache)
    with open_run(cfg, plan, verb, args.restart):
        outcomes = {o.stage: o for o in run_stages(cfg, plan, stages, args.restart, keep=inputs)}
        if then and (more := then(cfg, outcomes)):
            outcomes.update({o.stage: o for o in run_stages(cfg, plan, more, args.restart)})
    return cfg, plan, outcomes


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
    console.info("wrote %d shapes, manifest %s", args.n, manifest)
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    _, _, out = _stages(args, "ingest", ["corpus", "ingest"])
    return 0 if out["ingest"].facts["done"] > 0 else 1


def cmd_fit(args: argparse.Namespace) -> int:
    def recon(cfg: Config, out: dict) -> list[str]:  # reconstructions of what was fitted, if any
        return ["recon"] if cfg.fit.recon_count and out["fit"].facts["done"] else []

    _, _, out = _stages(args, "fit", ["train-base", "fit"], then=recon)
    return 0 if out["fit"].facts["done"] > 0 else 1


def cmd_train_base(args: argparse.Namespace) -> int:
    _, plan, _ = _stages(args, "train-base", ["train-base"])
    console.info("checkpoint: %s", plan["train-base"].path)
    return 0


def cmd_train_encoder(args: argparse.Namespace) -> int:
    _, plan, out = _stages(args, "train-encoder", ["train-encoder"], inputs=("corpus", "ingest", "train-base", "fit"))
    f = {k: v for k, v in out["train-encoder"].facts.items() if isinstance(v, (int, float))}
    nan = float("nan")
    console.info("held-out shapes encoded and decoded: Chamfer median %.4g over %d (the mean training row: %.4g); "
                 "training shapes: encoded %.4g, their fitted rows %.4g; weight-space R^2 on training rows %.3f",
                 f.get("encoder_heldout_cd_median", nan), f.get("encoder_heldout_count", 0),
                 f.get("encoder_mean_row_cd_median", nan), f.get("encoder_train_cd_median", nan),
                 f.get("encoder_fitted_cd_median", nan), f.get("encoder_r2_train", nan))
    console.info("encoder: %s", plan["train-encoder"].path)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    _, plan, _ = _stages(args, "train", ["train"])
    console.info("checkpoint: %s", plan["train"].path)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    _, plan, _ = _stages(args, "sample", ["sample"])
    console.info("meshes: %s", plan.run.link("sample"))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from raywsl.run import run_all
    from raywsl.stages import open_run, plan_for

    cfg = load(args)
    plan = plan_for(cfg)
    console.info("raywsl run: %s (cache %s)", plan.run.root, plan.cache)
    with open_run(cfg, plan, "run", args.restart):
        result = run_all(cfg, plan, restart=args.restart)
    m = result["metrics"]
    keys = ("recon_cd_median", "mmd_cd", "cov_cd", "1nna_cd", "valid_share", "weights_attractor_share")
    console.info("metrics: %s", ", ".join(f"{k} {m[k]:.4g}" for k in keys if isinstance(m.get(k), (int, float))))
    console.info("stages: %s (%.0f s)", ", ".join(f"{k} {'reused' if result['reused'][k] else f'{v:.0f}s'}"
                                                 for k, v in result["stage_seconds"].items()),
                 sum(result["stage_seconds"].values()))
    console.info("report: %s", result["report"])
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from raywsl.eval.run import evaluate, is_external, log_eval
    from raywsl.stages import call_stage, open_run, plan_for

    cfg = load(args)
    if not is_external(cfg):
        _, plan, _ = _stages(args, "eval", ["eval"])
        folder = plan["eval"].path
    else:  # given sets of meshes: the run folder's own eval/, not an artifact of the cache
        plan = plan_for(cfg)
        folder = plan.run.link("eval")
        if os.path.islink(folder):
            os.remove(folder)
        with open_run(cfg, plan, "eval", args.restart):
            call_stage(cfg, "eval", evaluate, cfg, plan if cfg.data.source else None, folder)  # a GPU task or here
            cache.update_json(plan.run.metrics, log_eval(folder))
    result = cache.read_json(C.join(folder, C.STAGE_METRICS), {})
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (dict, list))}, indent=2))
    console.info("wrote %s and %s/", plan.run.metrics, plan.run.link("eval"))
    return 0


def cmd_stability(args: argparse.Namespace) -> int:
    from raywsl.fit.stability import StabilityError, run_stability, variant_configs
    from raywsl.stages import check, open_run, plan_for, produce

    cfg = load(args)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    try:
        lambdas = [float(v) for v in args.lambdas.split(",") if v.strip()]
    except ValueError:
        raise StabilityError(f"--lambdas: comma-separated numbers in [0, 1], got {args.lambdas!r}") from None
    configs = variant_configs(cfg, variants, lambdas, args.shapes)
    plans = {name: plan_for(c) for name, c in configs.items()}
    plan = plan_for(cfg)
    check(cfg, plan, "fit")  # the samples are there
    with open_run(cfg, plan, "stability"):
        bases = {}
        for name, c in configs.items():  # lora / mlora / deepsdf_latent: their base, trained if missing
            if "train-base" in plans[name]:
                bases[name] = produce(c, plans[name], "train-base").artifact
        run_stability(cfg, variants, lambdas, args.shapes, plan.samples, bases)
    with fsspec.open(C.join(plan.run.stability, "stability.md")) as f:
        print(f.read().decode().split("\n\n- ")[0])  # the table, without the conventions
    console.info("wrote %s/ (stability.json, stability.md, stability.png)", plan.run.stability)
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from raywsl.eval.probe import probe_inputs, run_probe
    from raywsl.stages import open_run, plan_for

    cfg = load(args)
    plan = plan_for(cfg)
    inputs = probe_inputs(cfg, plan, args.seeds, args.test_fraction)  # refused, nothing written, unless fitted
    with open_run(cfg, plan, "probe"):
        run_probe(cfg, plan, inputs, args.seeds, args.test_fraction)
    with fsspec.open(C.join(plan.run.probe, C.PROBE_TABLE)) as f:
        print(f.read().decode().split("\n\n- ")[0])  # the tables, without the conventions
    console.info("wrote %s/ (%s, %s)", plan.run.probe, C.PROBE_JSON, C.PROBE_TABLE)
    return 0


def _topology_probe(args: argparse.Namespace, verb: str, encoders: int, probe: Callable, settings) -> Any:
    """Run a topology probe (raywsl/probes) on the config's fitted store, in the run folder's MLflow run.
    `encoders`: how many point-cloud encoders it reads (`train-encoder` with encoder.seed, +1, ...; each
    trained first when missing; the run folder's link ends on the config's own)."""
    from raywsl.stages import check, open_run, plan_for, run_stages

    cfg = load(args)
    settings.check()  # bad options refused before anything is written
    plan = plan_for(cfg)
    configs = [dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, seed=cfg.encoder.seed + j))
               for j in range(encoders)]
    encoder_plans = [(c, plan_for(c, encoder=True)) for c in configs]
    for c, p in encoder_plans:
        check(c, p, "train-encoder")  # the fitted store it needs
    with open_run(cfg, plan, verb):
        for c, p in reversed(encoder_plans):
            run_stages(c, p, ["train-encoder"])
        summary = probe(cfg, plan, settings, encoder_plans)
    return plan, summary


def cmd_probe_phase(args: argparse.Namespace) -> int:
    from raywsl.probes.phase import PhaseSettings, run_phase

    s = PhaseSettings(space=args.space, start=args.start, end=args.end, steps=args.steps, seeds=args.seeds,
                      points=args.points, radius=args.radius, sigma=args.sigma, resolution=args.resolution,
                      encoders=args.encoders)
    plan, summary = _topology_probe(args, "probe-phase", s.encoders if s.space == "cloud" else 0, run_phase, s)
    star, width = summary["alpha_star"], summary["width"]
    console.info("%s: components %s -> %s; α* %.3f [%.3f, %.3f] (%d of %d repeats with a transition), width %.3f",
                 summary["path"], summary["start_components"]["mean"], summary["end_components"]["mean"],
                 star["mean"], star["lo"], star["hi"], star["n"], s.seeds * s.encoders, width["mean"])
    console.info("wrote %s/", plan.run.probe_folder(C.PHASE, s.space))
    return 0


def cmd_probe_subspace(args: argparse.Namespace) -> int:
    from raywsl.probes.subspace import SubspaceSettings, run_subspace

    s = SubspaceSettings(category=args.category, space=args.space, dims=_numbers(args.dims, int, "--dims"),
                         radii=_numbers(args.radii, float, "--radii"), samples=args.samples, paths=args.paths,
                         path_steps=args.path_steps, resolution=args.resolution, points=args.points, tau=args.tau)
    plan, summary = _topology_probe(args, "probe-subspace", int(s.space == "condition"), run_subspace, s)
    for t in summary["table"]:
        console.info("%-8s m=%-3s r=%-4s valid %.2f, topology kept %.2f, nearest CD %.4g, displaced %.2f", t["kind"],
                     t["m"] or "-", f"{t['radius']:g}" if t["kind"] == "sample" else "-", t["valid_share"],
                     t["kept_share"], t["nearest_cd_median"], t["displaced_share"])
    console.info("wrote %s/", plan.run.probe_folder(C.SUBSPACE, s.space))
    return 0


def _numbers(text: str, kind: type, option: str) -> tuple:
    try:
        return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{option} {text!r}: a comma-separated list of {kind.__name__} values") from None


def cmd_sweep(args: argparse.Namespace) -> int:
    from raywsl.sweep.run import run_sweep
    from raywsl.sweep.space import load_sweep

    sweep = load_sweep(args.config, args.overrides)  # every trial's config checked before any work
    outcome = run_sweep(sweep, folder=args.dir or None, restart=args.restart)
    return 0 if outcome.counts.get("finished") else 1


def cmd_report(args: argparse.Namespace) -> int:
    if cache.exists(C.join(args.folder, C.SWEEP_JSON)):
        from raywsl.sweep.report import write_sweep_report

        report = write_sweep_report(args.folder)
        console.info("wrote %s (%d figures, %s)", report.path, len(report.figures), report.table)
        return 0
    if not cache.exists(C.join(args.folder, C.CONFIG)):
        raise ConfigError(f"{args.folder}: neither a sweep folder (no {C.SWEEP_JSON}) nor a run folder (no {C.CONFIG})")
    from raywsl.report import write_report
    from raywsl.stages import plan_for

    cfg = load_config(C.join(args.folder, C.CONFIG), [f"run.dir={cache.absolute(args.folder)}"])
    console.info("wrote %s", write_report(cfg, plan_for(cfg)))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from raywsl.store.inspect import format_summary, inspect_path

    info = inspect_path(args.path)
    print(json.dumps(info, indent=2) if args.json else format_summary(info))
    return 0


def cmd_gc(args: argparse.Namespace) -> int:

    runs = args.runs or os.path.dirname(os.path.abspath(args.cache.rstrip("/")))
    roots = cache.run_folders(runs)
    removed = cache.collect_garbage(args.cache, roots, dry_run=args.dry_run)
    for path in removed:
        print(path)
    verb = "would remove" if args.dry_run else "removed"
    console.info("%s %d entries of %s that none of the %d run folders in %s refers to", verb, len(removed),
                 args.cache, len(roots), runs)
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
    p.add_argument("--shapes", type=int, default=30, help="the first N training shapes (the paper: 30)")


def _probe_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p, restart=False)
    p.add_argument("--seeds", type=int, default=5, help="repeats, seeds seed .. seed+N-1 (the paper: 10)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of each category held out per repeat")


def _phase_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p, restart=False)
    p.add_argument("--space", default="cloud", help="cloud (point clouds through the encoder, the study's) or weights "
                                                    "(linear between two fitted rows)")
    p.add_argument("--from", dest="start", default="", help="start: a shape id or category (cloud: default the "
                                                            "Fibonacci sphere; seed s takes a category's s-th shape)")
    p.add_argument("--to", dest="end", default="", help="end: a shape id or category (cloud: default the noisy sphere)")
    p.add_argument("--steps", type=int, default=101, help="α grid points in [0, 1] (the study: 500)")
    p.add_argument("--seeds", type=int, default=5, help="repeats: noise draws, clouds' points, or shape pairs")
    p.add_argument("--points", type=int, default=1000, help="points of each cloud (the study: 1,000)")
    p.add_argument("--radius", type=float, default=0.6, help="the spheres' radius (the corpus's blobs: 0.55-0.7)")
    p.add_argument("--sigma", type=float, default=0.3, help="std of the noise that makes the uneven sphere")
    p.add_argument("--resolution", type=int, default=64, help="marching-cubes cells per axis of every decode")
    p.add_argument("--encoders", type=int, default=1, help="space cloud: repeat through this many encoders "
                                                            "(encoder.seed, +1, ...; trained when missing)")


def _subspace_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p, restart=False)
    p.add_argument("--category", default="bracket", help="the set: fitted training shapes of this category ('': all)")
    p.add_argument("--space", default="weights", help="weights (the store's rows) or condition (encoder conditions)")
    p.add_argument("--dims", default="2,8,32", help="subspace sizes m, comma-separated (capped at k - 1)")
    p.add_argument("--radii", default="0.5,1,2", help="radii in units of the set's std per direction")
    p.add_argument("--samples", type=int, default=16, help="samples per (m, radius)")
    p.add_argument("--paths", type=int, default=4, help="interpolation paths between pairs of the set")
    p.add_argument("--path-steps", type=int, default=5, help="points per path")
    p.add_argument("--resolution", type=int, default=64, help="marching-cubes cells per axis of every decode")
    p.add_argument("--points", type=int, default=2048, help="surface points per shape for the Chamfer distances")
    p.add_argument("--tau", type=float, default=0.02, help="displacement above which a surface point counts as moved")


def _sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", required=True, help="sweep config (configs/sweeps/NAME.yaml)")
    p.add_argument("--dir", default="", help="sweep folder (default: runs/sweeps/<name> beside the base config's runs)")
    p.add_argument("--restart", action="store_true",
                   help="a new Ray Tune experiment instead of resuming (finished trials' artifacts are still reused)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides for every trial, after the sweep's own (e.g. cache.dir=s3://... "
                        "mlflow.tracking_uri=http://head:5000 on a cluster)")


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="a sweep folder (runs/sweeps/NAME) or a run folder (runs/NAME)")


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a store (samples.zarr, weights.zarr) or a run folder")
    p.add_argument("--json", action="store_true", help="print the stable JSON summary")


def _gc_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", default=f"runs/{C.CACHE}", help="the artifact cache (cache.dir)")
    p.add_argument("--runs", default="", help="the folder holding the run folders (default: the cache's parent)")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")


# verb -> (help, argument builder, handler, takes a config)
VERBS: dict[str, tuple[str, Callable, Callable, bool]] = {
    "corpus": ("generate a procedural, categorised mesh corpus", _corpus_args, cmd_corpus, False),
    "ingest": ("meshes -> SDF samples in samples.zarr (Ray Data, resumable)", _add_config_args, cmd_ingest, True),
    "fit": ("SDF samples -> one fitted neural field per shape in weights.zarr (Ray Data actors, resumable)",
            _add_config_args, cmd_fit, True),
    "train-base": ("SDF samples -> the base network field.type needs (modulated base field, DeepSDF decoder) "
                   "+ one latent per shape (Ray Train, resumable)",
                   _add_config_args, cmd_train_base, True),
    "train-encoder": ("surface point clouds -> a condition c -> the fitted weight row: a PointNet encoder trained on "
                      "the fitted training shapes (Ray Train, resumable; ingests and fits first if needed), with its "
                      "reconstruction quality on held-out shapes (the topology probes' conditioned field)",
                      _add_config_args, cmd_train_encoder, True),
    "train": ("weights.zarr -> a diffusion denoiser over weight rows (Ray Train, resumable)",
              _add_config_args, cmd_train, True),
    "sample": ("the trained denoiser -> new weight rows and their meshes in generated/", _add_config_args,
               cmd_sample, True),
    "run": ("every stage, meshes to report.html: corpus, ingest, train-base, fit, recon, train, sample, eval, "
            "report (artifacts already in the cache are reused)", _add_config_args, cmd_run, True),
    "eval": ("evaluate generated meshes against a reference set: MMD / COV / 1-NNA, novelty, topology",
             _add_config_args, cmd_eval, True),
    "stability": ("fit shapes from init i1 and sqrt(1-l^2) i1 + l i2: cosine and linear-mode-connectivity "
                  "barrier per field variant (papers/004, Figure 3)", _stability_args, cmd_stability, True),
    "probe": (("the weight store's training rows: 1-NN (cosine), logistic regression and k-means ARI over "
               "categories, mean ± std over seeded splits (papers/004, Table 4), and weight statistics "
               "(papers/002, Table 2) -> probe/probe.md, probe.json, MLflow; the topology probes: `probe phase`, "
               "`probe subspace`"), _probe_args, cmd_probe, True),
    "probe phase": ("the connectivity phase transition (papers/000): decode along a path of point clouds (the "
                    "encoder's conditions; Fibonacci sphere -> noisy sphere) or weight rows, count components, Euler "
                    "characteristic and genus; α* and its width over seeds -> probe/phase-<space>/, MLflow",
                    _phase_args, cmd_probe_phase, True),
    "probe subspace": ("sample inside the top-m PCA subspace of one category's rows or conditions: topology kept, "
                       "validity, novelty (Chamfer to the nearest training shape) and local variation vs m and "
                       "radius -> probe/subspace-<space>/, MLflow", _subspace_args, cmd_probe_subspace, True),
    "sweep": ("every trial of a sweep config as a run on Ray Tune (shared artifacts, resumable), one MLflow parent run "
              "with a child run per trial, and the phase diagram: report/report.html with the onset N* per "
              "parameterisation", _sweep_args, cmd_sweep, False),
    "report": ("write the report of a sweep folder (phase diagram, onsets) or a run folder (report.html) again",
               _report_args, cmd_report, False),
    "inspect": ("summarise a store or a run folder", _inspect_args, cmd_inspect, False),
    "gc": ("remove the cache's artifacts no run folder refers to (and what interrupted runs left)", _gc_args,
           cmd_gc, False),
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


SUBVERBS = {"probe": ("phase", "subspace")}  # `raywsl probe phase ...` is the verb "probe phase"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) > 1 and argv[1] in SUBVERBS.get(argv[0], ()):
        argv[:2] = [f"{argv[0]} {argv[1]}"]
    args = build_parser().parse_args(argv)
    setup_logging(verbose=args.verbose)
    logging.getLogger("raywsl").setLevel(logging.DEBUG)  # the log file gets raywsl's debug lines
    from raywsl.data.sources import SourceError
    from raywsl.encoder import EncoderError
    from raywsl.eval.probe import ProbeError
    from raywsl.eval.run import EvalError
    from raywsl.fit.stability import StabilityError
    from raywsl.models.bases import BaseError
    from raywsl.runtime import ShardsUnfinished
    from raywsl.store.layout import LayoutError
    from raywsl.store.rows import StoreError

    try:
        return args.handler(args)
    except (ConfigError, SourceError, StoreError, LayoutError, BaseError, EvalError, StabilityError,
            ProbeError, ShardsUnfinished, EncoderError) as e:
        print(f"raywsl {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
