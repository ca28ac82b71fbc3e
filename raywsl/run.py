"""`raywsl run -c CONFIG`: every stage, meshes to report, in one command (and one MLflow run).

    corpus  (data.source "corpus:N": N procedural shapes into <run.dir>/corpus/)
    ingest  meshes -> samples.zarr                         (Ray Data; resumable store)
    fit     samples -> weights.zarr (base trained first when the field type needs one)
    train   weights -> checkpoints/diffusion_final         (Ray Train)
    sample  denoiser -> generated/ (rows and meshes)
    eval    generated vs the held-out split -> metrics.json, eval/
    report  report.html (self-contained) and the MLflow run's artifacts

Each stage is skipped when its output exists with a matching fingerprint: the stores resume shard by
shard (a changed ingest / fit config is refused unless --restart), and train, sample and eval redo
their work only when what they depend on changed. So a rerun after a crash, or after an edit of a
later stage's settings, does only the missing work. Ray starts once for the whole chain.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any, Callable

import fsspec

from raywsl import layout as L
from raywsl import tracking
from raywsl.config import Config, fingerprint, to_dict

log = logging.getLogger(__name__)

CORPUS_SCHEME = "corpus:"  # data.source "corpus:32": the built-in procedural generator
CORPUS_DIR = "corpus"


def corpus_size(source: str) -> int | None:
    """N of a "corpus:N" data.source, else None."""
    if not source.startswith(CORPUS_SCHEME):
        return None
    n = source[len(CORPUS_SCHEME):]
    if not n.isdigit() or int(n) < 1:
        from raywsl.config import ConfigError

        raise ConfigError(f"config key 'data.source': {source!r} names the built-in generator as corpus:N, "
                          f"N a positive number of shapes")
    return int(n)


def run_all(cfg: Config, restart: bool = False) -> dict[str, Any]:
    from raywsl.runtime import ray_session

    seconds: dict[str, float] = {}

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        log.info("run: --- %s ---", name)
        t0 = time.perf_counter()
        out = fn()
        seconds[name] = round(time.perf_counter() - t0, 2)
        log.info("run: %s took %.1fs", name, seconds[name])
        return out

    with ray_session(cfg.ray.address, cfg.ray.num_cpus or None):
        n = corpus_size(cfg.data.source)
        if n is not None:
            manifest = stage("corpus", lambda: _corpus(cfg, n))
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=manifest))
        from raywsl.diffusion.sample import sample
        from raywsl.diffusion.train import train
        from raywsl.fit.pipeline import fit
        from raywsl.ingest.pipeline import ingest

        ingested = stage("ingest", lambda: ingest(cfg, restart=restart))
        fitted = stage("fit", lambda: fit(cfg, restart=restart))
        if not fitted["done"]:
            raise RuntimeError(f"run: no shape was fitted ({ingested['done']} ingested); see logs/run.log")
        stage("train", lambda: train(cfg, restart=restart, replace_stale=True))
        stage("sample", lambda: sample(cfg))
        metrics = stage("eval", lambda: _eval(cfg))
    from raywsl.report import write_report

    _record_timings(cfg, seconds)
    report = stage("report", lambda: write_report(cfg))
    _record_timings(cfg, seconds)
    tracking.log_metrics({f"stage_seconds_{k}": v for k, v in seconds.items()})
    tracking.log_figure(report, artifact_dir="report")
    return {"metrics": metrics, "stage_seconds": seconds, "report": report}


def _corpus(cfg: Config, n: int) -> str:
    """The procedural corpus of n shapes in <run.dir>/corpus (kept when it is already there)."""
    from raywsl.data.corpus import write_corpus

    folder = L.join(cfg.run_dir, CORPUS_DIR)
    manifest = L.join(folder, "manifest.csv")
    fs, path = fsspec.core.url_to_fs(manifest)
    if fs.exists(path):
        with fs.open(path) as f:
            if sum(1 for _ in f) - 1 == n:
                log.info("run: corpus of %d shapes already in %s", n, folder)
                return manifest
    return str(write_corpus(folder, n, seed=cfg.seed, use_ray=True))


def _eval(cfg: Config) -> dict[str, Any]:
    """`raywsl eval` unless metrics.json already holds the evaluation of these samples and settings."""
    from raywsl.diffusion.sample import SUMMARY_FILE
    from raywsl.eval.run import evaluate

    run = L.RunLayout(cfg.run_dir)
    fs, _ = fsspec.core.url_to_fs(run.root)
    with fs.open(L.join(run.generated, SUMMARY_FILE)) as f:
        samples_fp = json.load(f)["fingerprint"]
    fp = fingerprint("eval", samples_fp, cfg.seed, to_dict(cfg.eval, fingerprint_only=True),
                     cfg.ingest.max_faces, cfg.ingest.margin)
    current = json.loads(fs.cat_file(run.metrics)) if fs.exists(run.metrics) else {}
    if current.get("eval_fingerprint") == fp:
        log.info("run: eval is up to date (same samples and settings); nothing to do")
        return current
    from raywsl.eval.run import update_metrics_file

    result = evaluate(cfg)
    update_metrics_file(run.metrics, {"eval_fingerprint": fp})
    return result


def _record_timings(cfg: Config, seconds: dict[str, float]) -> None:
    from raywsl.eval.run import update_metrics_file

    update_metrics_file(L.RunLayout(cfg.run_dir).metrics, {"stage_seconds": seconds})
