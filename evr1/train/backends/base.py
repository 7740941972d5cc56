"""What the trainer calls on a training backend, and what the backends share.

Two backends implement :class:`TrainingBackend`: ``hf`` (``evr1.train.backends.hf``, plain
PyTorch over the transformers model) and ``megatron`` (``evr1.train.backends.megatron``, TP/PP
over megatron-core). Both use the same learning-rate schedule (:func:`lr_lambda`) and the same
per-micro-batch loss with offline weighting and rollout correction (:func:`grpo_terms`), so the
two give the same update for the same batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from torch import Tensor

from evr1.config import GRPOConfig, TrainConfig
from evr1.rollout.base import ShardedWeights
from evr1.train.batch import PolicyBatch
from evr1.train.grpo import SUMMED_METRICS, LossMetrics, policy_loss, sample_weights


class TrainingBackend(Protocol):
    """One optimiser step per training step, over the step's micro-batches."""

    # Data-parallel replicas and this rank's (evr1.train.replicas): each replica rolls out
    # and passes to ``train_step`` its own share of the step's groups.
    dp_size: int
    dp_rank: int

    def logprobs(self, batch: PolicyBatch) -> Tensor:
        """Per-token log-probs of the batch's responses under the current weights, [B, R]."""
        ...

    def train_step(self, batches: list[PolicyBatch], grpo: GRPOConfig) -> dict[str, float]:
        """One optimiser step (gradient accumulation over ``batches``, this data-parallel
        replica's micro-batches; the loss normaliser counts every replica's and the gradients
        are summed over replicas); the update's metrics over every replica (``loss``,
        ``grad_norm``, ``lr``, ``train_tokens``, the loss terms' means)."""
        ...

    def skip_update(self) -> dict[str, float]:
        """A step with nothing to train on: no optimiser step, the lr schedule advances."""
        ...

    def named_hf_weights(self) -> Iterator[tuple[str, Tensor]]:
        """The policy's weights under Hugging Face names (for the rollout engine's sync)."""
        ...

    def weight_shards(self) -> ShardedWeights | None:
        """This rank's own tensor-parallel pieces of those weights, with no communication, for
        an engine that holds the same split (``RolloutEngine.takes_weight_shards``); None when
        the backend has no tensor parallelism (the engine then takes ``named_hf_weights``)."""
        ...

    def save(self, folder: Path) -> None:
        """Model (``folder/model``, HF safetensors) and optimiser state into ``folder``."""
        ...

    def load(self, folder: Path) -> None:
        """Restore what ``save`` wrote."""
        ...


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up, then constant, cosine or linear decay to ``min_lr_ratio``."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" \
            else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return factor


def grpo_terms(logp: Tensor, old_logp: Tensor, batch: PolicyBatch, grpo: GRPOConfig, *,
               ref_logp: Tensor | None, entropy: Tensor | None,
               normaliser: float | Tensor) -> tuple[Tensor, LossMetrics]:
    """``policy_loss`` of one micro-batch with its per-row options: offline rows' weights or
    LUFFY shaping, and the rollout/trainer correction from the engine's log-probs (extras
    ``offline``, ``rollout_logp``, ``has_rollout_logp``, see the trainer). Both backends."""
    offline = batch.extras.get("offline")
    weights, correction = sample_weights(
        old_logp, batch.mask, grpo, offline=offline,
        rollout_logp=batch.extras.get("rollout_logp"),
        has_rollout=batch.extras.get("has_rollout_logp"))
    shaped = offline if grpo.offline_loss == "shaping" else None
    loss, metrics = policy_loss(logp, old_logp, batch.advantages, batch.mask, grpo,
                                ref_logp=ref_logp, entropy=entropy, is_weights=weights,
                                normaliser=normaliser, shaped=shaped)
    metrics.add_correction(correction)
    return loss, metrics


def accumulate_metrics(totals: dict[str, float], metrics: LossMetrics, tokens: int) -> None:
    """Add one micro-batch's metrics: step totals summed, token means weighted by tokens."""
    for key, value in metrics.as_floats().items():
        totals[key] = totals.get(key, 0.0) + value * (1 if key in SUMMED_METRICS else tokens)


def step_metrics(totals: dict[str, float], tokens: int) -> dict[str, float]:
    """The step's metrics from ``accumulate_metrics`` totals (``loss`` is left to the caller)."""
    return {k: v if k in SUMMED_METRICS else v / max(tokens, 1)
            for k, v in totals.items() if k != "loss"}
