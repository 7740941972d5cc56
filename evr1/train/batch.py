"""Micro-batches for the policy forward: prompt (with its frames) + sampled response.

Layout of one micro-batch, the same as at generation time so the forward sees the positions
the sampler saw::

    [pad .. pad | prompt tokens (+ vision placeholders) | response tokens | pad .. pad]
     left-padded prompts (P columns)                      right-padded responses (R columns)

Only the last R+1 logits are computed (``logits_to_keep``); the loss tensors are ``[B, R]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from evr1.models.inputs import encode
from evr1.rollout.base import Prompt


@dataclass
class PolicyBatch:
    model_inputs: dict[str, Any]  # input_ids, attention_mask and the vision tensors
    responses: Tensor  # [B, R] response token ids (padded)
    mask: Tensor  # [B, R] True on response tokens
    rows: list[int]  # which rollout rows these are
    owners: list[int] = field(default_factory=list)  # prompt index of each row
    data_types: list[str] = field(default_factory=list)  # video | image | text, per row
    advantages: Tensor | None = None  # [B]
    extras: dict[str, Tensor] = field(default_factory=dict)

    def to(self, device: torch.device) -> PolicyBatch:
        """Move the per-response tensors (not the model inputs) to ``device``, in place."""
        for name in ("responses", "mask", "advantages"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        self.extras = {k: v.to(device) for k, v in self.extras.items()}
        return self

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())


def make_policy_batches(processor: Any, prompts: list[Prompt], group_size: int,
                        responses: list[list[int]], rows: list[int], micro_batch_size: int,
                        pad_id: int) -> list[PolicyBatch]:
    """Split ``rows`` (indices into ``responses``; row r belongs to prompt r // group_size)
    into micro-batches of at most ``micro_batch_size`` responses."""
    batches = []
    for start in range(0, len(rows), micro_batch_size):
        chunk = rows[start:start + micro_batch_size]
        owners = [prompts[r // group_size] for r in chunk]
        inputs = encode(processor, [p.problem for p in owners], [p.frames for p in owners],
                        [p.data_type for p in owners], [p.fps for p in owners])
        resp, mask = pad_right([responses[r] for r in chunk], pad_id)
        inputs = append_response(dict(inputs), resp, mask)
        batches.append(PolicyBatch(model_inputs=inputs, responses=resp, mask=mask, rows=chunk,
                                   owners=[r // group_size for r in chunk],
                                   data_types=[p.data_type for p in owners]))
    return batches


def append_response(inputs: dict[str, Any], resp: Tensor, mask: Tensor) -> dict[str, Any]:
    """Extend every per-token input of the prompts ([B, P]) over the response columns."""
    prompt_shape = inputs["input_ids"].shape
    for key, value in inputs.items():
        if isinstance(value, Tensor) and value.shape == prompt_shape:
            if key == "input_ids":
                tail = resp
            elif key == "attention_mask":
                tail = mask.to(value.dtype)
            else:  # per-token type ids (text = 0): responses are text
                tail = torch.zeros_like(resp, dtype=value.dtype)
            inputs[key] = torch.cat([value, tail], dim=1)
    return inputs


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, seq in enumerate(seqs):
        ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, :len(seq)] = True
    return ids, mask

