"""Slurm preemption and time limits: stop after the current step, checkpoint, requeue.

Slurm warns a job before it ends it: ``sbatch --signal=B:USR1@300`` sends SIGUSR1 five minutes
before the time limit, ``scancel --signal=USR1`` does the same by hand, and preemption or the
time limit itself send SIGTERM (SIGKILL follows after KillWait). A signal only sets a flag here;
the training loop checks it after each optimiser step, so a step is never cut in half.

What happens next depends on the signal:

- SIGUSR1 / SIGUSR2 ("time is running out"): checkpoint, then ``scontrol requeue`` the job when
  running under Slurm. The requeued job starts again with the same job id and resumes from the
  checkpoint (``train.resume=auto``). submitit warns its jobs with SIGUSR2, sbatch scripts here
  use SIGUSR1.
- SIGTERM: checkpoint and stop, without requeueing. ``scancel`` sends SIGTERM too: a job that
  requeued itself on SIGTERM could never be cancelled. A preemption with PreemptMode=REQUEUE is
  requeued by Slurm itself.

Outside Slurm either signal checkpoints and stops; running the same command again resumes.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from types import FrameType, TracebackType

import torch
import torch.distributed as dist

log = logging.getLogger("evr1.preemption")

REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
STOP_SIGNALS = (signal.SIGTERM,)


class JobRequeued(SystemExit):
    """Raised after ``scontrol requeue``: this process is done, Slurm starts the job again.

    A SystemExit (status 0) so that nothing records the interrupted run as a result: submitit
    writes no result file for it, and a plain sbatch script simply ends.
    """

    def __init__(self, job_id: str, step: int) -> None:
        super().__init__(0)
        self.job_id, self.step = job_id, step

    def __str__(self) -> str:
        return f"job {self.job_id} requeued after step {self.step}"


class PreemptionWatcher:
    """Records the first stop/requeue signal while the ``with`` block runs.

    Handlers are installed on entry and the previous ones restored on exit. Python delivers
    signals to the main thread only; elsewhere the watcher installs nothing and never fires.
    """

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> PreemptionWatcher:
        if threading.current_thread() is not threading.main_thread():
            log.debug("not the main thread: Slurm signals are not watched here")
            return self
        for sig in REQUEUE_SIGNALS + STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:  # the first signal decides; Slurm may send several
            self.received = signal.Signals(signum)
            log.warning("received %s: stopping after the current step", self.received.name)

    @property
    def requested(self) -> bool:
        """True once a signal arrived on this process or, in a distributed job, on any rank."""
        return _any_rank(self.received is not None)

    def stop(self, step: int) -> None:
        """Call after the checkpoint of ``step`` is written: requeue (under Slurm) or return.

        Raises JobRequeued when the job was requeued; returns when the caller should simply
        end the run (a stop signal, or no Slurm job to requeue).
        """
        job_id = slurm_job_id()
        if self.received not in REQUEUE_SIGNALS or not job_id:
            log.warning("stopped after step %d (%s); run the same command again to resume",
                        step, self.received.name if self.received else "a signal on another rank")
            return
        # Logged first: Slurm ends this process (SIGTERM) as soon as the requeue is accepted.
        log.warning("requeueing job %s after step %d; it resumes from that checkpoint", job_id,
                    step)
        if _rank() == 0:  # one requeue per job, not one per process
            requeue(job_id)
        raise JobRequeued(job_id, step)


def slurm_job_id() -> str:
    """This job's id for scontrol (an array task has a job id of its own), or ''."""
    return os.environ.get("SLURM_JOB_ID", "")


def requeue(job_id: str) -> None:
    """Put the job back in the queue; Slurm ends this run of it and starts it again later."""
    # The job must be requeue-able (sbatch --requeue, or JobRequeue=1 on the cluster).
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)


def _rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def _any_rank(flag: bool) -> bool:
    """All ranks must stop after the same step, or the next collective would hang."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
