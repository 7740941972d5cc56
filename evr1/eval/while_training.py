"""Benchmark evaluation of checkpoints while training goes on.

``AsyncEvaluator`` is the trainer's checkpoint hook (``evr1.train.hooks.CheckpointHook``).
When the trainer has written checkpoint ``step-N`` it calls ``on_save``, which (every
``async_eval.every`` steps) gives the checkpoint an eval folder ``<eval.out_dir>/steps/step-N/``
(its own eval config, predictions, results) and a lease (``evr1.leases.take_lease``: pruning
will not delete a checkpoint that an eval job still reads), then

- on Slurm submits the eval array for that checkpoint and one collect job that waits for it
  (``--dependency=afterok``), through the same submitit helpers as ``launchers/eval.py``;
- without Slurm starts a local background process (``python -m evr1.pipeline.checkpoint_eval
  DIR``)
  that runs the eval tasks and the collector one after another, with ``threads`` torch
  threads. At most ``max_concurrent`` run at once; a checkpoint that finds every slot busy is
  queued (its lease is taken at once) or skipped (``when_full``), and the log says which.

How jobs are submitted and what the local process runs is the pipeline's business: the
evaluator is given a :class:`EvalJobs` (``evr1.pipeline.checkpoint_eval.EvalJobs``), so this
module needs nothing above ``evr1.eval``.

The trainer does not wait: ``poll`` (every step, non-blocking) looks for finished jobs and logs
their scores to the run's metrics keyed by the checkpoint's step (``kind: checkpoint_eval``). A
job that failed is logged the same way with ``status: failed`` and the reason; training goes
on. After the last step ``finish`` submits the full suite on the final checkpoint and waits
for what is still running (local jobs always; Slurm jobs with ``wait_at_end``). A resumed
trainer logs the results that arrived while it was away and keeps watching what still runs.

Files in each checkpoint's eval folder: ``config.yaml`` (the eval config), ``request.json``
(step, suite, how it was run, job ids), ``status.json`` (``running`` / ``done`` / ``failed``
with times and the error), ``job.log`` (local jobs), and the collector's ``results.json``,
``results.md``, ``results.png``. ``evr1.eval.leaderboard`` reads them all.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from evr1 import runs
from evr1.config import AsyncEvalConfig, Config, EvalBenchmarkConfig, dump_config
from evr1.eval.leaderboard import read_entry
from evr1.eval.plan import eval_dir
from evr1.files import atomic_write_json
from evr1.leases import release_lease, take_lease
from evr1.train.metrics import MetricsLogger, read_metrics

log = logging.getLogger("evr1.train")

SLURM_POLL_S = 10.0  # squeue at most this often while Slurm jobs are outstanding


# --------------------------------------------------------------------------- files


def steps_dir(cfg: Config) -> Path:
    return runs.checkpoint_evals_dir(eval_dir(cfg))


def job_label(step: int, full: bool) -> str:
    return f"step-{step:08d}" + ("-full" if full else "")


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_status(out_dir: Path, state: str, **fields: Any) -> None:
    status = {**read_json(out_dir / "status.json"), "state": state, **fields}
    atomic_write_json(out_dir / "status.json", status)


def checkpoint_eval_config(cfg: Config, checkpoint: Path, out_dir: Path, full: bool) -> Config:
    """The eval config for one checkpoint: the quick suite (``async_eval.benchmarks`` capped at
    ``max_samples`` each) or, with ``full``, every configured benchmark. Frame caches stay
    where ``launchers/eval.py --preprocess`` put them (the run's eval folder)."""
    ae = cfg.train.async_eval
    main = eval_dir(cfg)
    chosen = []
    for entry in cfg.eval.benchmarks or [EvalBenchmarkConfig(name="synthetic")]:
        alias = entry.alias or entry.name
        if not full and ae.benchmarks and alias not in ae.benchmarks:
            continue
        limit = entry.limit
        if not full and ae.max_samples:
            limit = min(limit, ae.max_samples) if limit else ae.max_samples
        shard_dir = entry.shard_dir or ("" if entry.name == "synthetic"
                                        else str(main / "shards" / alias))
        chosen.append(dataclasses.replace(entry, alias=alias, limit=limit, shard_dir=shard_dir))
    ev = dataclasses.replace(cfg.eval, benchmarks=chosen, models=[str(checkpoint / "model")],
                             out_dir=str(out_dir),
                             num_shards=cfg.eval.num_shards if full else ae.num_shards)
    train = dataclasses.replace(cfg.train, async_eval=AsyncEvalConfig())
    launch = dataclasses.replace(cfg.launch, max_retries=0, log_dir=str(out_dir / "submitit"))
    return dataclasses.replace(cfg, eval=ev, train=train, launch=launch)


# --------------------------------------------------------------------------- the jobs


class EvalJobs(Protocol):
    """How checkpoint evaluations run: ``cluster`` is ``slurm`` or ``local``."""

    cluster: str

    def submit(self, sub: Config, out_dir: Path) -> tuple[list[str], str]:
        """Slurm: the eval array of config ``sub`` and a collect job after it (afterok);
        returns (the array's job ids, the collect job's id)."""
        ...

    def local_command(self, out_dir: Path) -> list[str]:
        """The command of a local background job that evaluates ``out_dir``'s config."""
        ...


# --------------------------------------------------------------------------- the trainer side


@dataclass
class Job:
    step: int
    label: str
    out_dir: Path
    lease: Path
    backend: str = "local"
    proc: subprocess.Popen | None = None
    pid: int | None = None  # a local job a previous trainer process started
    slurm_jobs: list[str] = field(default_factory=list)


class AsyncEvaluator:
    """Submits checkpoint evaluations and logs their results as they arrive."""

    def __init__(self, cfg: Config, metrics: MetricsLogger, jobs: EvalJobs) -> None:
        self.cfg = cfg
        self.ae = cfg.train.async_eval
        self.metrics = metrics
        self.jobs = jobs
        self.cluster = jobs.cluster
        self.root = steps_dir(cfg)
        self.running: list[Job] = []
        self.queued: deque[Job] = deque()
        self._last_squeue = 0.0
        self.scores: dict[int, float] = {}  # quick-suite score (best_metric) per step
        self._catch_up()

    @property
    def outstanding(self) -> int:
        return len(self.running) + len(self.queued)

    def wants(self, step: int) -> bool:
        return self.ae.every == 0 or step % self.ae.every == 0

    def on_save(self, step: int, checkpoint: Path) -> None:
        """The hook's side: evaluate ``checkpoint`` if ``async_eval.every`` wants its step."""
        if self.wants(step):
            self.submit(step, checkpoint)

    # ------------------------------------------------------------------ submission

    def submit(self, step: int, checkpoint: Path, full: bool = False) -> None:
        label = job_label(step, full)
        out_dir = self.root / label
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("status.json", "results.json"):  # a re-run of the same step
            (out_dir / stale).unlink(missing_ok=True)
        sub = checkpoint_eval_config(self.cfg, checkpoint, out_dir, full)
        dump_config(sub, out_dir / runs.CONFIG)
        request = {"step": step, "label": label, "suite": "full" if full else "quick",
                   "checkpoint": str(checkpoint), "backend": self.cluster,
                   "benchmarks": [b.alias for b in sub.eval.benchmarks],
                   "submitted_at": time.time(), "submitted_at_step": self.metrics.last_step}
        if self.cluster == "local" and len(self.running) >= self.ae.max_concurrent \
                and self.ae.when_full == "skip" and not full:
            atomic_write_json(out_dir / "request.json", {**request, "skipped": True})
            write_status(out_dir, "skipped", error=f"{len(self.running)} local eval job(s) "
                         f"already running (async_eval.max_concurrent={self.ae.max_concurrent})")
            log.warning("checkpoint eval %s skipped: %d local job(s) already running "
                        "(train.async_eval.when_full=skip)", label, len(self.running))
            self._log_outcome(step, label, out_dir)
            return
        lease = take_lease(checkpoint, f"eval-{label}", pid=os.getpid())
        request["lease"] = str(lease)
        atomic_write_json(out_dir / "request.json", request)
        job = Job(step, label, out_dir, lease, self.cluster)
        if self.cluster == "slurm":
            self._submit_slurm(job, sub, request)
        elif len(self.running) < self.ae.max_concurrent:
            self._start_local(job)
        else:
            self.queued.append(job)
            log.info("checkpoint eval %s queued: %d local job(s) running "
                     "(train.async_eval.max_concurrent=%d)", label, len(self.running),
                     self.ae.max_concurrent)

    def _submit_slurm(self, job: Job, sub: Config, request: dict[str, Any]) -> None:
        try:
            array, collect = self.jobs.submit(sub, job.out_dir)
        except Exception as exc:  # e.g. a benchmark that does not prepare: report, train on
            write_status(job.out_dir, "failed", finished_at=time.time(),
                         error=f"submission: {type(exc).__name__}: {exc}")
            self._done(job)
            return
        job.slurm_jobs = sorted({j.split("_")[0] for j in array}) + [collect]
        take_lease(Path(request["checkpoint"]), f"eval-{job.label}",
                        slurm_jobs=job.slurm_jobs)
        atomic_write_json(job.out_dir / "request.json",
                          {**request, "eval_jobs": array, "collect_job": collect})
        self.running.append(job)
        log.info("checkpoint eval %s: Slurm eval array %s, collect job %s (afterok)",
                 job.label, " ".join(array), collect)

    def _start_local(self, job: Job) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(self.ae.threads),
               "PYTHONPATH": os.pathsep.join(
                   [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
        with open(job.out_dir / "job.log", "ab") as out:
            job.proc = subprocess.Popen(self.jobs.local_command(job.out_dir), stdout=out,
                                        stderr=subprocess.STDOUT, env=env,
                                        stdin=subprocess.DEVNULL)
        # Running from the moment it is started: the job's own imports take a while on a busy
        # machine, and the job keeps this started_at when it writes its status.
        write_status(job.out_dir, "running", started_at=time.time(), pid=job.proc.pid,
                     host=socket.gethostname())
        take_lease(Path(read_json(job.out_dir / "request.json")["checkpoint"]),
                        f"eval-{job.label}", pid=job.proc.pid)
        self.running.append(job)
        log.info("checkpoint eval %s: local job, pid %d, log %s", job.label, job.proc.pid,
                 job.out_dir / "job.log")

    # ------------------------------------------------------------------ results

    def poll(self) -> None:
        """Log what has finished and start what is queued; never waits."""
        check_slurm = any(j.backend == "slurm" for j in self.running) and \
            time.monotonic() - self._last_squeue >= SLURM_POLL_S
        alive = self._squeue([j for j in self.running if j.backend == "slurm"]) \
            if check_slurm else None
        for job in list(self.running):
            state = read_json(job.out_dir / "status.json").get("state")
            if job.pid is not None:
                if _pid_alive({"pid": job.pid, "host": socket.gethostname()}):
                    continue
                state = read_json(job.out_dir / "status.json").get("state")
                if state not in ("done", "failed"):
                    write_status(job.out_dir, "failed", finished_at=time.time(),
                                 error=f"local job {job.pid} ended without results")
            elif job.proc is not None:
                code = job.proc.poll()
                if code is None:
                    continue
                if state not in ("done", "failed"):
                    tail = log_tail(job.out_dir / "job.log")
                    write_status(job.out_dir, "failed", finished_at=time.time(),
                                 error=f"local job exited with status {code}: {tail}")
            elif state not in ("done", "failed"):
                if alive is None or any(i in alive for i in job.slurm_jobs):
                    continue
                state = read_json(job.out_dir / "status.json").get("state")  # may just be done
                if state not in ("done", "failed"):
                    write_status(job.out_dir, "failed", finished_at=time.time(), error=(
                        "the Slurm jobs ended without results (a failed eval task cancels the "
                        f"collect job); logs in {job.out_dir / 'submitit'}"))
            self.running.remove(job)
            self._done(job)
        while self.queued and len(self.running) < self.ae.max_concurrent:
            self._start_local(self.queued.popleft())

    def _squeue(self, jobs: list[Job]) -> set[str] | None:
        """Job ids still pending or running, or None when Slurm does not answer."""
        self._last_squeue = time.monotonic()
        ids = [i for j in jobs for i in j.slurm_jobs]
        try:
            out = subprocess.run(["squeue", "-h", "-o", "%A %i", "-j", ",".join(ids)],
                                 capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if out.returncode != 0 and "Invalid job id" not in out.stderr:
            return None
        # %i of an array task is 123_4: its array id is the part before "_".
        return {part.split("_")[0] for part in out.stdout.split()}

    def _done(self, job: Job) -> None:
        release_lease(job.lease)
        self._log_outcome(job.step, job.label, job.out_dir)

    def _log_outcome(self, step: int, label: str, out_dir: Path) -> None:
        entry = read_entry(out_dir)
        record: dict[str, Any] = {"label": label, "suite": entry.suite, "status": entry.status}
        if entry.status == "done":
            record.update({f"score/{b}": s for b, s in entry.scores.items() if s is not None})
            if entry.average is not None:
                record["score/average"] = entry.average
            if entry.suite == "quick":
                metric = self.ae.best_metric
                value = entry.average if metric == "average" else entry.scores.get(metric)
                if value is not None:
                    self.scores[step] = value
        else:
            record["failed"] = 1
            record["error"] = entry.error
            log.error("checkpoint eval %s %s: %s", label, entry.status, entry.error)
        if entry.seconds is not None:
            record["eval_seconds"] = round(entry.seconds, 1)
        self.metrics.log_checkpoint_eval(step, record)

    def _catch_up(self) -> None:
        """After a resume: log results that arrived meanwhile; watch what still runs."""
        if not self.root.is_dir():
            return
        logged = {r.get("label") for r in read_metrics(Path(self.cfg.run_dir), "checkpoint_eval")}
        for out_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            request = read_json(out_dir / "request.json")
            if not request or request["label"] in logged:
                continue
            state = read_json(out_dir / "status.json").get("state")
            job = Job(request["step"], request["label"], out_dir, Path(request.get("lease", "")),
                      request["backend"])
            if state in ("done", "failed", "skipped"):
                self._log_outcome(job.step, job.label, out_dir)
            elif request["backend"] == "slurm" and request.get("collect_job"):
                job.slurm_jobs = sorted({j.split("_")[0] for j in request["eval_jobs"]}) + \
                    [request["collect_job"]]
                self.running.append(job)
            elif state == "running" and _pid_alive(read_json(out_dir / "status.json")):
                job.pid = read_json(out_dir / "status.json")["pid"]  # orphaned, still going
                self.running.append(job)
            elif state is None and request["backend"] == "local" and \
                    (Path(request["checkpoint"]) / "meta.json").is_file():
                take_lease(Path(request["checkpoint"]), f"eval-{job.label}",
                                pid=os.getpid())
                self.queued.append(job)  # queued when the trainer stopped: start it now
            else:
                write_status(out_dir, "failed", finished_at=time.time(),
                             error="the trainer stopped before this job ended or started")
                self._done(job)

    # ------------------------------------------------------------------ the end

    def finish(self, step: int, checkpoint: Path | None, wait: bool) -> None:
        """After the last step: the full suite on the final checkpoint, then (``wait``) wait."""
        if checkpoint is not None and self.ae.final_full_suite:
            self.submit(step, checkpoint, full=True)
        if not wait or (self.cluster == "slurm" and not self.ae.wait_at_end):
            if self.outstanding:
                log.info("%d checkpoint eval job(s) still running; their results go to %s "
                         "(python launchers/collect.py --leaderboard %s)", self.outstanding,
                         self.root, self.cfg.run_dir)
            return
        if self.outstanding:
            log.info("waiting for %d checkpoint eval job(s)", self.outstanding)
        while self.outstanding:
            self.poll()
            if self.outstanding:
                time.sleep(1.0)


def _pid_alive(status: dict[str, Any]) -> bool:
    if status.get("host") != socket.gethostname() or not status.get("pid"):
        return False
    try:
        os.kill(int(status["pid"]), 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return f"no log at {path}"
    return " | ".join(text[-lines:]) + f" (log: {path})"
