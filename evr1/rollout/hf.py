"""Rollout engine ``hf``: ``transformers.generate`` on the trainer's own model (CPU default).

The engine shares the model object with the training backend, so ``sync_weights`` has nothing
to copy and ``sleep``/``wake_up`` have nothing to free.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from evr1.models.inputs import encode, stop_token_ids, vision_token_ids
from evr1.rollout.base import Prompt, Rollouts, SamplingParams


class HFRolloutEngine:
    def __init__(self, model: torch.nn.Module, processor: Any) -> None:
        self.model = model
        self.processor = processor
        tokenizer = processor.tokenizer
        self.stop_ids = stop_token_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else self.stop_ids[-1]
        # A response holding a vision placeholder would break the training forward
        # ("video features and video tokens do not match"): never sample them.
        self.suppress_ids = vision_token_ids(tokenizer)

    @torch.no_grad()
    def generate(self, prompts: list[Prompt], params: SamplingParams) -> Rollouts:
        inputs = encode(self.processor, [p.problem for p in prompts],
                        [p.frames for p in prompts], [p.data_type for p in prompts],
                        [p.fps for p in prompts])
        inputs = inputs.to(self.model.device)
        greedy = params.temperature == 0
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(
                **inputs, do_sample=not greedy, temperature=None if greedy else params.temperature,
                top_p=None if greedy else params.top_p, top_k=None if greedy else 0,
                max_new_tokens=params.max_new_tokens, num_return_sequences=params.n,
                eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
                suppress_tokens=self.suppress_ids)
        finally:
            self.model.train(was_training)
        generated = out[:, inputs["input_ids"].shape[1]:].tolist()
        response_ids, truncated = [], []
        for row in generated:
            ids, hit_stop = self._cut_at_stop(row)
            response_ids.append(ids)
            truncated.append(not hit_stop)
        texts = self.processor.tokenizer.batch_decode(
            [ids[:-1] if ids and ids[-1] in self.stop_ids else ids for ids in response_ids],
            skip_special_tokens=True)
        return Rollouts(n=params.n, response_ids=response_ids, texts=texts, truncated=truncated)

    def _cut_at_stop(self, row: list[int]) -> tuple[list[int], bool]:
        """Keep tokens up to and including the first stop token (the policy learns to stop)."""
        for i, token in enumerate(row):
            if token in self.stop_ids:
                return row[:i + 1], True
        return row, False

    @torch.no_grad()
    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy in weights that are not already this model's own tensors.

        With the ``hf`` backend the engine generates with the trainer's model object, so every
        tensor is its own and nothing is copied; a sharded backend (Megatron) sends gathered
        full tensors under the same HF names.
        """
        own = self.model.state_dict()
        for name, tensor in named_tensors:
            target = own.get(name)
            if target is None:
                raise KeyError(f"sync_weights: the rollout model has no tensor named {name!r}")
            if target.data_ptr() != tensor.data_ptr():
                target.copy_(tensor)

    def sleep(self) -> None:
        """Nothing to free: the engine has no memory of its own."""

    def wake_up(self) -> None:
        """Nothing to restore."""
