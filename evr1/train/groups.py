"""From sampled responses to GRPO groups: rewards, offline mixing, filtering.

A group is the ``n`` responses of one prompt (rows ``g*n .. g*n+n-1``). Mixed offline-online
training puts the sample's expert trajectory (``offline_output``) in the group's last slot,
either always or only when the on-policy responses' accuracy is below a threshold; the mixed
rows are flagged so the loss can weight them (see ``HFBackend._offline_weights``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from evr1.config import OfflineConfig, RewardConfig
from evr1.data.schema import Sample
from evr1.rewards import check_items, score_batch


@dataclass
class Scores:
    overall: Tensor  # [N]
    accuracy: Tensor  # [N]
    format: Tensor  # [N]


def reward_item(sample: Sample, response: str) -> dict[str, Any]:
    """One item for ``evr1.rewards.score_batch``; ``meta.reward_kwargs`` carries type options."""
    item = {"problem_type": sample.problem_type, "response": response,
            "solution": sample.solution, **sample.meta.get("reward_kwargs", {})}
    if sample.options:
        item["options"] = sample.options
    return item


def check_samples(samples: list[Sample], cfg: RewardConfig) -> None:
    """At start, what scoring would raise at step N: unknown types, unusable code tests, a
    code sandbox that cannot run here (see ``evr1.rewards.check_items``)."""
    check_items([reward_item(s, "") for s in samples], cfg, [s.id for s in samples])


def score_responses(samples: list[Sample], texts: list[str], cfg: RewardConfig) -> Scores:
    """``samples[i]`` is the sample that ``texts[i]`` answers."""
    batch = score_batch([reward_item(s, t) for s, t in zip(samples, texts, strict=True)], cfg)
    return Scores(*(torch.tensor([getattr(r, k) for r in batch.results], dtype=torch.float32)
                    for k in ("overall", "accuracy", "format")))


def groups_to_mix(accuracy: Tensor, has_offline: Tensor, cfg: OfflineConfig) -> Tensor:
    """Which groups get the offline trajectory: ``accuracy`` is [G, n], ``has_offline`` [G]."""
    if cfg.mode == "never":
        return torch.zeros_like(has_offline)
    if cfg.mode == "always":
        return has_offline.clone()
    return has_offline & (accuracy.mean(dim=1) < cfg.threshold)


def offline_response_ids(tokenizer: Any, text: str, stop_id: int) -> list[int]:
    """The expert answer as response tokens, ending with the stop token like a sampled one."""
    return tokenizer.encode(text, add_special_tokens=False) + [stop_id]

