"""submitit executors: a Slurm job array on a cluster, local processes everywhere else.

Every launcher goes through ``run_array``: the same task function runs as Slurm array tasks
(``sbatch --array=0-N%P``) or as submitit local jobs, with the same retry rule. A task that
failed is resubmitted (up to ``launch.max_retries`` times); tasks that finished are never
redone, because every evr1 task checks its own completion marker first.

submitit serialises the task function and its arguments (a dataclass config and an int) to
hand them to the job; that is control flow, not data: no sample, frame or weight goes through it.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from evr1.config import ConfigError, LaunchConfig

log = logging.getLogger("evr1.launch")


def slurm_available() -> bool:
    return shutil.which("sbatch") is not None


def resolve_cluster(launch: LaunchConfig) -> str:
    if launch.cluster == "auto":
        return "slurm" if slurm_available() else "local"
    if launch.cluster == "slurm" and not slurm_available():
        raise ConfigError("launch.cluster=slurm but no `sbatch` on PATH; use launch.cluster=local "
                          "or auto")
    return launch.cluster


def make_executor(launch: LaunchConfig, folder: Path, name: str, *, nodes: int = 1,
                  tasks_per_node: int = 1) -> submitit.AutoExecutor:
    """An executor with the site's Slurm settings; the local one ignores the slurm_ keys."""
    cluster = resolve_cluster(launch)
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params: dict[str, Any] = dict(
        name=name, timeout_min=launch.time_min, nodes=nodes, tasks_per_node=tasks_per_node,
        cpus_per_task=launch.cpus_per_task, gpus_per_node=launch.gpus_per_node)
    if cluster == "slurm":
        extra = dict(launch.sbatch_extra)
        params.update(mem_gb=launch.mem_gb, slurm_array_parallelism=launch.array_parallelism,
                      slurm_setup=list(launch.setup), slurm_additional_parameters=extra)
        for key in ("partition", "account", "qos"):
            if getattr(launch, key):
                params[f"slurm_{key}"] = getattr(launch, key)
    executor.update_parameters(**params)
    return executor


@dataclass
class ArrayOutcome:
    """What an array run produced: results by task, job ids, and tasks that never succeeded."""

    cluster: str
    job_ids: list[str] = field(default_factory=list)
    results: dict[int, Any] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)


def run_array(fn: Callable[[int], Any], tasks: Sequence[int], launch: LaunchConfig,
              folder: Path, name: str, wait: bool = True) -> ArrayOutcome:
    """Run ``fn(task)`` for every task as one array; retry failures; optionally wait."""
    cluster = resolve_cluster(launch)
    executor = make_executor(launch, folder, name)
    outcome = ArrayOutcome(cluster=cluster)
    if not wait:
        if cluster == "local":
            raise ConfigError("--no-wait needs Slurm: local jobs are children of this process")
        jobs = executor.map_array(fn, list(tasks))
        outcome.job_ids = [j.job_id for j in jobs]
        return outcome
    pending = list(tasks)
    for attempt in range(launch.max_retries + 1):
        if attempt:
            log.warning("%s: retrying tasks %s (attempt %d of %d)", name, pending, attempt + 1,
                        launch.max_retries + 1)
        pending = _run_wave(executor, fn, pending, cluster, launch, outcome)
        if not pending:
            break
    return outcome


def _run_wave(executor: submitit.AutoExecutor, fn: Callable[[int], Any], tasks: list[int],
              cluster: str, launch: LaunchConfig, outcome: ArrayOutcome) -> list[int]:
    """Submit ``tasks``, wait for all, record results; returns the tasks that failed."""
    # Slurm throttles the array itself (`%` parallelism); local jobs would all start at once,
    # so they go in batches no wider than the machine.
    width = len(tasks) if cluster == "slurm" else max(1, min(launch.array_parallelism,
                                                              os.cpu_count() or 1))
    failed = []
    for start in range(0, len(tasks), width):
        batch = tasks[start:start + width]
        jobs = executor.map_array(fn, batch)
        outcome.job_ids += [j.job_id for j in jobs]
        log.info("%s: submitted %d %s task(s): %s", executor.cluster, len(jobs), cluster,
                 ", ".join(j.job_id for j in jobs))
        for task, job in zip(batch, jobs, strict=True):
            try:
                outcome.results[task] = job.result()
                outcome.failed.pop(task, None)
            except Exception as exc:  # the job's own traceback is in its log file
                outcome.failed[task] = f"job {job.job_id}: {_first_line(exc)}"
                log.error("%s task %d failed: %s (log: %s)", cluster, task, _first_line(exc),
                          job.paths.stderr)
                failed.append(task)
    return failed


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__

