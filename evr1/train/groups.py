"""From sampled responses to GRPO groups: rewards, offline mixing, filtering.

A group is the ``n`` responses of one prompt. :class:`Groups` holds them as flat rows
(group ``g``'s response ``j`` is row ``g*n + j``) and owns that arithmetic: nothing else needs
``rollout.n`` or computes a row index. Mixed offline-online
training puts the sample's expert trajectory (``offline_output``) in the group's last slot,
either always or only when the on-policy responses' accuracy is below a threshold; the mixed
rows are flagged so the loss can weight or shape them (``train.grpo.offline_*``).

Groups whose rewards are all equal carry no policy gradient. ``train.filter_no_signal`` drops
them (the step trains on fewer groups); ``train.dynamic_sampling`` (DAPO) drops them and draws
more prompts until the step has ``prompts_per_step`` groups with signal
(:func:`collect_groups`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from evr1.config import OfflineConfig, RewardConfig
from evr1.data.schema import Sample
from evr1.rewards import check_items, score_batch
from evr1.rollout.base import Prompt, Rollouts
from evr1.train.batch import PolicyBatch
from evr1.train.grpo import group_has_signal


@dataclass
class Scores:
    overall: Tensor  # [N]
    accuracy: Tensor  # [N]
    format: Tensor  # [N]


@dataclass
class Groups:
    """The groups of one or more draws, ``[G, n]`` stored flat: ``n`` rows per prompt,
    everything per row (``slot(g, j)`` is the row of group ``g``'s response ``j``)."""

    n: int
    samples: list[Sample]  # one per group
    prompts: list[Prompt]  # one per group
    responses: list[list[int]]
    texts: list[str]
    scores: Scores
    offline: Tensor  # [rows] bool: the expert answer in the slot
    truncated: Tensor  # [rows] bool: cut at max_new_tokens without a stop token
    logprobs: list[list[float]] | None  # the engine's, per row ([] for offline rows)
    times: dict[str, float] = field(default_factory=dict)  # seconds spent, by phase

    @classmethod
    def from_rollouts(cls, samples: list[Sample], prompts: list[Prompt],
                      rollouts: Rollouts) -> Groups:
        """The engine's responses, unscored (zeros), no offline slot yet."""
        rows = len(rollouts.response_ids)
        zeros = torch.zeros(rows, dtype=torch.float32)
        return cls(rollouts.n, list(samples), list(prompts), list(rollouts.response_ids),
                   list(rollouts.texts), Scores(zeros, zeros.clone(), zeros.clone()),
                   torch.zeros(rows, dtype=torch.bool),
                   torch.tensor(rollouts.truncated or [False] * rows, dtype=torch.bool),
                   None if rollouts.logprobs is None else [list(lp) for lp in rollouts.logprobs])

    # ------------------------------------------------------------------ slot arithmetic

    @property
    def num_groups(self) -> int:
        return len(self.samples)

    def slot(self, g: int, j: int) -> int:
        """The row of group ``g``'s response ``j``."""
        return g * self.n + j

    def rows(self, g: int) -> range:
        """The rows of group ``g``."""
        return range(g * self.n, (g + 1) * self.n)

    def grouped(self, values: Tensor) -> Tensor:
        """A per-row tensor ``[G*n]`` as ``[G, n]``."""
        return values.view(-1, self.n)

    def row_samples(self) -> list[Sample]:
        """The sample each row answers."""
        return [s for s in self.samples for _ in range(self.n)]

    def put_offline(self, g: int, response: list[int], text: str) -> int:
        """Put an expert answer in group ``g``'s last slot (flagged offline, never truncated,
        no engine log-probs); returns its row."""
        row = self.slot(g, self.n - 1)
        self.responses[row], self.texts[row] = response, text
        self.offline[row], self.truncated[row] = True, False
        if self.logprobs is not None:
            self.logprobs[row] = []
        return row

    def has_signal(self) -> Tensor:
        return group_has_signal(self.grouped(self.scores.overall))

    def select(self, groups: list[int]) -> Groups:
        """The given groups, in that order."""
        rows = [r for g in groups for r in self.rows(g)]
        index = torch.tensor(rows, dtype=torch.long)
        return Groups(
            self.n, [self.samples[g] for g in groups], [self.prompts[g] for g in groups],
            [self.responses[r] for r in rows], [self.texts[r] for r in rows],
            Scores(*(getattr(self.scores, k)[index] for k in ("overall", "accuracy", "format"))),
            self.offline[index], self.truncated[index],
            None if self.logprobs is None else [self.logprobs[r] for r in rows], dict(self.times))

    @staticmethod
    def concat(parts: list[Groups]) -> Groups:
        first = parts[0]
        logprobs = None
        if all(p.logprobs is not None for p in parts):
            logprobs = [lp for p in parts for lp in p.logprobs]
        times: dict[str, float] = {}
        for p in parts:
            for k, v in p.times.items():
                times[k] = times.get(k, 0.0) + v
        return Groups(
            first.n, [s for p in parts for s in p.samples], [q for p in parts for q in p.prompts],
            [r for p in parts for r in p.responses], [t for p in parts for t in p.texts],
            Scores(*(torch.cat([getattr(p.scores, k) for p in parts])
                     for k in ("overall", "accuracy", "format"))),
            torch.cat([p.offline for p in parts]), torch.cat([p.truncated for p in parts]),
            logprobs, times)


@dataclass
class Collected:
    drawn: Groups  # every group sampled this step (for the reward metrics)
    train: Groups  # the groups the step trains on
    rounds: int  # draws of prompts_per_step prompts

    def metrics(self) -> dict[str, float]:
        signal = int(self.drawn.has_signal().sum())
        return {"sampling_rounds": self.rounds, "groups_drawn": self.drawn.num_groups,
                "groups_with_signal": signal, "groups_trained": self.train.num_groups}


def collect_groups(draw: Callable[[], Groups], target: int, *, filter_no_signal: bool,
                   dynamic: bool, max_rounds: int) -> Collected:
    """The groups one step trains on.

    ``draw()`` samples and scores ``target`` new prompts. Without filtering, one draw is the
    step. ``filter_no_signal`` keeps the groups with signal of that one draw (fewer than
    ``target``, not refilled). ``dynamic`` (DAPO's dynamic sampling) keeps drawing until
    ``target`` groups with signal are in hand or ``max_rounds`` draws were made, and trains on
    the first ``target`` of them (fewer if the rounds ran out; the metrics count the rounds).
    """
    parts: list[Groups] = []
    kept: list[Groups] = []
    have = 0
    rounds = max_rounds if dynamic else 1
    for _ in range(rounds):
        part = draw()
        parts.append(part)
        if not (dynamic or filter_no_signal):
            kept.append(part)
            break
        groups = torch.nonzero(part.has_signal()).flatten().tolist()
        if dynamic:
            groups = groups[:target - have]
        kept.append(part.select(groups))
        have += len(groups)
        if have >= target:
            break
    drawn = Groups.concat(parts)
    return Collected(drawn=drawn, train=Groups.concat(kept), rounds=len(parts))


def fill_policy_batches(batches: list[PolicyBatch], group: Groups, advantages: Tensor,
                        ) -> None:
    """Give each micro-batch its rows' advantages, offline flags and, where the engine
    returned them, its log-probs (``extras['rollout_logp']`` [B, R], zero-padded, with
    ``extras['has_rollout_logp']`` [B]: false on offline rows)."""
    for b in batches:
        b.advantages = advantages[b.rows]
        b.extras["offline"] = group.offline[b.rows]
        if group.logprobs is None:
            continue
        padded = torch.zeros(b.responses.shape, dtype=torch.float32)
        has = torch.zeros(len(b.rows), dtype=torch.bool)
        for i, r in enumerate(b.rows):
            values = group.logprobs[r]
            if not values:
                continue
            if len(values) != len(group.responses[r]):
                raise ValueError(f"row {r}: the engine gave {len(values)} log-probs for "
                                 f"{len(group.responses[r])} response tokens")
            padded[i, :len(values)] = torch.tensor(values)
            has[i] = True
        b.extras["rollout_logp"] = padded
        b.extras["has_rollout_logp"] = has


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

