"""What both training backends (``hf``, ``megatron``) share: the learning-rate schedule and
the per-micro-batch GRPO loss with its offline weighting and rollout correction."""

from __future__ import annotations

import math

from torch import Tensor

from evr1.config import GRPOConfig, TrainConfig
from evr1.train.batch import PolicyBatch
from evr1.train.grpo import LossMetrics, policy_loss, sample_weights


def lr_lambda(cfg: TrainConfig):
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
