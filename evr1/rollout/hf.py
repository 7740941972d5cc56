"""Rollout engine ``hf``: ``transformers.generate`` on the trainer's own model (CPU default).

The engine shares the model object with the training backend, so ``sync_weights`` has nothing
to copy and ``sleep``/``wake_up`` have nothing to free.

Sampling is exactly what ``SamplingParams`` says: the vision placeholder ban, temperature and
top-p, nothing else. A model folder's ``generation_config.json`` (instruct checkpoints often set
``repetition_penalty``, ``top_k``, ``min_p``) is set aside while generating, or rollouts would
come from another distribution than the one the trainer scores.

Log-probs: ``Rollouts.logprobs`` holds, per sampled token, its log-prob under the distribution it
was drawn from: the last logits processor (:class:`SampledLogProbs`) sees the scores after the
ban, temperature and top-p. The trainer's log-probs are of the tempered full distribution (no
ban, no top-p), so the two differ by log of the mass the ban and top-p keep (exactly; see
tests/test_rollout_hf.py); with top_p = 1 that is the banned placeholders' share only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from evr1.models.inputs import encode, stop_token_ids, vision_token_ids
from evr1.rollout.base import Prompt, Rollouts, SamplingParams, ShardedWeights


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
        if params.seed is not None:  # transformers samples from the global generators
            torch.manual_seed(params.seed)
        recorder = SampledLogProbs()
        kwargs = self.generation_kwargs(params)
        kwargs["logits_processor"].append(recorder)  # last: it sees the final scores
        was_training = self.model.training
        own_config = self.model.generation_config
        self.model.eval()
        # Only the global defaults stand behind `kwargs`: transformers fills every field the
        # call leaves unset from model.generation_config (the folder's generation_config.json).
        self.model.generation_config = GenerationConfig()
        try:
            out = self.model.generate(**inputs, **kwargs)
        finally:
            self.model.generation_config = own_config
            self.model.train(was_training)
        prompt_len = inputs["input_ids"].shape[1]
        logprobs = recorder.finish(out[:, prompt_len:]).tolist()
        generated = out[:, prompt_len:].tolist()
        response_ids, truncated, response_logprobs = [], [], []
        for row, row_logprobs in zip(generated, logprobs, strict=True):
            ids, hit_stop = self._cut_at_stop(row)
            response_ids.append(ids)
            response_logprobs.append(row_logprobs[:len(ids)])
            truncated.append(not hit_stop)
        texts = self.processor.tokenizer.batch_decode(
            [ids[:-1] if ids and ids[-1] in self.stop_ids else ids for ids in response_ids],
            skip_special_tokens=True)
        return Rollouts(n=params.n, response_ids=response_ids, texts=texts,
                        logprobs=response_logprobs, truncated=truncated)

    def generation_kwargs(self, params: SamplingParams) -> dict[str, Any]:
        """The arguments of ``model.generate``, besides the inputs: the placeholder ban
        (``suppress_tokens``), then temperature and top-p as explicit warpers in that order
        (transformers' own order), and nothing from the model folder's generation config."""
        greedy = params.temperature == 0
        warpers = LogitsProcessorList()
        if not greedy and params.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(params.temperature))
        if not greedy and params.top_p < 1.0:
            warpers.append(TopPLogitsWarper(params.top_p))
        # synced_gpus=False: the model is whole on every rank (the hf backend keeps FSDP's
        # weights gathered between updates), so a rank's decoding loop needs no other rank.
        # transformers' default for an FSDP module all-reduces a "finished" flag after every
        # token and keeps each rank decoding until the slowest is done: a barrier per token.
        return dict(do_sample=not greedy, temperature=1.0, top_p=1.0, top_k=0,
                    logits_processor=warpers, max_new_tokens=params.max_new_tokens,
                    num_return_sequences=params.n, eos_token_id=self.stop_ids,
                    pad_token_id=self.pad_id, suppress_tokens=self.suppress_ids,
                    synced_gpus=False)

    def _cut_at_stop(self, row: list[int]) -> tuple[list[int], bool]:
        """Keep tokens up to and including the first stop token (the policy learns to stop)."""
        for i, token in enumerate(row):
            if token in self.stop_ids:
                return row[:i + 1], True
        return row, False

    # The engine runs the whole HF model: a tensor-parallel trainer sends it whole tensors.
    takes_weight_shards = False

    @torch.no_grad()
    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy in weights that are not already this model's own tensors.

        With the ``hf`` backend the engine generates with the trainer's model object, so every
        tensor is its own and nothing is copied; a sharded backend (Megatron) sends gathered
        full tensors under the same HF names.
        """
        if isinstance(named_tensors, ShardedWeights):
            raise TypeError("the hf rollout engine holds the whole model: sync_weights needs "
                            "whole tensors, not one rank's ShardedWeights")
        # Module tensors, not state_dict(): under FSDP2 (hf backend, several ranks) state_dict
        # would put the shards back in place of the gathered weights the engine runs on.
        own = dict(self.model.named_parameters(remove_duplicate=False))
        own.update(self.model.named_buffers(remove_duplicate=False))
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


class SampledLogProbs(LogitsProcessor):
    """The last logits processor of a generate call: records the log-prob of each sampled token
    under the final (processed) scores it was drawn from.

    At step t it is handed the ids up to the token sampled at t - 1, so it keeps one
    ``[rows, vocab]`` log-softmax from the previous step (not all of them, as
    ``output_scores`` would) and reads that token's entry; ``finish`` reads the last one.
    """

    def __init__(self) -> None:
        self._previous: torch.Tensor | None = None
        self._steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._previous is not None:
            self._steps.append(self._previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self._previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, generated: torch.Tensor) -> torch.Tensor:
        """``[rows, steps]`` log-probs for the ``generated`` ids (the tokens after the prompt)."""
        if self._previous is not None and len(self._steps) < generated.shape[1]:
            last = generated[:, len(self._steps)].to(self._previous.device)
            self._steps.append(self._previous.gather(1, last[:, None]).squeeze(1))
            self._previous = None
        if not self._steps:
            return torch.zeros(generated.shape[0], 0)
        return torch.stack(self._steps, dim=1).cpu()
