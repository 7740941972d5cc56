"""Building what the trainer uses from the config: the training backend and the rollout engine.

Kept out of the training loop (``evr1.train.trainer``) so that the loop only calls them
through their interfaces (``evr1.train.backends.base.TrainingBackend``,
``evr1.rollout.base.RolloutEngine``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from evr1.config import Config
from evr1.rollout.base import RolloutEngine
from evr1.rollout.hf import HFRolloutEngine
from evr1.train.backends.base import TrainingBackend
from evr1.train.backends.hf import HFBackend
from evr1.train.replicas import Replicas


def make_backend(cfg: Config, model: torch.nn.Module | None, model_dir: Path
                 ) -> TrainingBackend:
    """The configured training backend; ``megatron`` needs torch.distributed (torchrun, srun)."""
    if cfg.train.backend == "megatron":
        # megatron-core is imported only when this backend is chosen (a heavy import)
        from evr1.train.backends.megatron.backend import MegatronBackend

        return MegatronBackend(model_dir, cfg.train, cfg.rollout.temperature,
                               dtype=cfg.model.dtype, seed=cfg.seed,
                               gradient_checkpointing=cfg.model.gradient_checkpointing)
    # Under FSDP (several ranks) the weights stay gathered between updates only for the hf
    # engine, which generates with this model; vLLM has its own copy.
    return HFBackend(model, cfg.train, cfg.rollout.temperature,
                     gradient_checkpointing=cfg.model.gradient_checkpointing,
                     gather_for_rollouts=cfg.rollout.engine == "hf")


def make_engine(cfg: Config, model: torch.nn.Module | None, processor: Any, model_dir: Path,
                replicas: Replicas) -> RolloutEngine:
    """The configured rollout engine; ``hf`` shares the trainer's model object. ``vllm``:
    one engine per data-parallel replica, across the replica's tensor-parallel ranks."""
    if cfg.rollout.engine == "vllm":
        # optional heavy dependency: vLLM is installed only on GPU machines
        from evr1.rollout.vllm import make_vllm_engine, replica_engine_args

        world = dist.get_world_size() if dist.is_initialized() else 1
        mg = cfg.train.megatron if cfg.train.backend == "megatron" else None
        args = replica_engine_args(mg.tensor_parallel if mg else 1,
                                   mg.pipeline_parallel if mg else 1, replicas.count, world)
        return make_vllm_engine(model_dir, cfg.rollout, cfg.seed, **args)
    return HFRolloutEngine(model, processor)
