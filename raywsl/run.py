"""`raywsl run -c CONFIG`: every stage, meshes to report, in one command (and one MLflow run).

    corpus      data.source "corpus:N": N procedural shapes (the cache's corpus artifact)
    ingest      meshes -> samples.zarr                         (Ray Data; shard by shard)
    train-base  the base network, for field types that need one (Ray Train)
    fit         samples -> weights.zarr                        (Ray Data actors; shard by shard)
    recon       fitted fields -> meshes and reconstruction figures
    train       weights -> the denoiser                        (Ray Train)
    sample      denoiser -> new rows and their meshes
    eval        samples vs the held-out split -> figures
    report      report.html (self-contained), in the run folder and MLflow

Each stage reuses its artifact when one with the same fingerprint exists (raywsl/contract.py): a rerun
after a crash, or a run that changes only later settings, does only the missing work, and runs that
share settings share artifacts. Ray starts once for the whole chain. `stages.json` in the run folder
says per stage whether it was reused or computed, how long it took and where its artifact is.
"""

from __future__ import annotations

from typing import Any

from raywsl import contract as C
from raywsl.config import Config
from raywsl.stages import reset_stages, run_stages


def run_all(cfg: Config, plan: C.Plan, restart: bool = False) -> dict[str, Any]:
    """Run every stage of `plan`; returns the run's metrics, stage seconds and the report's path."""
    reset_stages(plan)
    outcomes = run_stages(cfg, plan, plan.stages, restart)
    facts = {k: v for o in outcomes for k, v in o.facts.items()}
    return {"metrics": facts, "stage_seconds": {o.stage: o.seconds for o in outcomes},
            "reused": {o.stage: o.reused for o in outcomes}, "report": plan.run.report}
