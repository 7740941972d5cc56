"""The job side of eval-while-training: how a checkpoint's evaluation is submitted and run.

``evr1.eval.while_training.AsyncEvaluator`` (the trainer's checkpoint hook) decides what to
evaluate and when, and records the outcome; it is given an :class:`EvalJobs` from here for the
two things that need the pipeline's stages and executors:

- on Slurm, ``submit``: the eval array (``stages.submit_eval``) and one collect job after it
  (``--dependency=afterok``) whose body is :func:`finish_checkpoint_eval`;
- locally, ``local_command``: ``python -m evr1.pipeline.checkpoint_eval DIR``, a background
  process running :func:`run_checkpoint_eval` (every eval task here, then the collector).
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import sys
import time
from pathlib import Path

from evr1.config import Config, load_config
from evr1.eval.while_training import log_tail, read_json, write_status
from evr1.leases import release_lease
from evr1.pipeline.executor import resolve_cluster, submit_job
from evr1.pipeline.stages import collect_results, run_evaluation, submit_eval


class EvalJobs:
    """``evr1.eval.while_training.EvalJobs`` for the cluster ``launch`` resolves to."""

    def __init__(self, cfg: Config) -> None:
        self.cluster = resolve_cluster(cfg.launch)

    def submit(self, sub: Config, out_dir: Path) -> tuple[list[str], str]:
        array = submit_eval(sub)
        collect = submit_job(functools.partial(finish_checkpoint_eval, str(out_dir)),
                             sub.launch, sub.submitit_dir / "collect", name="evr1-collect",
                             after=array).job_id
        return array, collect

    def local_command(self, out_dir: Path) -> list[str]:
        return local_command(out_dir)


def local_command(out_dir: Path) -> list[str]:
    return [sys.executable, "-m", "evr1.pipeline.checkpoint_eval", str(out_dir)]


def finish_checkpoint_eval(out_dir: str) -> int:
    """Collect one checkpoint's predictions, record the outcome, give the lease back.

    The local job's last step, and the Slurm collect job's body."""
    folder = Path(out_dir)
    request = read_json(folder / "request.json")
    try:
        status = collect_results(load_config(folder / "config.yaml"))
        if status:
            write_status(folder, "failed", finished_at=time.time(),
                         error="the collector found missing shards (an eval task failed)")
        else:
            write_status(folder, "done", finished_at=time.time())
        return status
    except Exception as exc:
        write_status(folder, "failed", finished_at=time.time(),
                     error=f"collect: {type(exc).__name__}: {exc}")
        raise
    finally:
        if request.get("lease"):
            release_lease(request["lease"])


def run_checkpoint_eval(out_dir: str) -> int:
    """A local background job: every eval task of one checkpoint here, then the collector."""
    folder = Path(out_dir)
    request = read_json(folder / "request.json")
    started = read_json(folder / "status.json").get("started_at") or time.time()  # by the trainer
    write_status(folder, "running", started_at=started, pid=os.getpid(), host=socket.gethostname())
    try:
        if run_evaluation(load_config(folder / "config.yaml"), submit=False):
            sys.stdout.flush()  # what it printed is the reason: job.log is our stdout
            write_status(folder, "failed", finished_at=time.time(),
                         error=f"evaluation failed: {log_tail(folder / 'job.log', 1)}")
            return 1
    except Exception as exc:
        write_status(folder, "failed", finished_at=time.time(),
                     error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if read_json(folder / "status.json").get("state") == "failed" and request.get("lease"):
            release_lease(request["lease"])
    return finish_checkpoint_eval(out_dir)


if __name__ == "__main__":  # the local background job: python -m evr1.pipeline.checkpoint_eval DIR
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s "
                        "%(message)s", datefmt="%H:%M:%S")
    sys.exit(run_checkpoint_eval(sys.argv[1]))
