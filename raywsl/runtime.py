"""Starting and stopping Ray: the embedded local default, or a cluster.

One place decides how raywsl talks to Ray, so the CLI, the jobs and the tests start it the same way.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger(__name__)

# On a 2-core laptop an actor pool or a Train worker can take every CPU and starve Ray Data's read
# tasks: a silent hang. Declaring more logical CPUs than cores (oversubscription) keeps a free slot.
LOCAL_CPU_OVERSUBSCRIPTION = 2
LOCAL_OBJECT_STORE_BYTES = 512 * 1024**2


_started_local = False


def local_num_cpus() -> int:
    return max(4, LOCAL_CPU_OVERSUBSCRIPTION * (os.cpu_count() or 1))


@contextmanager
def ray_session(address: str = "", num_cpus: int | None = None) -> Iterator[None]:
    """Use the running Ray if there is one; else connect to `address` / $RAY_ADDRESS; else start a
    local Ray sized for this machine. Shuts down only what it started."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    global _started_local
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # token auth only gets in the way locally
        ray.init(
            address="local",
            num_cpus=num_cpus or local_num_cpus(),
            include_dashboard=False,
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            log_to_driver=True,
        )
        _started_local = True
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = True
    try:
        yield
    finally:
        _started_local = False
        ray.shutdown()


def task_concurrency() -> int | None:
    """How many CPU tasks a Ray Data stage may run at once: the real core count on the embedded
    local Ray (its logical CPUs are oversubscribed on purpose), unbounded on a cluster."""
    return (os.cpu_count() or 1) if _started_local else None


def fit_torch_trainer(loop, config: dict, *, dataset, name: str, storage: str, workers: int, use_gpu: bool):
    """Run `loop` under Ray Train (DDP; gloo on CPU, nccl on GPU) with `dataset` as its "train" shard
    source. The run lives in storage/name: calling again with the same name resumes from its latest
    checkpoint (the last two are kept; a crashed worker group is restarted twice). Raises the
    training error, else returns Ray Train's Result."""
    import ray.train
    from ray.train.torch import TorchTrainer

    result = TorchTrainer(
        loop, train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(name=name, storage_path=storage,
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                                       failure_config=ray.train.FailureConfig(max_failures=2)),
        datasets={"train": dataset}).fit()
    if result.error:
        raise result.error
    return result


def keep_final(result, folder: str) -> None:
    """Copy the last checkpoint of a Ray Train result to `folder` (replacing what was there)."""
    import shutil

    with result.checkpoint.as_directory() as src:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(src, folder)

