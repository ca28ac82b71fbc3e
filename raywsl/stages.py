"""Running stages: for each stage a command asks for, reuse its artifact or compute it, then show it
in the run folder and record it.

    plan = plan_for(cfg)                          # every stage's artifact (raywsl/contract.py)
    check(cfg, plan, "fit")                       # refuse before anything is written
    with open_run(cfg, plan, "fit"):              # config.yaml, logs/, the MLflow run
        run_stages(cfg, plan, ["train-base", "fit", "recon"])

Per stage: hold the artifact's lock (cache.py; a second process asking for it waits), reuse it if it
is published (a row store: fill the shards this run needs that are missing), else compute it into a
temporary folder published atomically; link it into the run folder; merge its figures into the run's
metrics.json and MLflow; write stages.json (fingerprint, reused, seconds, location) and one line to
the terminal. The stage functions themselves live in their subpackages and know nothing of this.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from raywsl import cache
from raywsl import contract as C
from raywsl import tracking
from raywsl.config import Config, ConfigError, dump_yaml
from raywsl.progress import console, native_output_to, open_log_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageDef:
    compute: Callable[..., dict[str, Any]]  # store stages: (cfg, plan); others: (cfg, plan, out, restart)
    check: Callable[[Config, C.Plan], Any] | None = None  # raises (StoreError, ...) when inputs are missing
    record: Callable[[Config, C.Plan], dict[str, Any]] | None = None  # a published artifact's figures
    summary: Callable[[dict[str, Any]], str] = lambda facts: ""  # the terminal line's result


# ------------------------------------------------------------------------------------ the stages

def _corpus(cfg: Config, plan: C.Plan, out: str, restart: bool) -> dict[str, Any]:
    from raywsl.data.corpus import write_corpus
    from raywsl.runtime import ray_session

    with ray_session(cfg.ray.address, cfg.ray.num_cpus or None):
        write_corpus(out, cfg.corpus_size, seed=cfg.seed, categories=cfg.corpus_categories, use_ray=True)
    return {}


def _corpus_record(cfg: Config, plan: C.Plan) -> dict[str, Any]:
    return {"corpus_shapes": cfg.corpus_size}


def _ingest(cfg: Config, plan: C.Plan) -> dict[str, Any]:
    from raywsl.ingest.pipeline import ingest

    return ingest(cfg, plan)


def _train_base(cfg: Config, plan: C.Plan, out: str, restart: bool) -> dict[str, Any]:
    from raywsl.base.train import train_base

    return train_base(cfg, plan, out, restart)


def _check_base(cfg: Config, plan: C.Plan) -> None:
    from raywsl.base.train import base_rows

    base_rows(cfg, plan)


def _base_record(cfg: Config, plan: C.Plan) -> dict[str, Any]:
    metrics = cache.read_json(plan["train-base"].join(C.CHECKPOINT_INFO), {}).get("metrics", {})
    return {f"base_{k}": v for k, v in metrics.items()}


def _fit(cfg: Config, plan: C.Plan) -> dict[str, Any]:
    from raywsl.fit.pipeline import fit

    return fit(cfg, plan)


def _check_fit(cfg: Config, plan: C.Plan) -> None:
    from raywsl.fit.pipeline import check_inputs

    check_inputs(cfg, plan)


def _fit_record(cfg: Config, plan: C.Plan) -> dict[str, Any]:
    tracking.log_figure(plan["fit"].join(C.FIT_CURVE))
    return {}


def _recon(cfg: Config, plan: C.Plan, out: str, restart: bool) -> dict[str, Any]:
    from raywsl.fit.recon import reconstruct

    return reconstruct(cfg, plan, out)


def _recon_record(cfg: Config, plan: C.Plan) -> dict[str, Any]:
    from raywsl.fit.recon import log_recon

    return log_recon(plan["recon"].path)


def _train_encoder(cfg: Config, plan: C.Plan, out: str, restart: bool) -> dict[str, Any]:
    from raywsl.encoder.train import train_encoder

    return train_encoder(cfg, plan, out, restart)


def _check_encoder(cfg: Config, plan: C.Plan) -> None:
    from raywsl.encoder.train import training_set

    training_set(cfg, plan)


def _encoder_record(cfg: Config, plan: C.Plan) -> dict[str, Any]:
    from raywsl.encoder.train import log_encoder

    return log_encoder(plan["train-encoder"].path)


def _train(cfg: Config, plan: C.Plan, out: str, restart: bool) -> dict[str, Any]:
    from raywsl.diffusion.train import train

    return train(cfg, plan, out, restart)


def _check_train(cfg: Config, plan: C.Plan) -> None:
    from raywsl.diffusion.train import training_set

    training_set(cfg, plan)


def _train_record(cfg: Config, plan: C.Plan) -> dict[str, Any]:
    from raywsl.diffusion.train import log_train

    return {f"train_{k}": v for k, v in log_train(plan["train"].path).items()}


def _sample(cfg: Config, plan: C.Plan, out: str, restart: bool) -> dict[str, Any]:
    from raywsl.diffusion.sample import sample

    return sample(cfg, plan, out)


def _check_sample(cfg: Config, plan: C.Plan) -> None:
    from raywsl.diffusion.sample import check_inputs

    check_inputs(cfg, plan)


def _sample_record(cfg: Config, plan: C.Plan) -> dict[str, Any]:
    from raywsl.diffusion.sample import log_sample

    summary = log_sample(plan["sample"].path)
    return {"sample_count": summary.get("count"), "sample_no_surface": summary.get("no_surface")}


def _eval(cfg: Config, plan: C.Plan, out: str, restart: bool) -> dict[str, Any]:
    from raywsl.eval.run import evaluate

    return evaluate(cfg, plan, out)


def _check_eval(cfg: Config, plan: C.Plan) -> None:
    from raywsl.eval.run import EvalError

    if not cache.is_complete(plan["sample"].path):
        raise EvalError(f"no samples for this config ({plan['sample'].path}): run `raywsl sample` with this "
                        f"config first")


def _eval_record(cfg: Config, plan: C.Plan) -> dict[str, Any]:
    from raywsl.eval.run import log_eval

    return log_eval(plan["eval"].path)


def _report(cfg: Config, plan: C.Plan) -> dict[str, Any]:
    from raywsl.report import write_report

    path = write_report(cfg, plan)
    tracking.log_figure(path, artifact_dir="report")
    return {"report": path}


def _counts(facts: dict[str, Any]) -> str:
    pending = f", {facts['pending']} pending" if facts.get("pending") else ""
    return f"{facts.get('done', 0)} done, {facts.get('failed', 0)} failed{pending}"


def _fmt(facts: dict[str, Any], *keys: str) -> str:
    return ", ".join(f"{k} {facts[k]:.4g}" for k in keys if isinstance(facts.get(k), (int, float)))


STAGES: dict[str, StageDef] = {
    "corpus": StageDef(_corpus, record=_corpus_record, summary=lambda f: f"{f.get('corpus_shapes')} shapes"),
    "ingest": StageDef(_ingest, summary=_counts),
    "train-base": StageDef(_train_base, check=_check_base, record=_base_record,
                           summary=lambda f: _fmt(f, "base_step", "base_loss")),
    "fit": StageDef(_fit, check=_check_fit, record=_fit_record, summary=_counts),
    "recon": StageDef(_recon, check=_check_fit, record=_recon_record,
                      summary=lambda f: _fmt(f, "recon_cd_median", "recon_iou_mean")),
    "train-encoder": StageDef(_train_encoder, check=_check_encoder, record=_encoder_record,
                              summary=lambda f: _fmt(f, "encoder_heldout_cd_median", "encoder_train_cd_median",
                                                     "encoder_fitted_cd_median", "encoder_r2_train")),
    "train": StageDef(_train, check=_check_train, record=_train_record,
                      summary=lambda f: _fmt(f, "train_step", "train_loss")),
    "sample": StageDef(_sample, check=_check_sample, record=_sample_record,
                       summary=lambda f: f"{f.get('sample_count')} rows, "
                                         f"{f.get('sample_no_surface')} without a surface"),
    "eval": StageDef(_eval, check=_check_eval, record=_eval_record,
                     summary=lambda f: _fmt(f, "mmd_cd", "cov_cd", "1nna_cd", "valid_share")),
    "report": StageDef(_report, summary=lambda f: f.get("report", "")),
}
assert list(STAGES) == list(C.STAGES), "every stage of the contract has a runner, in order"


# ------------------------------------------------------------------------------------ where stages run

# Stages that compute in the driver process, or with scaling.use_gpu as one Ray task holding a GPU (the
# driver may be a CPU head node), and the config key of the torch device each computes on.
GPU_TASK_STAGES = {"sample": "fit.device", "recon": "fit.device", "eval": "eval.device"}


def stage_resources(cfg: Config, stage: str) -> dict[str, Any]:
    """Ray options of the one task that computes `stage` ({} computes it in this process): with
    scaling.use_gpu, one GPU and scaling.cpus_per_task CPUs for sample, recon and eval, unless their
    device is cpu. Stages that place their own work (fit's actors, Ray Train's workers, ingest's
    tasks) and every stage without scaling.use_gpu (the laptop default) compute here."""
    key = GPU_TASK_STAGES.get(stage)
    if not key or not cfg.scaling.use_gpu or C.read_key(cfg, key) == "cpu":
        return {}
    return {"num_gpus": 1, "num_cpus": cfg.scaling.cpus_per_task}


def gpu_demand(cfg: Config, stage: str) -> tuple[float, str]:
    """(GPUs the cluster must have before `stage` can start, what asks for them) for the waiting
    notice (runtime.gpu_wait_notice); (0, "") when the stage asks for none. Fitting starts with one
    actor; a Ray Train run needs all of its workers at once."""
    def count(n: int, noun: str, gpus: float) -> str:
        return f"{n} {noun}{'s' if n != 1 else ''} x {gpus:g} GPU"

    if stage == "fit" and cfg.fit_gpus:
        return cfg.fit_gpus, count(cfg.fit.actors, "fitting actor", cfg.fit_gpus)
    if stage in ("train-base", "train-encoder", "train") and cfg.scaling.use_gpu:
        workers = {"train-base": cfg.base.workers, "train-encoder": cfg.encoder.workers}.get(
            stage, cfg.scaling.num_workers)
        return float(workers), count(workers, "Ray Train worker", 1)
    if gpus := stage_resources(cfg, stage).get("num_gpus", 0):
        return float(gpus), count(1, f"{stage} task", gpus)
    return 0.0, ""


def call_stage(cfg: Config, stage: str, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` (the compute function of `stage`) where the stage computes (`stage_resources`): in
    this process, or as one Ray task whose result comes back here; saying why while it waits for GPUs
    (`gpu_demand`). The task writes into the artifact's folder as this process would (on a cluster, the
    cache is storage every node sees); MLflow calls in it would find no active run, so what a stage
    records is logged from the artifact by its `record` function, in this process."""
    from raywsl.runtime import gpu_wait_notice, ray_session, run_task

    options = stage_resources(cfg, stage)
    with gpu_wait_notice(stage, *gpu_demand(cfg, stage)):
        if not options:
            return fn(*args)
        with ray_session(cfg.ray.address, cfg.ray.num_cpus or None):
            return run_task(fn, *args, **options)


# ------------------------------------------------------------------------------------ plans

def plan_for(cfg: Config, base: bool = False, encoder: bool = False) -> C.Plan:
    """Every stage's artifact for `cfg` (resolving data.source to fingerprint its meshes). `base`: plan
    a train-base stage even when the field type needs none (`raywsl train-base`: the modulated base);
    `encoder`: plan the train-encoder stage (`raywsl train-encoder`, the topology probes), which no
    other command runs. ConfigError for corpus categories the generator does not have."""
    from raywsl.data.corpus import CATEGORIES
    from raywsl.data.sources import resolve_source
    from raywsl.ingest.pipeline import source_fingerprint
    from raywsl.models.registry import base_model

    unknown = [c for c in cfg.corpus_categories or [] if c not in CATEGORIES]
    if unknown:
        raise ConfigError(f"config key 'data.source': bad value {cfg.data.source!r}: unknown corpus categories "
                          f"{unknown}; allowed: {', '.join(CATEGORIES)}")
    corpus = cfg.corpus_size is not None
    source = "" if corpus or not cfg.data.source else source_fingerprint(resolve_source(cfg.data.source))
    model = base_model(cfg) or ("modulated" if base else None)
    given = (file_fingerprint(C.join(cfg.field.base, C.CHECKPOINT_STATE)), cfg.field.base) \
        if model and cfg.field.base else None
    return C.make_plan(cfg, cache=cfg.cache_dir, source=source, corpus=corpus, base_model=model, base=given,
                       encoder=encoder)


def file_fingerprint(path: str) -> str:
    """A hash of a file's bytes (a given base's state.pt: its identity, wherever it lies)."""
    import fsspec

    fs, p = fsspec.core.url_to_fs(path)
    if not fs.exists(p):
        from raywsl.models.bases import BaseError

        raise BaseError(f"field.base: no trained base at {path.rsplit('/', 1)[0]} (no {C.CHECKPOINT_STATE})")
    h = hashlib.sha256()
    with fs.open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def check(cfg: Config, plan: C.Plan, stage: str) -> None:
    """Refuse (raise) when what `stage` consumes is missing; reads only, writes nothing."""
    if stage in plan and STAGES[stage].check:
        STAGES[stage].check(cfg, plan)


# ------------------------------------------------------------------------------------ running

@dataclass
class Outcome:
    stage: str
    fingerprint: str
    reused: bool
    seconds: float
    artifact: str
    facts: dict[str, Any]


def produce(cfg: Config, plan: C.Plan, stage: str, restart: bool = False) -> Outcome:
    """Reuse or compute one stage's artifact; link it into the run folder; record it."""
    art, spec, d = plan[stage], C.STAGES[stage], STAGES[stage]
    t0 = time.perf_counter()
    facts: dict[str, Any] = {}

    def waiting() -> None:
        console.info("  %-13s waiting for another process that is producing %s", stage, art.path)

    if not spec.cached:
        facts = d.compute(cfg, plan)
        reused = False
    else:
        with _ray_for_locks(cfg, art), cache.lock(art, waiting):
            if restart:
                cache.remove(art.path)
                cache.remove(cache.work_dir(art))
            if spec.store:
                cache.link(plan.run, stage, plan.shown(stage))  # shows the store while it fills
                facts = call_stage(cfg, stage, d.compute, cfg, plan)
                reused = facts.pop("computed") == 0
            elif cache.is_complete(art.path):
                reused = True
            else:
                with cache.publishing(art, {"config": {k: C.read_key(cfg, k) for k in spec.reads}}) as out:
                    call_stage(cfg, stage, d.compute, cfg, plan, out, restart)
                cache.remove(cache.work_dir(art))  # a training stage's resumable state, now published
                reused = False
        cache.link(plan.run, stage, plan.shown(stage))
    if d.record:
        facts.update(d.record(cfg, plan))
    seconds = round(time.perf_counter() - t0, 2)
    outcome = Outcome(stage, art.fingerprint, reused, seconds, art.path, facts)
    _show(outcome, d.summary(facts))
    _record(cfg, plan, outcome)
    return outcome


def _ray_for_locks(cfg: Config, art: C.Artifact):
    """An artifact at a URL is locked through a Ray actor (cache.lock): Ray must be up first, the
    configured one (not one that a bare Ray call would start by itself)."""
    from raywsl.runtime import ray_session

    return contextlib.nullcontext() if cache.is_local(art.path) else ray_session(cfg.ray.address,
                                                                                 cfg.ray.num_cpus or None)


def run_stages(cfg: Config, plan: C.Plan, stages: list[str], restart: bool = False,
               keep: tuple[str, ...] = ()) -> list[Outcome]:
    """Produce `stages` in order; `restart` computes them anew, except those in `keep` (a command's
    inputs, made when missing: `raywsl train-encoder --restart` trains the encoder again, not the fit)."""
    from raywsl.runtime import held_session

    show_inputs(plan, stages)
    with held_session():  # Ray starts with the first stage that computes, once for all of them
        return [produce(cfg, plan, stage, restart and stage not in keep) for stage in stages if stage in plan]


def inputs_of(plan: C.Plan, stages: list[str]) -> list[str]:
    """The stages whose artifacts `stages` consume, directly or not, that are not among them."""
    found: list[str] = []
    todo = [s for s in stages if s in plan]
    while todo:
        for parent in C.STAGES[todo.pop()].consumes:
            if parent in plan and parent not in stages and parent not in found:
                found.append(parent)
                todo.append(parent)
    return [s for s in plan.stages if s in found]


def show_inputs(plan: C.Plan, stages: list[str]) -> None:
    """The run folder also shows the artifacts a command consumed (`raywsl fit`: the samples), as
    reused stages in stages.json with their links."""
    for stage in inputs_of(plan, stages):
        art = plan[stage]
        if cache.is_complete(art.path):
            cache.link(plan.run, stage, plan.shown(stage))
            _write_stage(plan, stage, {"fingerprint": art.fingerprint, "reused": True, "seconds": 0.0,
                                       "artifact": art.path})


def _show(o: Outcome, summary: str) -> None:
    how = "reused" if o.reused else "computed"
    console.info("  %-13s %-8s %7.1f s  %s", o.stage, how, o.seconds, summary)


def _write_stage(plan: C.Plan, stage: str, entry: dict[str, Any]) -> None:
    stages = cache.read_json(plan.run.stages, {})
    stages["cache"] = plan.cache
    stages.setdefault("stages", {})[stage] = entry
    stages["stages"] = {s: stages["stages"][s] for s in C.STAGES if s in stages["stages"]}  # in stage order
    cache.write_json(plan.run.stages, stages, sort_keys=False)


def _record(cfg: Config, plan: C.Plan, o: Outcome) -> None:
    """stages.json, the run's metrics.json and the MLflow run learn what one stage did."""
    _write_stage(plan, o.stage, {"fingerprint": o.fingerprint, "reused": o.reused, "seconds": o.seconds,
                                 "artifact": o.artifact})
    if C.STAGES[o.stage].store:  # row counts, named by stage: ingest_done, fit_failed, ...
        metrics = {f"{o.stage}_{k}": o.facts[k] for k in ("rows", "done", "failed", "pending") if k in o.facts}
    else:
        metrics = dict(o.facts)
    metrics["stage_seconds"] = {**cache.read_json(plan.run.metrics, {}).get("stage_seconds", {}), o.stage: o.seconds}
    cache.update_json(plan.run.metrics, metrics)
    tracking.set_tags({f"stage.{o.stage}.fingerprint": o.fingerprint, f"stage.{o.stage}.reused": str(o.reused),
                       f"stage.{o.stage}.artifact": o.artifact})
    tracking.log_metrics({f"stage_seconds_{o.stage}": o.seconds, **{k: v for k, v in metrics.items()
                                                                    if k != "stage_seconds"}})


# ------------------------------------------------------------------------------------ the run folder

@contextmanager
def open_run(cfg: Config, plan: C.Plan, verb: str, restart: bool = False) -> Iterator[None]:
    """What a command writes into its run folder once its checks passed: config.yaml, its log file
    (with what was logged so far), and the run folder's MLflow run (ended FAILED on an error)."""
    cache.write_text(plan.run.config, dump_yaml(cfg))
    # A run folder at a URL gets its log when the command ends (written locally until then).
    with cache.local_file(plan.run.log_file(verb)) as local_log:
        open_log_file(local_log)
        if stale := _stale_stages(plan):
            log.info("the run folder's stages.json named other artifacts for %s (the config changed)",
                     ", ".join(stale))
        with native_output_to(local_log), tracking.run_context(cfg, verb, plan, restart=restart):
            yield


def _stale_stages(plan: C.Plan) -> list[str]:
    stages = cache.read_json(plan.run.stages, {}).get("stages", {})
    return [s for s, e in stages.items() if s in plan and e.get("fingerprint") != plan[s].fingerprint]


def reset_stages(plan: C.Plan) -> None:
    """Start the run folder's stages.json afresh (`raywsl run` records every stage)."""
    cache.write_json(plan.run.stages, {"cache": plan.cache, "stages": {}}, sort_keys=False)
    cache.remove(plan.run.metrics)
