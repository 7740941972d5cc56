"""Held-out accuracy during training: greedy answers on unseen samples, per task.

This is the quick learning signal the trainer logs before, during and after training; the
benchmark evaluation stage (``evr1.eval``) is the full, sharded one.

With several data-parallel replicas each answers its share of the batches (batch ``b`` goes to
replica ``b % replicas``) and the trainer gathers the scores: every batch is the one a single
process would run, with the same prompts and the same padding, so the greedy answers and the
figures are the ones of one process.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from evr1.config import RewardConfig
from evr1.data.dataset import PromptSet, sample_task
from evr1.rollout.base import RolloutEngine, SamplingParams
from evr1.train.groups import score_responses


@dataclass
class HeldoutScore:
    """One held-out sample's scores (what replicas send each other, as JSON)."""

    index: int  # position in the held-out set
    task: str
    accuracy: float
    format: float


def score_heldout(engine: RolloutEngine, prompts: PromptSet, reward: RewardConfig,
                  max_new_tokens: int, limit: int = 0, batch_size: int = 16, *,
                  replica: int = 0, replicas: int = 1) -> list[HeldoutScore]:
    """Greedy answers to ``replica``'s batches of the first ``limit`` samples (0: all),
    scored."""
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
    count = len(prompts) if limit <= 0 else min(limit, len(prompts))
    scores = []
    for start in range(replica * batch_size, count, replicas * batch_size):
        indices = range(start, min(start + batch_size, count))
        samples = [prompts.samples[i] for i in indices]
        texts = engine.generate([prompts.prompt(i) for i in indices], params).texts
        scored = score_responses(samples, texts, reward)
        scores += [HeldoutScore(i, sample_task(sample), accuracy, fmt)
                   for i, sample, accuracy, fmt in zip(indices, samples, scored.accuracy.tolist(),
                                                       scored.format.tolist(), strict=True)]
    return scores


def summarize_heldout(scores: list[HeldoutScore]) -> dict[str, float]:
    """Mean accuracy and format reward, overall and per task (``accuracy/<task>``), summed in
    sample order whichever replica scored what."""
    scores = sorted(scores, key=lambda s: s.index)
    by_task: dict[str, list[float]] = defaultdict(list)
    for score in scores:
        by_task[score.task].append(score.accuracy)
    out = {"accuracy": sum(s.accuracy for s in scores) / len(scores),
           "format": sum(s.format for s in scores) / len(scores), "samples": float(len(scores))}
    out.update({f"accuracy/{task}": sum(v) / len(v) for task, v in sorted(by_task.items())})
    return out
