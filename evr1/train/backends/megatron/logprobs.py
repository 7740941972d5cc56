"""Token log-probs and entropies from vocab-parallel logits, never gathering the vocabulary.

Each tensor-parallel rank holds the logits of its slice of the vocabulary, ``[K, V/tp]``.
log p(y) = x_y - logsumexp(x) needs three all-reduces of ``[K]`` vectors across the TP group:
the max (for a stable exp), the sum of exp(x - max), and the target logit (which lives on
one rank; the others contribute 0). The backward needs none: d log p_y / d x_j =
1[j = y] - softmax(x)_j, and each rank owns its columns of that. The input-gradient
all-reduce happens where it belongs, in the column-parallel output layer.

Rows of the padded vocabulary (the table is rounded up to a multiple of TP) get logit -inf,
so they carry no probability, exactly as if the table had not been padded.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _all_reduce(t: Tensor, op: dist.ReduceOp, group: object | None) -> Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def mask_padded_vocab(logits: Tensor, vocab_start: int, vocab_size: int) -> Tensor:
    """-inf on columns whose global id is >= vocab_size (the padding rows)."""
    local = logits.shape[-1]
    valid = vocab_size - vocab_start
    if valid >= local:
        return logits
    column = torch.arange(local, device=logits.device)
    return logits.masked_fill(column >= valid, float("-inf"))


def _wide(logits: Tensor) -> Tensor:
    """float32 at least (bf16 -> fp32; fp64 stays fp64)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _log_normaliser(x: Tensor, group: object | None) -> Tensor:
    """logsumexp over the full (distributed) vocabulary, ``[K]``."""
    m = x.max(dim=-1).values
    _all_reduce(m, dist.ReduceOp.MAX, group)
    s = torch.exp(x - m[:, None]).sum(dim=-1)
    _all_reduce(s, dist.ReduceOp.SUM, group)
    return m + torch.log(s)


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, vocab_start: int,  # type: ignore[override]
                group: object | None) -> Tensor:
        x = _wide(logits)
        lse = _log_normaliser(x, group)
        local = targets - vocab_start
        here = (local >= 0) & (local < x.shape[-1])
        picked = x.gather(-1, local.clamp(0, x.shape[-1] - 1)[:, None]).squeeze(-1)
        picked = torch.where(here, picked, 0.0)
        _all_reduce(picked, dist.ReduceOp.SUM, group)
        ctx.save_for_backward(logits, local, here, lse)
        return picked - lse

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        logits, local, here, lse = ctx.saved_tensors
        d = torch.exp(_wide(logits) - lse[:, None]).mul_(-grad[:, None])
        rows = torch.nonzero(here).squeeze(-1)
        d[rows, local[rows]] += grad[rows]
        return d.to(logits.dtype), None, None, None


class _VocabParallelEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, group: object | None) -> Tensor:  # type: ignore[override]
        x = _wide(logits)
        lse = _log_normaliser(x, group)
        p = torch.exp(x - lse[:, None])
        # p == 0 at -inf (padded) columns; 0 * -inf must not become nan.
        mean_x = (p * torch.where(p > 0, x, 0.0)).sum(dim=-1)
        _all_reduce(mean_x, dist.ReduceOp.SUM, group)
        ctx.save_for_backward(logits, lse, mean_x)
        return lse - mean_x

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        logits, lse, mean_x = ctx.saved_tensors
        x = _wide(logits)
        p = torch.exp(x - lse[:, None])
        # dH / dx_j = -p_j (x_j - E_p[x])
        d = -p * torch.where(p > 0, x - mean_x[:, None], 0.0) * grad[:, None]
        return d.to(logits.dtype), None


def vocab_parallel_logprobs(logits: Tensor, targets: Tensor, vocab_start: int,
                            group: object | None) -> Tensor:
    """``logits [K, V/tp]`` (this rank's vocabulary columns, padding already masked),
    ``targets [K]`` global token ids -> ``[K]`` log-probs (float32 or wider) on every TP
    rank."""
    return _VocabParallelLogProbs.apply(logits, targets.long(), vocab_start, group)


def vocab_parallel_entropy(logits: Tensor, group: object | None) -> Tensor:
    """Entropy of the full-vocabulary softmax, float32 ``[K]`` on every TP rank."""
    return _VocabParallelEntropy.apply(logits, group)
