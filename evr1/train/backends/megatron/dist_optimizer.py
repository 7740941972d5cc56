"""megatron-core's ``DistributedDataParallel`` + ``DistributedOptimizer`` for the GPTModel, on
CUDA (issue 22).

What it changes against the CPU path (``torch.optim.AdamW`` over each rank's shards, state
replicated over data-parallel ranks, :mod:`.grads`):

* gradients accumulate into fp32 buffers (``param.main_grad``, ``grad_reduce_in_fp32``) and
  are reduce-scattered over the data-parallel group bucket by bucket while the last
  micro-batch's backward still runs (``overlap_grad_reduce``; the earlier micro-batches run
  their backward under ``no_sync``), then ``finalize_model_grads`` completes the tied
  embedding (PP) and Q/K-norm (TP) gradients;
* each data-parallel rank keeps fp32 main weights and AdamW moments of its 1/DP of every
  bucket only, steps them and all-gathers the updated bf16 weights;
* gradients are summed, not averaged, over replicas (``calculate_per_token_loss``: the GRPO
  loss normaliser already counts the whole batch), and weight decay applies to every
  parameter (no megatron-style skip of biases and norms), as on the CPU path.

The vision tower is not part of the GPTModel: it keeps a ``torch.optim.AdamW`` of its own,
its gradients summed over data-parallel replicas, and its norm counted in the global norm
that clips both (``train.grad_clip``). Both optimisers follow one lr schedule.

It does not run on CPU: megatron-core 0.19's optimisers create tensors with a literal
``device='cuda'`` (optimizer.py, clip_grads.py) and check ``param.type() ==
'torch.cuda.FloatTensor'`` (distrib_optimizer.py); see docs/architecture.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from evr1.config import TrainConfig
from evr1.train.backends.megatron.grads import all_reduce_grads
from evr1.train.backends.megatron.shards import LocalModel
from evr1.train.grpo import clip_coefficient


def wanted(device: torch.device) -> bool:
    """The one place that chooses: megatron-core's DDP + distributed optimiser on CUDA, the
    plain AdamW path elsewhere (megatron-core's optimisers need CUDA, see the docstring)."""
    return device.type == "cuda"


class DistributedAdamW:
    """DDP wrapper + distributed AdamW of the GPTModel, AdamW of the vision tower."""

    def __init__(self, model: LocalModel, cfg: TrainConfig):
        # megatron-core: imported only when the megatron backend runs
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
        )

        # megatron-core: imported only when the megatron backend runs
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        self.model = model
        self.cfg = cfg
        self.steps = 0  # optimiser steps taken (the checkpoint records them)
        model.gpt.config.calculate_per_token_loss = True  # sum over DP replicas, see above
        self.ddp = DistributedDataParallel(
            config=model.gpt.config, module=model.gpt,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, overlap_grad_reduce=True,
                use_distributed_optimizer=True))
        beta1, beta2 = cfg.betas
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=cfg.lr, weight_decay=cfg.weight_decay,
                            adam_beta1=beta1, adam_beta2=beta2, adam_eps=1e-8,
                            bf16=model.dtype == torch.bfloat16, params_dtype=model.dtype,
                            use_distributed_optimizer=True, clip_grad=0.0),
            [self.ddp], config_overrides={}, use_gloo_process_groups=False)
        # The torch optimiser inside (over this rank's fp32 main shards): what the lr
        # scheduler drives.
        self.inner = self.optimizer.optimizer
        tower = model.vision.visual
        trainable = [p for p in tower.parameters() if p.requires_grad] if tower else []
        self.vision = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(beta1, beta2),
                                        weight_decay=cfg.weight_decay) if trainable else None

    # ------------------------------------------------------------------ step

    def zero_grad(self) -> None:
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad(set_to_none=True)
        if self.vision is not None:
            self.vision.zero_grad(set_to_none=True)

    def grad_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Around a micro-batch's backward: the data-parallel reduce-scatter starts only in
        the step's last backward."""
        return contextlib.nullcontext() if last else self.ddp.no_sync()

    def step(self) -> float:
        """Finish the gradient reduction, clip by the global norm (GPTModel and vision tower
        together), step both optimisers; returns the norm before clipping."""
        # megatron-core: imported only when the megatron backend runs
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import finalize_model_grads  # lazily, as above

        finalize_model_grads([self.ddp])
        self.optimizer.prepare_grads()
        lm_norm = float(self.optimizer.get_grad_norm())
        tower = self.vision_params()
        if tower and self.model.grid.dp > 1:
            all_reduce_grads(tower, ps.get_data_parallel_group())
        squares = torch.zeros((), dtype=torch.float64, device=self.model.device)
        counted = self.model.grid.first_stage and self.model.grid.tp_rank == 0 and \
            self.model.grid.dp_rank == 0  # the tower is replicated over TP and DP
        if counted:
            for p in tower:
                if p.grad is not None:
                    squares += p.grad.detach().double().square().sum()
        dist.all_reduce(squares)
        norm = (lm_norm ** 2 + float(squares)) ** 0.5
        coef = clip_coefficient(norm, self.cfg.grad_clip)
        if coef != 1.0:
            for p in self.optimizer.get_parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
            for p in tower:
                if p.grad is not None:
                    p.grad.mul_(coef)
        self.optimizer.step_with_ready_grads()
        self.steps += 1
        if self.vision is not None:
            self.vision.param_groups[0]["lr"] = self.inner.param_groups[0]["lr"]
            self.vision.step()
        return norm

    def vision_params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.vision.param_groups for p in g["params"]] if self.vision \
            else []

    # ------------------------------------------------------------------ state

    def main_grad(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        """The accumulated gradient of a GPTModel parameter (DDP keeps it in ``main_grad``)."""
        return getattr(p, "main_grad", None) if p.grad is None else p.grad

    def sharded_state(self, model_state: dict[str, Any], is_loading: bool) -> dict[str, Any]:
        """The distributed optimiser's state for megatron-core's distributed checkpoint, in
        the ``fully_reshardable`` layout (one tensor per parameter, as a regular optimiser
        holds it), so that a run with another TP/PP/DP layout can resume from it."""
        return self.optimizer.sharded_state_dict(
            model_state, is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": "fully_reshardable"})

    def load_sharded_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def iter_vision_state(self) -> Iterator[tuple[torch.nn.Parameter, dict[str, Any]]]:
        if self.vision is not None:
            for p in self.vision_params():
                yield p, self.vision.state[p]
