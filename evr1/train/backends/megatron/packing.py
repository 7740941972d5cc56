"""Token layout of one micro-batch for the Megatron forward: packed or padded.

A :class:`~evr1.train.batch.PolicyBatch` row is ``[left pad | prompt | response | right
pad]``. Two layouts feed the decoder (both in Megatron's ``[S, B, ...]`` order):

* **packed** (``sequence_packing: true``): the valid tokens of all rows concatenated into
  one sequence ``[N, 1]``, no padding at all. Rows must not see each other: on the local
  (CPU) attention this is a block-diagonal causal mask ``[1, 1, N, N]``; with Transformer
  Engine it is ``PackedSeqParams`` (THD, ``cu_seqlens``) and no mask.
* **padded**: the rows as they are, ``[L, B]``, with a causal + key-padding mask.

Positions are the HF model's own 3-D M-RoPE ids, gathered with the tokens, so every token
gets the rotation it gets in transformers. ``logit_index`` lists, in response order, the
flat ``s * B + b`` index of the hidden state that predicts each response token: only those
positions go through the output layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class TokenLayout:
    ids: Tensor  # [B', S] token ids fed to the embedding (B' = 1 when packed)
    positions: Tensor  # [3, B', S]
    attention_mask: Tensor | None  # [B' or 1, 1, S, S] bool, True = masked; None with THD
    packed_seq_params: Any | None  # megatron PackedSeqParams (THD) or None
    logit_index: Tensor  # [K] flat index s * B' + b of the hidden states to project
    targets: Tensor  # [K] response token ids
    response_mask: Tensor  # [B, R] the batch's mask; K = response_mask.sum()

    @property
    def seq_len(self) -> int:
        return self.ids.shape[1]

    @property
    def batch(self) -> int:
        return self.ids.shape[0]

    def scatter(self, values: Tensor, fill: float = 0.0) -> Tensor:
        """``[K]`` values in response order -> ``[B, R]`` (``fill`` where masked)."""
        out = values.new_full(self.response_mask.shape, fill)
        return out.masked_scatter(self.response_mask, values)


def _prediction_columns(mask: Tensor, prompt_width: int) -> tuple[Tensor, Tensor]:
    """(row, column) of the token *before* each response token, in row-major order."""
    rows, cols = torch.nonzero(mask, as_tuple=True)
    return rows, cols + prompt_width - 1


def build_layout(inputs: dict[str, Any], responses: Tensor, mask: Tensor, positions: Tensor,
                 *, packed: bool, thd: bool) -> TokenLayout:
    ids: Tensor = inputs["input_ids"]
    valid = inputs["attention_mask"].bool()
    batch, length = ids.shape
    prompt_width = length - responses.shape[1]
    rows, cols = _prediction_columns(mask.bool(), prompt_width)
    if not bool(valid[rows, cols].all()):
        raise ValueError("a response token follows a padding position: responses must be "
                         "right-padded directly after their prompts")
    targets = responses[mask.bool()]
    if not packed:
        return TokenLayout(
            ids=ids, positions=positions, attention_mask=_padded_mask(valid),
            packed_seq_params=None, logit_index=cols * batch + rows, targets=targets,
            response_mask=mask.bool())
    # Packed: the flat index of token (b, c) in the concatenation of valid tokens.
    flat = valid.reshape(-1)
    packed_index = torch.cumsum(flat.long(), 0).view(batch, length) - 1
    lengths = valid.sum(dim=1)
    return TokenLayout(
        ids=ids[valid][None], positions=positions[:, valid][:, None],
        attention_mask=None if thd else _block_causal_mask(lengths),
        packed_seq_params=_thd_params(lengths) if thd else None,
        logit_index=packed_index[rows, cols], targets=targets, response_mask=mask.bool())


def _padded_mask(valid: Tensor) -> Tensor:
    """``[B, 1, L, L]``, True where query i must not see key j: j > i or j is padding."""
    length = valid.shape[1]
    future = torch.ones(length, length, dtype=torch.bool).triu(1)
    return (future[None] | ~valid[:, None, :])[:, None]


def _block_causal_mask(lengths: Tensor) -> Tensor:
    """``[1, 1, N, N]`` causal within each packed row, masked across rows."""
    owner = torch.arange(len(lengths)).repeat_interleave(lengths)
    n = owner.numel()
    future = torch.ones(n, n, dtype=torch.bool).triu(1)
    return (future | (owner[:, None] != owner[None, :]))[None, None]


def _thd_params(lengths: Tensor) -> Any:
    # heavy: megatron-core is imported only when the megatron backend runs
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    longest = int(lengths.max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest)
