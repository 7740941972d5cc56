"""Gradient reduction across the parallel groups, and the global-norm clip.

After the backward pass each rank holds the gradient of its own shards from its own
replica's micro-batches. :func:`reduce_and_clip` makes that the full-batch gradient (sum over
the data-parallel replicas: the loss normaliser, :func:`global_normaliser`, counts every
replica's batches), completes the gradients
of the few tensors that several ranks compute parts of (a tied embedding split over the first
and last stage, Q/K norms over TP ranks) and clips by the norm over all shards, as
``torch.nn.utils.clip_grad_norm_`` does on one process.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from evr1.config import LossAgg
from evr1.train.backends.megatron.shards import LocalModel
from evr1.train.backends.megatron.weights import HEAD_NORMS
from evr1.train.batch import PolicyBatch
from evr1.train.grpo import clip_coefficient, loss_normaliser


def global_normaliser(model: LocalModel, batches: list[PolicyBatch], loss_agg: LossAgg
                      ) -> Tensor:
    """The loss normaliser of the whole step: the count of this replica's ``batches`` summed
    over the data-parallel replicas (the TP/PP ranks of one replica hold the same batches).
    Counts are integers: the float64 sum is exact, and so is float32 below 2**24."""
    # heavy: megatron-core is imported only when the megatron backend runs
    from megatron.core import parallel_state as ps

    local = sum(float(loss_normaliser(b.mask, loss_agg)) for b in batches)
    total = torch.tensor(local, dtype=torch.float64, device=model.device)
    if model.grid.dp > 1:
        dist.all_reduce(total, group=ps.get_data_parallel_group())
    return total.to(torch.float32).cpu()


def reduce_and_clip(model: LocalModel, grad_clip: float) -> float:
    """Make every rank's gradients the full-batch gradient of its shards, clip by the
    global norm (``grad_clip`` 0: no clipping) and return that norm."""
    # megatron-core: imported only when the megatron backend runs
    from megatron.core import parallel_state as ps

    g = model.grid
    params = model.params()
    if g.pp > 1 and model.spec.tied_embeddings:
        _sum_tied_embedding_grads(model)
    if g.tp > 1 and model.spec.qk_norm:
        _sum_head_norm_grads(model)
    if g.dp > 1:
        all_reduce_grads(params, ps.get_data_parallel_group())
    squares = torch.zeros((), dtype=torch.float64, device=model.device)
    for p in _norm_params(model):
        if p.grad is not None:
            squares += p.grad.detach().double().square().sum()
    if g.tp > 1:
        dist.all_reduce(squares, group=ps.get_tensor_model_parallel_group())
    if g.pp > 1:
        dist.all_reduce(squares, group=ps.get_pipeline_model_parallel_group())
    norm = float(squares.sqrt())
    coef = clip_coefficient(norm, grad_clip)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(coef)
    return norm


def reduce_metrics(model: LocalModel, totals: Tensor) -> Tensor:
    """Sum token-weighted metrics over data-parallel replicas and pipeline stages (only
    the last stage has them); TP ranks hold identical copies."""
    # megatron-core: imported only when the megatron backend runs
    from megatron.core import parallel_state as ps

    t = totals.to(model.device)
    if model.grid.dp > 1:
        dist.all_reduce(t, group=ps.get_data_parallel_group())
    if model.grid.pp > 1:
        dist.all_reduce(t, group=ps.get_pipeline_model_parallel_group())
    return t.cpu()


def all_reduce_grads(params: list[torch.nn.Parameter], group: Any) -> None:
    """Sum gradients over ``group`` (data-parallel replicas; or the TP ranks, for the Q/K
    norms), in one flat buffer per dtype.

    A parameter no replica produced a gradient for (the vision tower in a text-only step)
    keeps ``grad = None``, so AdamW skips it exactly as on a single process.
    """
    had = torch.tensor([p.grad is not None for p in params], dtype=torch.int32,
                       device=params[0].device)
    dist.all_reduce(had, op=dist.ReduceOp.MAX, group=group)
    live = [p for p, h in zip(params, had.tolist(), strict=True) if h]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in live:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group_params in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group_params])
        dist.all_reduce(flat, group=group)
        offset = 0
        for p in group_params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n


def _norm_params(model: LocalModel) -> list[torch.nn.Parameter]:
    """The parameters whose gradients this rank counts in the global norm: its TP shards,
    and replicated tensors (norms, vision tower) on TP rank 0 only; the last stage's copy
    of a tied embedding is the first stage's matrix and is not counted twice."""
    sharded = {r.megatron for r in model.local_rules() if r.kind != "replicated"}
    tied_copy = model.grid.pp > 1 and model.spec.tied_embeddings
    keep = []
    for name, p in model.named_params():
        if tied_copy and name == "output_layer.weight":
            continue
        if name in sharded or model.grid.tp_rank == 0:
            keep.append(p)
    return keep


def _sum_tied_embedding_grads(model: LocalModel) -> None:
    """With PP > 1 the tied matrix lives on the first and last stage: sum both
    gradients so that the two copies take identical steps."""
    # megatron-core: imported only when the megatron backend runs
    from megatron.core import parallel_state as ps

    if not ps.is_rank_in_embedding_group():
        return
    weight = model.gpt.embedding.word_embeddings.weight if model.grid.first_stage \
        else model.gpt.output_layer.weight
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    dist.all_reduce(weight.grad, group=ps.get_embedding_group())


def _sum_head_norm_grads(model: LocalModel) -> None:
    """Each TP rank's Q/K norm gradient covers only its own heads: sum them, so that
    every rank holds the full gradient of the replicated weight."""
    # megatron-core: imported only when the megatron backend runs
    from megatron.core import parallel_state as ps

    params = dict(model.gpt.named_parameters())
    norms = [params[r.megatron] for r in model.local_rules()
             if r.megatron.endswith(HEAD_NORMS)]
    all_reduce_grads(norms, ps.get_tensor_model_parallel_group())
