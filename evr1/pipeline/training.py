"""The training stage: the trainer as the pipeline builds and runs it (here, or as one
Slurm/submitit job of one or many ranks).

``evr1.train.trainer.Trainer`` is given, rather than building, its parts
(``evr1.train.build.make_trainer_parts``) and what lies above the training layer:
eval-while-training (``evr1.eval.while_training.AsyncEvaluator``, when
``train.async_eval.enabled``; its jobs submitted by ``evr1.pipeline.checkpoint_eval``) and the
Slurm preemption watcher (``evr1.pipeline.preemption``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

from evr1.config import Config, ConfigError
from evr1.eval.while_training import AsyncEvaluator
from evr1.models.loading import ensure_model
from evr1.models.preflight import preflight_training
from evr1.pipeline import rendezvous
from evr1.pipeline.checkpoint_eval import EvalJobs
from evr1.pipeline.executor import resolve_cluster, run_array, submit_job
from evr1.pipeline.preemption import PreemptionWatcher
from evr1.train.build import trainer_from_config
from evr1.train.sft import grpo_config_after_sft, run_sft
from evr1.train.trainer import Trainer

# The exit status of a training stage that a stop signal ended before its last step (its
# checkpoint saved): not 0, so that a local pipeline does not go on to evaluate it as final.
STOPPED = 3


def build_trainer(cfg: Config) -> Trainer:
    """The trainer with the configured checkpoint hook and Slurm's stop signals."""
    hook = None
    if cfg.train.async_eval.enabled:
        hook = functools.partial(AsyncEvaluator, cfg, jobs=EvalJobs(cfg))
    return trainer_from_config(cfg, checkpoint_hook=hook, stop_signals=PreemptionWatcher)


def train_on_this_rank(cfg: Config) -> dict:
    """The training job body (runs inside the submitted job, once per rank, or in this
    process)."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and rendezvous.export_from_slurm():
        print(rendezvous.describe_rank(), flush=True)  # a multi-node submitit job: one per rank
    # Every prompt fits max_prompt_length and the context, or PreflightError names the samples.
    budget = preflight_training(cfg, ensure_model(cfg))
    if os.environ.get("RANK", "0") == "0":
        print(budget.summary(), flush=True)
    sft = None
    if cfg.train.sft.enabled:  # cold-start SFT first; GRPO then starts from its model
        sft = run_sft(cfg, stop_signals=PreemptionWatcher)
        sft_summary = {"steps": sft.steps, "before": sft.before, "after": sft.after,
                       "checkpoint": sft.checkpoint}
        if sft.steps < cfg.train.sft.steps:  # a stop signal: GRPO has no SFT model to start
            return {"steps": 0, "total_steps": cfg.train.steps, "before": {}, "after": {},
                    "checkpoint": None, "stopped": "sft", "sft": sft_summary}
        cfg = grpo_config_after_sft(cfg)
    result = build_trainer(cfg).run()
    return {"steps": result.steps, "total_steps": cfg.train.steps, "before": result.before,
            "after": result.after, "checkpoint": result.checkpoint,
            "stopped": "grpo" if result.steps < cfg.train.steps else None,
            "sft": None if sft is None else sft_summary}


def train_and_wait(cfg: Config, submit: bool = False) -> int:
    """Train here (``submit=False``) or as a submitted job (Slurm, or a local submitit job),
    wait for it, print the summary; the exit status."""
    if submit and cfg.launch.train_ranks > 1:
        result = _multinode_training(cfg)
        if result is None:
            return 1
    elif submit:
        outcome = run_array(lambda _: train_on_this_rank(cfg), [0], cfg.launch,
                            cfg.submitit_dir / "train", name="evr1-train")
        if outcome.failed:
            print(f"training failed: {outcome.failed[0]}")
            return 1
        result = outcome.results[0]
    else:
        result = train_on_this_rank(cfg)
    if result.get("stopped"):
        # A stop signal (SIGTERM, Ctrl-C of a job step) ended training early: its checkpoint is
        # saved, but what follows (eval of `latest`, collect) must not take it for the result.
        if os.environ.get("RANK", "0") == "0":
            stage = result["stopped"]
            done = result["sft"]["steps"] if stage == "sft" else result["steps"]
            total = cfg.train.sft.steps if stage == "sft" else result["total_steps"]
            print(f"training stopped by a signal after {stage.upper()} step {done} of {total}; "
                  "its checkpoint is saved: run the same command again to resume", flush=True)
        return STOPPED
    print_training_summary(result)
    return 0


def _multinode_training(cfg: Config) -> dict | None:
    """One Slurm job of launch.nodes x launch.tasks_per_node ranks; waits; rank 0's result."""
    if resolve_cluster(cfg.launch) != "slurm":
        raise ConfigError(f"launch.nodes={cfg.launch.nodes} x launch.tasks_per_node="
                          f"{cfg.launch.tasks_per_node} ranks need Slurm; on one machine use "
                          "torchrun --nproc-per-node N launchers/train.py")
    job = submit_job(functools.partial(train_on_this_rank, cfg), cfg.launch,
                     cfg.submitit_dir / "train", name="evr1-train", nodes=cfg.launch.nodes,
                     tasks_per_node=cfg.launch.tasks_per_node)
    print(f"train: Slurm job {job.job_id}, {cfg.launch.nodes} node(s) x "
          f"{cfg.launch.tasks_per_node} task(s); logs {job.paths.stdout}", flush=True)
    try:
        return job.results()[0]
    except Exception as exc:  # the ranks' tracebacks are in their log files
        print(f"training failed: job {job.job_id}: {str(exc).strip().splitlines()[-1:]} "
              f"(logs: {job.paths.folder})")
        return None


def submit_training_job(cfg: Config, after: Sequence[str] = ()) -> str:
    """Submit the training job to Slurm (after the jobs in ``after`` succeed); its job id.
    launch.nodes x launch.tasks_per_node ranks (one unless configured)."""
    job = submit_job(functools.partial(train_on_this_rank, cfg), cfg.launch,
                     cfg.submitit_dir / "train", name="evr1-train", after=after,
                     nodes=cfg.launch.nodes,
                     tasks_per_node=cfg.launch.tasks_per_node)
    return job.job_id


def print_training_summary(result: dict) -> None:
    if os.environ.get("RANK", "0") != "0":  # one summary per distributed run
        return
    before, after = result["before"], result["after"]
    sft = result.get("sft")
    if sft:
        print(f"SFT: {sft['steps']} steps; checkpoint {sft['checkpoint']}")
    print(f"training: {result['steps']} steps; checkpoint {result['checkpoint']}")
    columns = [("before", before), ("after", after)]
    if sft:  # start (before SFT) | after SFT (= GRPO's start) | after GRPO
        columns = [("start", sft["before"]), ("SFT", sft["after"] or before),
                   ("SFT+GRPO", after)]
    keys = sorted({k for _, c in columns for k in c if k.startswith("accuracy")})
    for key in keys:
        print(f"  held-out {key:<28} " + "  ".join(
            f"{name} {values.get(key, float('nan')):.3f}" for name, values in columns))
