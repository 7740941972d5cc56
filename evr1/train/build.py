"""Building what the trainer uses from the config: the prompts, the model, the training backend
and the rollout engine (``evr1.train.trainer.TrainerParts``), and the trainer itself.

Kept out of the training loop (``evr1.train.trainer``), which is given these parts and calls
them only through their interfaces (``evr1.train.backends.base.TrainingBackend``,
``evr1.rollout.base.RolloutEngine``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from evr1.config import Config
from evr1.data.dataset import PromptSet
from evr1.models.loading import ensure_model, load_model, load_processor, resolve_device
from evr1.rollout.base import RolloutEngine
from evr1.rollout.hf import HFRolloutEngine
from evr1.train.backends import fsdp
from evr1.train.backends.base import TrainingBackend
from evr1.train.backends.hf import HFBackend
from evr1.train.groups import check_samples
from evr1.train.hooks import CheckpointHookFactory, NoStopSignals, StopSignals
from evr1.train.replicas import Replicas
from evr1.train.trainer import Trainer, TrainerParts
from evr1.video.shards import ShardReader


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


def make_trainer_parts(cfg: Config) -> TrainerParts:
    """The prompts, model, backend and rollout engine of ``cfg``'s training run."""
    # Data first: a sample the rewards cannot score fails here, before any model is built.
    reader = ShardReader(cfg.shard_dir, cfg.data)  # refuses frames of another budget
    train_set = PromptSet.load(cfg.data.train_jsonl, reader, cfg.data.media_root,
                               cfg.data.include_tasks, cfg.data.video.fps,
                               cfg.reward.fallback_type)
    heldout = None
    if cfg.data.eval_jsonl:
        heldout = PromptSet.load(cfg.data.eval_jsonl, reader, cfg.data.media_root,
                                 cfg.data.include_tasks, cfg.data.video.fps,
                                 cfg.reward.fallback_type)
    # Fail now, not at step N, on a sample no scorer can use or a missing code sandbox.
    check_samples(train_set.samples + (heldout.samples if heldout else []), cfg.reward)
    model_dir = ensure_model(cfg)
    processor = load_processor(model_dir)
    device = resolve_device(cfg.model.device, "model.device")
    # torchrun / srun with several ranks: join the process group first, so that a model
    # loaded to "cuda" lands on this rank's GPU.
    fsdp.join_process_group()
    # The whole HF model only where it is used: by the hf backend (which shards it over the
    # ranks) or the hf rollout engine. Megatron + vLLM hold the weights themselves.
    model = None
    if cfg.train.backend == "hf" or cfg.rollout.engine == "hf":
        model = load_model(model_dir, cfg.model.dtype, device,
                           attn_implementation=cfg.model.attn_implementation)
    backend = make_backend(cfg, model, model_dir)
    # Each data-parallel replica rolls out its share of every step (evr1.train.replicas);
    # the ranks of one replica draw identically.
    replicas = Replicas.of_this_rank(backend.dp_size, backend.dp_rank)
    cfg.train.check_replicas(replicas.count)
    engine = make_engine(cfg, model, processor, model_dir, replicas)
    return TrainerParts(train_set, heldout, model_dir, processor, model, backend, replicas,
                        engine)


def trainer_from_config(cfg: Config, cls: type[Trainer] = Trainer, *,
                        checkpoint_hook: CheckpointHookFactory | None = None,
                        stop_signals: Callable[[], StopSignals] = NoStopSignals) -> Trainer:
    """``cls`` (the GRPO trainer, or a subclass such as ``evr1.train.sft.SFTTrainer``) with
    the parts ``cfg`` configures: the one call for tests, tools and benchmarks."""
    return cls(cfg, make_trainer_parts(cfg), checkpoint_hook=checkpoint_hook,
               stop_signals=stop_signals)
