"""Held-out accuracy during training: greedy answers on unseen samples, per task.

This is the quick learning signal the trainer logs before, during and after training; the
benchmark evaluation stage (``evr1.eval``) is the full, sharded one.
"""

from __future__ import annotations

from collections import defaultdict

from evr1.config import RewardConfig
from evr1.data.dataset import PromptSet, sample_task
from evr1.rollout.base import RolloutEngine, SamplingParams
from evr1.train.groups import score_responses


def evaluate_heldout(engine: RolloutEngine, prompts: PromptSet, reward: RewardConfig,
                     max_new_tokens: int, limit: int = 0, batch_size: int = 16
                     ) -> dict[str, float]:
    """Mean accuracy and format reward, overall and per task (``accuracy/<task>``)."""
    count = len(prompts) if limit <= 0 else min(limit, len(prompts))
    by_task: dict[str, list[float]] = defaultdict(list)
    accuracy, fmt = [], []
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
    for start in range(0, count, batch_size):
        indices = range(start, min(start + batch_size, count))
        batch = [prompts.prompt(i) for i in indices]
        samples = [prompts.samples[i] for i in indices]
        texts = engine.generate(batch, params).texts
        scores = score_responses(samples, texts, reward)
        for sample, acc in zip(samples, scores.accuracy.tolist(), strict=True):
            by_task[sample_task(sample)].append(acc)
        accuracy += scores.accuracy.tolist()
        fmt += scores.format.tolist()
    out = {"accuracy": sum(accuracy) / len(accuracy), "format": sum(fmt) / len(fmt),
           "samples": float(count)}
    out.update({f"accuracy/{task}": sum(v) / len(v) for task, v in sorted(by_task.items())})
    return out
