"""The task runner of the shard-parallel stages, chosen by ``orchestration.task_runner``.

- ``thread`` (default): a local thread pool of ``max_parallel_tasks``. The shard tasks spend their
  time in Arrow, NumPy, faiss and torch, which release the GIL.
- ``process``: a local process pool of ``max_parallel_tasks`` (Prefect's ProcessPoolTaskRunner).
- ``ray``: Ray through prefect-ray. ``orchestration.ray.address`` names a cluster (``ray://head:10001``
  or ``auto``); without one a local Ray is started with ``max_parallel_tasks`` x ``num_cpus_per_task``
  CPUs. Each task run reserves ``num_cpus_per_task`` CPUs, so a cluster's size sets the parallelism.

Whatever the runner, the tasks take and return only URIs and small records, so nothing large is
pickled between the flow and its tasks.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from unclip.config import OrchestrationConfig


def task_runner(cfg: OrchestrationConfig) -> TaskRunner:
    if cfg.task_runner == "thread":
        return ThreadPoolTaskRunner(max_workers=cfg.max_parallel_tasks)
    if cfg.task_runner == "process":
        return ProcessPoolTaskRunner(max_workers=cfg.max_parallel_tasks)
    from prefect_ray import RayTaskRunner

    init = {"include_dashboard": False, "logging_level": "warning",
            "runtime_env": {"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled",
                                         "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}}}
    if cfg.ray.address is None:
        init["num_cpus"] = max(1, int(cfg.max_parallel_tasks * cfg.ray.num_cpus_per_task))
    return RayTaskRunner(address=cfg.ray.address, init_kwargs=init)


@contextlib.contextmanager
def task_options(cfg: OrchestrationConfig, gpus: float = 0.0) -> Iterator[None]:
    """Per-task resource requests for the runner in use (Ray: CPUs and ``gpus`` GPUs per task run).
    Other runners take no requests."""
    if cfg.task_runner != "ray":
        yield
        return
    from prefect_ray.context import remote_options

    options = {"num_cpus": cfg.ray.num_cpus_per_task}
    if gpus:
        options["num_gpus"] = gpus
    with remote_options(**options):
        yield
