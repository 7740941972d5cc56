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
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from evr1.config import ConfigError, LaunchConfig

log = logging.getLogger("evr1.pipeline")


def slurm_available() -> bool:
    """sbatch is on PATH and a Slurm controller answers.

    Slurm's client commands alone (a workstation with slurm-wlm installed but no cluster
    running, e.g. after ``tools/local_slurm.sh stop``) must not send ``auto`` to Slurm.
    """
    if shutil.which("sbatch") is None:
        return False
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    if ping.returncode != 0:
        log.warning("sbatch is on PATH but no Slurm controller answers `scontrol ping`")
    return ping.returncode == 0


def resolve_cluster(launch: LaunchConfig) -> str:
    if launch.cluster == "auto":
        return "slurm" if slurm_available() else "local"
    if launch.cluster == "slurm" and not slurm_available():
        raise ConfigError("launch.cluster=slurm but no Slurm here (no `sbatch` on PATH, or no "
                          "controller answers `scontrol ping`); use launch.cluster=local or auto")
    return launch.cluster


def dependency(after: Iterable[str]) -> str:
    """sbatch's ``--dependency``: start only when every job in ``after`` ended successfully.

    An array task id ``123_4`` stands for its whole array ``123`` (afterok on an array waits
    for all of its tasks), which keeps the option short for arrays of thousands of tasks.
    """
    ids = sorted({job_id.split("_")[0] for job_id in after}, key=int)
    return "afterok:" + ":".join(ids) if ids else ""


def make_executor(launch: LaunchConfig, folder: Path, name: str, *, nodes: int = 1,
                  tasks_per_node: int = 1, after: Sequence[str] = ()) -> submitit.AutoExecutor:
    """An executor with the site's Slurm settings; the local one ignores the slurm_ keys.

    ``after``: Slurm job ids that must succeed before these jobs start (Slurm only).
    """
    cluster = resolve_cluster(launch)
    if after and cluster != "slurm":
        raise ConfigError("job dependencies need Slurm: local jobs run one stage after another")
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params: dict[str, Any] = dict(
        name=name, timeout_min=launch.time_min, nodes=nodes, tasks_per_node=tasks_per_node,
        cpus_per_task=launch.cpus_per_task, gpus_per_node=launch.gpus_per_node)
    if cluster == "slurm":
        extra = dict(launch.sbatch_extra)
        if after:
            extra["dependency"] = dependency(after)
            # If a job it waits for fails, cancel this one instead of leaving it pending forever.
            extra.setdefault("kill_on_invalid_dep", "yes")
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
    outcome = ArrayOutcome(cluster=cluster)
    if not wait:
        outcome.job_ids = [j.job_id for j in submit_array(fn, tasks, launch, folder, name)]
        return outcome
    executor = make_executor(launch, folder, name)
    pending = list(tasks)
    for attempt in range(launch.max_retries + 1):
        if attempt:
            log.warning("%s: retrying tasks %s (attempt %d of %d)", name, pending, attempt + 1,
                        launch.max_retries + 1)
        pending = _run_wave(executor, fn, pending, cluster, launch, outcome)
        if not pending:
            break
    return outcome


def submit_array(fn: Callable[[int], Any], tasks: Sequence[int], launch: LaunchConfig,
                 folder: Path, name: str, after: Sequence[str] = ()) -> list[submitit.Job]:
    """Submit ``fn(task)`` for every task as one Slurm array and return without waiting.

    The array starts once every job in ``after`` has succeeded. No retries: nothing stays to
    watch the tasks; re-running the stage redoes only the unfinished ones.
    """
    _require_slurm(launch)
    return make_executor(launch, folder, name, after=after).map_array(fn, list(tasks))


def submit_job(fn: Callable[[], Any], launch: LaunchConfig, folder: Path, name: str,
               after: Sequence[str] = (), nodes: int = 1,
               tasks_per_node: int = 1) -> submitit.Job:
    """Submit ``fn()`` as one Slurm job that starts once every job in ``after`` has succeeded.

    With several tasks (``nodes`` x ``tasks_per_node``) srun runs ``fn()`` once per task, every
    task with its own SLURM_PROCID (see evr1.pipeline.rendezvous)."""
    _require_slurm(launch)
    return make_executor(launch, folder, name, nodes=nodes, tasks_per_node=tasks_per_node,
                         after=after).submit(fn)


def _require_slurm(launch: LaunchConfig) -> None:
    if resolve_cluster(launch) != "slurm":
        raise ConfigError("submitting without waiting (--no-wait, the pipeline's job chain) "
                          "needs Slurm: local jobs are children of this process")


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

