"""The pipeline schedule: GPipe over point-to-point send/recv.

All forwards of a step's micro-batches, then all backwards: stage k sends its ``[S, B, H]``
hidden states (and, on Qwen3-VL, the deepstack levels the later stages add) to stage k + 1,
and in the backward pass the gradients of what it received back to stage k - 1. Simple, and
it runs on gloo as well as NCCL; it holds the activations of every micro-batch of a step,
which 1F1B would bound to PP of them. With PP = 1 each micro-batch's graph is freed right
after its own backward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from evr1.train.backends.megatron.forward import StageForward
from evr1.train.backends.megatron.packing import TokenLayout
from evr1.train.batch import PolicyBatch

# on_logits(i, logits, layout): micro-batch i's loss on the last stage, or None (forward only)
OnLogits = Callable[[int, Tensor, TokenLayout], Tensor | None]


@dataclass
class StageIO:
    """What one micro-batch exchanged with the neighbouring pipeline stages, kept for the
    backward pass: the received tensors are leaves whose gradients go back, the sent ones
    roots that take the next stage's gradients."""

    received: Tensor | None = None  # hidden states from the previous stage
    deepstack_in: Tensor | None = None  # deepstack levels from the previous stage
    out: Tensor | None = None  # hidden states sent on, or the loss on the last stage
    deepstack_out: Tensor | None = None  # deepstack levels sent on


def run_gpipe(forward: StageForward, batches: list[PolicyBatch], on_logits: OnLogits,
              backward: bool) -> None:
    """Run micro-batches through this rank's stage (GPipe when PP > 1).

    On the last stage ``on_logits(i, logits, layout)`` returns micro-batch i's loss (or
    None for a forward only); ``backward`` then back-propagates every loss through all
    stages, sending activation gradients from stage to stage. Deepstack levels travel
    with the hidden states to the stages that need them, and their gradients back.
    """
    m = forward.model
    g = m.grid
    saved: list[StageIO] = []
    for i, batch in enumerate(batches):
        layout = forward.layout(batch)
        io = StageIO()
        if not g.first_stage:
            io.received = _recv(m.dtype, m.device,
                                (layout.seq_len, layout.batch, m.spec.hidden_size),
                                _prev_rank(), grad=backward)
            shape = forward.deepstack_shape(batch, layout, g.pp_rank)
            if shape is not None:
                io.deepstack_in = _recv(m.dtype, m.device, shape, _prev_rank(), grad=backward)
        out, deepstack = forward(batch, layout, io.received, io.deepstack_in)
        if g.last_stage:
            loss = on_logits(i, out, layout)
            if backward and g.pp == 1:
                assert loss is not None
                loss.backward()  # PP=1: free this micro-batch's graph right away
                loss = None
            io.out = loss
        else:
            io.out = out
            dist.send(out.detach().contiguous(), _next_rank())
            if forward.deepstack_shape(batch, layout, g.pp_rank + 1) is not None:
                assert deepstack is not None
                io.deepstack_out = deepstack
                dist.send(deepstack.detach().contiguous(), _next_rank())
        saved.append(io)
    if not backward or g.pp == 1:
        return
    for io in reversed(saved):
        assert io.out is not None
        if g.last_stage:
            io.out.backward()
        else:
            roots = [io.out]
            grads = [_recv(m.dtype, m.device, io.out.shape, _next_rank(), grad=False)]
            if io.deepstack_out is not None:
                grad = _recv(m.dtype, m.device, io.deepstack_out.shape, _next_rank(),
                             grad=False)
                if io.deepstack_out.requires_grad:  # not with a frozen vision tower
                    roots.append(io.deepstack_out)
                    grads.append(grad)
            torch.autograd.backward(roots, grads)
        if not g.first_stage:
            assert io.received is not None and io.received.grad is not None
            dist.send(io.received.grad.contiguous(), _prev_rank())
            if io.deepstack_in is not None:
                assert io.deepstack_in.grad is not None
                dist.send(io.deepstack_in.grad.contiguous(), _prev_rank())


def forward_logprobs(forward: StageForward, batches: list[PolicyBatch]) -> list[Tensor]:
    """``[B, R]`` log-probs of each micro-batch (CPU), on every rank (collective)."""
    results: list[Tensor] = []

    def keep(i: int, logits: Tensor, layout: TokenLayout) -> None:
        results.append(forward.token_logprobs(logits, layout).cpu())

    run_gpipe(forward, batches, keep, backward=False)
    return from_last_stage(forward, results, [b.mask.shape for b in batches])


def from_last_stage(forward: StageForward, values: list[Tensor],
                    shapes: list[torch.Size]) -> list[Tensor]:
    """Broadcast per-micro-batch ``[B, R]`` results from the last pipeline stage."""
    m = forward.model
    if m.grid.pp == 1:
        return values
    # heavy: megatron-core is imported only when the megatron backend runs
    from megatron.core import parallel_state as ps

    out = []
    for i, shape in enumerate(shapes):
        t = values[i].to(m.device) if m.grid.last_stage else \
            torch.empty(shape, dtype=torch.float32, device=m.device)
        dist.broadcast(t, ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
        out.append(t.cpu())
    return out


def _recv(dtype: torch.dtype, device: torch.device, shape: tuple[int, ...] | torch.Size,
          src: int, grad: bool) -> Tensor:
    buffer = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(buffer, src)
    return buffer.requires_grad_(grad)


def _next_rank() -> int:
    # heavy: megatron-core is imported only when the megatron backend runs
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_next_rank()


def _prev_rank() -> int:
    # heavy: megatron-core is imported only when the megatron backend runs
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_prev_rank()
