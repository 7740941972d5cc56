"""The GRPO training loop: rollout -> reward -> (offline mix) -> advantages -> update.

Short enough to read whole. The pieces it wires together live elsewhere: prompts over shards
(``evr1.data.dataset``), the rollout engine (``evr1.rollout``), rewards (``evr1.rewards``),
group handling (``evr1.train.groups``), the GRPO math (``evr1.train.grpo``), the training
backend (``evr1.train.backends``) and checkpoints (``evr1.train.checkpoint``).
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from evr1 import runs
from evr1.config import Config, dump_config
from evr1.data.dataset import PromptSampler, PromptSet
from evr1.models.inputs import stop_token_ids
from evr1.rollout.base import RolloutEngine, SamplingParams
from evr1.train import checkpoint as ckpt
from evr1.train.backends.base import TrainingBackend
from evr1.train.batch import make_policy_batches
from evr1.train.groups import (
    Collected,
    Groups,
    collect_groups,
    fill_policy_batches,
    groups_to_mix,
    offline_response_ids,
    score_responses,
)
from evr1.train.grpo import compute_advantages, overlong_reward
from evr1.train.heldout import HeldoutScore, score_heldout, summarize_heldout
from evr1.train.hooks import CheckpointHook, CheckpointHookFactory, NoStopSignals, StopSignals
from evr1.train.metrics import MetricsLogger, read_metrics, rewind_logs
from evr1.train.plots import plot_runs
from evr1.train.replicas import (
    Replicas,
    Tally,
    check_replicas_agree,
    gather_json,
    rollout_digest,
    step_seed,
)

log = logging.getLogger("evr1.train")

# Files that make a checkpoint's model/ folder loadable on its own (tokenizer, processor).
_PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "processor_config.json",
                    "chat_template.jinja", "preprocessor_config.json",
                    "video_preprocessor_config.json", "special_tokens_map.json")


@dataclass
class StepResult:
    """What one training step returns: its metrics (metrics.jsonl) and the sampled texts of
    its first groups (completions.jsonl)."""

    metrics: dict[str, Any]
    completions: list[dict[str, Any]]


@dataclass
class TrainResult:
    steps: int
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    checkpoint: str = ""


def _no_op() -> None:
    pass


@dataclass
class TrainerParts:
    """What the trainer is given besides its config, built from the config by
    ``evr1.train.build.make_trainer_parts``: the prompts (``heldout``: None without
    ``data.eval_jsonl``), the model folder and processor, the HF model (shared by the hf
    backend and the hf rollout engine), the training backend, this rank's data-parallel
    replica and the rollout engine."""

    train_set: PromptSet
    heldout: PromptSet | None
    model_dir: Path
    processor: Any
    model: torch.nn.Module | None  # None when neither the backend nor the engine needs it
    backend: TrainingBackend
    replicas: Replicas
    engine: RolloutEngine


class Trainer:
    """The loop over one run's steps. Given, besides the config: ``parts`` (data, model,
    backend, rollout engine: :class:`TrainerParts`), ``checkpoint_hook``, called with the
    metrics logger to make the hook told about each checkpoint (eval-while-training), and
    ``stop_signals``, the context that asks to stop after a step (Slurm preemption). The two
    last default to nothing. ``evr1.train.build.trainer_from_config`` builds one in one call;
    ``evr1.pipeline.training.build_trainer`` gives the configured hook and stop signals."""

    def __init__(self, cfg: Config, parts: TrainerParts, *,
                 checkpoint_hook: CheckpointHookFactory | None = None,
                 stop_signals: Callable[[], StopSignals] = NoStopSignals) -> None:
        self.cfg = cfg
        self.stop_signals = stop_signals
        self.run_dir = Path(cfg.run_dir)
        self.train_set, self.heldout = parts.train_set, parts.heldout
        self.model_dir, self.processor, self.model = parts.model_dir, parts.processor, parts.model
        self.backend, self.replicas, self.engine = parts.backend, parts.replicas, parts.engine
        # Rank 0 alone logs and writes.
        self.is_main = not dist.is_initialized() or dist.get_rank() == 0
        self.sampler = PromptSampler(len(self.train_set), cfg.seed,
                                     replicas=self.replicas.count, replica=self.replicas.index)
        self.state = ckpt.TrainerState()
        self.stop_id = stop_token_ids(self.processor.tokenizer)[0]
        self.pad_id = self.processor.tokenizer.pad_token_id or self.stop_id
        self.metrics = MetricsLogger(self.run_dir, cfg.train.wandb_mode, cfg.train.wandb_project,
                                     asdict(cfg), enabled=self.is_main)
        # Benchmark eval of checkpoints as background/Slurm jobs (rank 0 submits and collects).
        self.checkpoint_hook: CheckpointHook | None = checkpoint_hook(self.metrics) \
            if checkpoint_hook is not None and self.is_main else None
        # Seeded last: the sampling stream must not depend on what set-up did (building the
        # tiny model draws random numbers; loading it does not).
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)

    # ------------------------------------------------------------------ the loop

    def run(self, stop_after: int = 0) -> TrainResult:
        """Train to ``train.steps`` (or ``stop_after`` more steps), resuming if configured."""
        self.resume()
        dump_config(self.cfg, self.run_dir / runs.CONFIG)
        result = TrainResult(steps=self.state.step)
        # A resumed run reports the figures its first start logged at step 0 and, when it was
        # already complete, those of its last step: evaluating again would log a second row.
        complete = self.state.step >= self.cfg.train.steps
        result.before = self.evaluate() if self.state.step == 0 else self._logged_heldout(0)
        last = self.cfg.train.steps
        if stop_after > 0:
            last = min(last, self.state.step + stop_after)
        stopped = False
        with self.stop_signals() as preemption:  # Slurm's SIGUSR1/SIGTERM (pipeline/preemption.py)
            while self.state.step < last and not stopped:
                step = self.train_step()
                self.state.step += 1
                if self.state.step % self.cfg.train.log_every == 0:
                    self.metrics.log(self.state.step, step.metrics)
                    self.metrics.log_completions(self.state.step, step.completions)
                if self.checkpoint_hook:
                    self.checkpoint_hook.poll()  # logs finished checkpoint evals; never waits
                every = self.cfg.train.eval_every
                if every and self.state.step % every == 0 and \
                        self.state.step < self.cfg.train.steps:
                    self.evaluate()
                stopped = preemption.requested  # asked once per step: every rank agrees
                if stopped or self.state.step % self.cfg.train.save_every == 0 or \
                        self.state.step == last:
                    result.checkpoint = str(self.save())
                    if self.checkpoint_hook:
                        self.checkpoint_hook.on_save(self.state.step, Path(result.checkpoint))
        result.steps = self.state.step
        if self.checkpoint_hook:
            done = self.state.step >= self.cfg.train.steps
            self.checkpoint_hook.finish(self.state.step, Path(result.checkpoint) if done and
                                   result.checkpoint else None, wait=done)
            self.prune()  # now that the scores are in
        if self.state.step >= self.cfg.train.steps:
            logged = self._logged_heldout(self.state.step) if complete else {}
            result.after = logged or self.evaluate()
            task = self.cfg.data.include_tasks[0] if self.cfg.data.include_tasks else ""
            if self.is_main:
                plot_runs({self.run_dir.name: self.run_dir}, self.run_dir / runs.LEARNING_CURVE,
                          task)
        self.metrics.close()
        if stopped and self.state.step < self.cfg.train.steps:
            preemption.stop(self.state.step)  # under Slurm: requeues, raises JobRequeued
        return result

    def train_step(self) -> StepResult:
        """One GRPO step over every data-parallel replica's share (this rank's replica rolls
        out its own): its metrics, and ``completions``, the records of each replica's first
        ``train.log_completions`` groups (sampled texts, rewards, advantages)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        collected = self._collect()
        group = collected.train
        advantages = compute_advantages(group.grouped(group.scores.overall),
                                        estimator=cfg.train.grpo.estimator,
                                        eps=cfg.train.grpo.eps).view(-1)
        # train.overlong=mask: truncated responses stay in their group's baseline, not the loss
        rows = [r for r in range(len(group.responses))
                if not (cfg.train.overlong == "mask" and group.truncated[r])]
        if sum(gather_json(len(rows), self.replicas)):  # one update over every replica's rows
            batches = make_policy_batches(self.processor, group.prompts, group.n,
                                          group.responses, rows, cfg.train.micro_batch_size,
                                          self.pad_id)
            fill_policy_batches(batches, group, advantages)
            self.engine.sleep()  # colocated engines free their memory for the update
            update = self.backend.train_step(batches, cfg.train.grpo)
            self.sync_engine()
            self.engine.wake_up()
        else:  # nothing to train on: the lr schedule still follows the step counter
            update = self.backend.skip_update()
        times = dict(collected.drawn.times, time_step=time.perf_counter() - t0)
        return StepResult(self._step_metrics(collected, len(rows), update, times),
                          self._completion_records(group, advantages))

    def sync_engine(self) -> None:
        """Hand the backend's weights to the rollout engine (collective, like the backend's
        gathers): each rank's own tensor-parallel shards where the engine holds the same split
        (megatron + vLLM per replica: nothing crosses ranks), else whole tensors."""
        shards = self.backend.weight_shards() if self.engine.takes_weight_shards else None
        self.engine.sync_weights(shards if shards is not None
                                 else self.backend.named_hf_weights())

    def _collect(self) -> Collected:
        """This replica's groups of the step (``collect_groups``: filtering, dynamic
        sampling), the same on every rank of the replica (checked)."""
        cfg = self.cfg
        collected = collect_groups(self._draw_groups, self._share(),
                                   filter_no_signal=cfg.train.filter_no_signal,
                                   dynamic=cfg.train.dynamic_sampling,
                                   max_rounds=cfg.train.max_sampling_rounds)
        # Dynamic sampling: replicas may draw different numbers of rounds; all continue from
        # the furthest position, so the shared stream (and a resume) stays one number.
        self.sampler.position = max(gather_json(self.sampler.position, self.replicas))
        self.state.data_position = self.sampler.position
        group = collected.train
        check_replicas_agree(rollout_digest(group.responses, group.scores.overall,
                                            group.offline), self.replicas)
        return collected

    def _share(self) -> int:
        """Groups each replica rolls out per draw."""
        return self.cfg.train.prompts_per_step // self.replicas.count

    def _draw_groups(self) -> Groups:
        """Sample this replica's share of new prompts' groups, score them, mix in the offline
        answers, shape the reward of long responses (``train.overlong=shaping``)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        # Each draw has its own seed (replica, stream position): a resumed run draws the same.
        seed = step_seed(cfg.seed, self.replicas.index, self.sampler.position)
        indices = self.sampler.next(self._share())
        prompts = [self.train_set.prompt(i) for i in indices]
        samples = [self.train_set.samples[i] for i in indices]
        rollouts = self.engine.generate(prompts, SamplingParams(
            n=cfg.rollout.n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
            max_new_tokens=cfg.rollout.max_new_tokens, seed=seed))
        t_rollout = time.perf_counter() - t0

        groups = Groups.from_rollouts(samples, prompts, rollouts)
        groups.scores = score_responses(groups.row_samples(), groups.texts, cfg.reward)
        self._mix_offline(groups)
        if cfg.train.overlong == "shaping":
            groups.scores.overall += overlong_reward(
                torch.tensor([len(r) for r in groups.responses]), cfg.rollout.max_new_tokens,
                cfg.train.overlong_buffer, cfg.train.overlong_penalty)
        groups.times = {"time_rollout": t_rollout,
                        "time_reward": time.perf_counter() - t0 - t_rollout}
        return groups

    def _mix_offline(self, groups: Groups) -> None:
        """Put expert trajectories in the last slot of the chosen groups and score them."""
        samples = groups.samples
        has_offline = torch.tensor([s.offline_output is not None for s in samples])
        chosen = groups_to_mix(groups.grouped(groups.scores.accuracy), has_offline,
                               self.cfg.train.offline)
        rows = [groups.put_offline(g, offline_response_ids(self.processor.tokenizer,
                                                           samples[g].offline_output,
                                                           self.stop_id),
                                   samples[g].offline_output)
                for g in torch.nonzero(chosen).flatten().tolist()]
        if not rows:
            return
        row_samples = groups.row_samples()
        mixed = score_responses([row_samples[r] for r in rows], [groups.texts[r] for r in rows],
                                self.cfg.reward)
        for k, r in enumerate(rows):
            for name in ("overall", "accuracy", "format"):
                getattr(groups.scores, name)[r] = getattr(mixed, name)[k]

    def _completion_records(self, group: Groups, advantages) -> list[dict[str, Any]]:
        """The first ``train.log_completions`` trained groups of each replica's share, with
        the replica, for completions.jsonl (gathered to every rank; rank 0 writes)."""
        mine = self._own_completion_records(group, advantages)
        return [{"replica": r, **record}
                for r, records in enumerate(gather_json(mine, self.replicas))
                for record in records]

    def _own_completion_records(self, group: Groups, advantages) -> list[dict[str, Any]]:
        records = []
        for g, sample in enumerate(group.samples[:self.cfg.train.log_completions]):
            rows = group.rows(g)
            records.append({
                "sample_id": sample.id, "solution": sample.solution,
                "responses": [group.texts[r] for r in rows],
                "reward": [round(float(group.scores.overall[r]), 4) for r in rows],
                "advantage": [round(float(advantages[r]), 4) for r in rows],
                "offline": [bool(group.offline[r]) for r in rows]})
        return records

    def _step_metrics(self, collected: Collected, trained_rows, update, times) -> dict[str, Any]:
        """Reward metrics over every group drawn this step by every replica (sums and
        counts combined, evr1.train.replicas.Tally); the update's over those trained."""
        drawn = collected.drawn
        scores, offline = drawn.scores, drawn.offline
        tally = Tally()
        lengths = torch.tensor([float(len(r)) for r in drawn.responses])
        for name, values in (("reward", scores.overall), ("accuracy", scores.accuracy),
                             ("format", scores.format), ("truncated", drawn.truncated.float()),
                             ("response_len", lengths),
                             ("offline_reward", scores.overall[offline]),
                             ("online_accuracy", scores.accuracy[~offline])):
            tally.mean(name, values)
        for g, sample in enumerate(drawn.samples):
            tally.mean(f"reward/{sample.problem_type}", drawn.grouped(scores.overall)[g])
        tally.add("offline_groups", int(offline.sum()))
        tally.add("trained_rows", trained_rows)
        tally.add("rollouts", len(drawn.responses))  # also per replica: rollouts/replica<i>
        for name, value in collected.metrics().items():
            if name == "sampling_rounds":
                tally.slowest(name, value)
            else:
                tally.add(name, value)
        for name, value in times.items():  # the step waits for the slowest replica
            tally.slowest(name, value)
        # per replica too: how many rollouts each made, and how long (a straggler shows here)
        out: dict[str, Any] = {"online_accuracy": 0.0, **Tally.combine(
            tally.gather(self.replicas), per_replica=("rollouts", "time_rollout"))}
        out.update(data_position=self.state.data_position, **update)
        out["tokens_per_s"] = update.get("train_tokens", 0) / max(out["time_step"], 1e-9)
        return out

    # ------------------------------------------------------------------ eval / checkpoints

    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy: each replica answers its share of the batches (all ranks of a
        replica alike: an engine may span them), every rank gets every score; rank 0 logs."""
        if self.heldout is None:
            return {}
        mine = score_heldout(self.engine, self.heldout, self.cfg.reward,
                             self.cfg.rollout.max_new_tokens, self.cfg.train.eval_samples,
                             replica=self.replicas.index, replicas=self.replicas.count)
        scores = [HeldoutScore(**score)
                  for part in gather_json([asdict(s) for s in mine], self.replicas)
                  for score in part]
        result = summarize_heldout(scores)
        self.metrics.log(self.state.step, result, kind="heldout")
        return result

    def _logged_heldout(self, step: int) -> dict[str, float]:
        """The held-out figures this run folder's metrics.jsonl holds for ``step`` ({} if none)."""
        rows = [r for r in read_metrics(self.run_dir, kind="heldout") if r["step"] == step]
        if not rows:
            return {}
        return {k: v for k, v in rows[-1].items() if k not in ("step", "kind", "time")}

    def save(self) -> Path:
        extra = [self.model_dir / f for f in _PROCESSOR_FILES if (self.model_dir / f).exists()]
        return ckpt.save_checkpoint(self.cfg.checkpoint_dir, self.state, self.backend.save,
                                    extra, self.cfg.train.keep_last, writer=self.is_main,
                                    barrier=dist.barrier if dist.is_initialized() else _no_op,
                                    **self._keep_best())

    def _keep_best(self) -> dict[str, Any]:
        if not self.checkpoint_hook:
            return {}
        return {"keep_best": self.cfg.train.async_eval.keep_best,
                "scores": self.checkpoint_hook.scores}

    def prune(self) -> None:
        if self.is_main:
            ckpt.prune_checkpoints(self.cfg.checkpoint_dir, self.cfg.train.keep_last,
                                   **self._keep_best())

    def resume(self) -> None:
        """Continue from ``train.resume``'s checkpoint (none: step 0). What lies beyond it, the
        checkpoints and log rows of a branch left behind (an earlier folder named, or
        ``never``) or of steps about to be redone, is moved to ``checkpoints/abandoned-<time>/``
        first, so ``resume: auto`` never returns to it and each step is logged once."""
        root = self.cfg.checkpoint_dir
        if self.is_main:
            ckpt.recover_interrupted_saves(root)  # a kill inside save: old or new, complete
        if dist.is_initialized():
            dist.barrier()
        mode = self.cfg.train.resume
        if mode != "auto" and int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0:
            # A requeued job (preemption, time limit) continues its own progress: going back
            # to the named folder (or to step 0) would set that progress aside every requeue.
            log.info("requeued job: train.resume=%s applies to its first run; resuming from "
                     "the newest checkpoint", mode)
            mode = "auto"
        folder = None if mode == "never" else \
            ckpt.latest_checkpoint(root) if mode == "auto" else Path(mode)
        if folder is not None:
            if not (folder / "meta.json").exists():
                raise FileNotFoundError(f"train.resume={mode}: {folder} is not a complete "
                                        "checkpoint")
            self.backend.load(folder)
            # An engine with weights of its own (megatron backend, vLLM) would otherwise roll
            # out the next steps from the starting model (collective, like every sync).
            self.sync_engine()
            self.state = ckpt.load_trainer_state(folder)
            self.sampler.position = self.state.data_position
            log.info("resumed from %s (step %d)", folder, self.state.step)
        if self.is_main:
            archive = ckpt.new_abandoned_dir(root)
            moved = ckpt.abandon_after(root, self.state.step, folder, archive)
            rows = rewind_logs(self.run_dir, self.state.step, archive)
            if moved or rows:
                log.warning("starting at step %d: moved %d later checkpoint(s) (%s) and %d "
                            "log row(s) of later steps to %s", self.state.step, len(moved),
                            ", ".join(p.name for p in moved) or "none", rows, archive)

