"""What every rollout engine takes and returns; the trainer never knows which engine it has.

An engine receives prompts whose frames were already sampled and resized in preprocessing
(no second decode, no second resize), samples ``n`` responses per prompt, and returns token
ids, decoded text and, where the engine computes them, its own per-token log-probs of the
sampled tokens under the distribution they were drawn from (logged as the rollout/trainer
mismatch, and used to correct it with ``train.grpo.rollout_is``). After every optimiser step
the trainer pushes its weights with ``sync_weights``: whole tensors, or, to an engine that
holds tensor-parallel shards like the trainer's (``takes_weight_shards``, vLLM), each rank's own
pieces (:class:`ShardedWeights`); colocated engines also ``sleep``/``wake_up`` around the update.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from evr1.video.types import Prompt  # the engines' input (a media-layer type)

log = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = None


@dataclass
class Rollouts:
    """n responses per prompt, grouped: responses of prompt i are rows i*n .. i*n+n-1."""

    n: int
    response_ids: list[list[int]]
    texts: list[str]
    logprobs: list[list[float]] | None = None  # engine-side log-probs of each response token
    truncated: list[bool] = field(default_factory=list)  # hit max_new_tokens without EOS

    def __len__(self) -> int:
        return len(self.response_ids)


@dataclass(frozen=True)
class WeightShard:
    """One Hugging Face tensor as one tensor-parallel rank holds it.

    ``dim`` None: ``tensor`` is the whole tensor (replicated: norms, the vision tower).
    Otherwise the whole tensor, of ``size`` slices along ``dim``, is cut into chunks of
    ``chunk`` slices, and ``tensor`` is chunk ``tp_rank`` (of :class:`ShardedWeights`), i.e.
    slices ``tp_rank * chunk`` onwards; it is short (or empty) where it runs past ``size``
    (a vocabulary padded up to a multiple of TP keeps only its real rows). ``vocab``: rows of
    a vocabulary-parallel matrix (input embedding, output head), which engines may split with
    another padding than the trainer's.
    """

    name: str  # Hugging Face name (transformers' in-memory names)
    tensor: torch.Tensor
    dim: int | None = None
    chunk: int = 0
    size: int = 0
    vocab: bool = False

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def full_shape(self) -> tuple[int, ...]:
        """The whole tensor's shape."""
        shape = list(self.tensor.shape)
        if self.dim is not None:
            shape[self.dim] = self.size
        return tuple(shape)


@dataclass(frozen=True)
class ShardedWeights:
    """This rank's own pieces of the policy's weights (``shards``, lazy; no communication),
    cut by tensor parallelism ``tp_size``, of which this rank is ``tp_rank``. Every rank of a
    tensor-parallel group lists the same names in the same order."""

    tp_rank: int
    tp_size: int
    shards: Iterable[WeightShard]


# What ``sync_weights`` takes: (HF name, whole tensor) pairs, or this rank's shards.
Weights = Iterable[tuple[str, torch.Tensor]] | ShardedWeights


class RolloutEngine(Protocol):
    # Whether ``sync_weights`` takes :class:`ShardedWeights` (the engine holds the same
    # tensor-parallel split as the trainer, in the same processes); else whole tensors only.
    takes_weight_shards: bool

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> Rollouts: ...

    def sync_weights(self, weights: Weights) -> None:
        """Load new weights, given under their Hugging Face names: whole tensors, or (when
        ``takes_weight_shards``) this rank's :class:`ShardedWeights`."""

    def sleep(self) -> None:
        """Free the engine's accelerator memory (weights and KV cache) until ``wake_up``."""

    def wake_up(self) -> None: ...


Response = tuple[str, bool, int]  # text, truncated (no stop token), length in tokens


def generate_isolating_failures(engine: RolloutEngine, prompts: list[Prompt],
                                params: SamplingParams) -> list[list[Response] | str]:
    """The ``params.n`` responses of each prompt, or the error (``Type: message``) that
    generating that prompt raised.

    A batch that raises (e.g. out of memory on one long video) is retried prompt by prompt,
    so one bad prompt costs itself, not its batch.
    """
    try:
        out = engine.generate(prompts, params)
    except Exception as exc:
        if len(prompts) == 1:
            log.warning("generation failed for %s: %s", prompts[0].sample_id, exc)
            return [f"{type(exc).__name__}: {exc}"]
        log.warning("generation failed for a batch of %d (%s); retrying one by one",
                    len(prompts), exc)
        return [group for p in prompts
                for group in generate_isolating_failures(engine, [p], params)]
    truncated = out.truncated or [False] * len(out.texts)  # engines that cannot tell
    responses = list(zip(out.texts, truncated, map(len, out.response_ids), strict=True))
    n = params.n
    return [responses[i * n:(i + 1) * n] for i in range(len(prompts))]
