"""torch.distributed and megatron-core process groups for the ``megatron`` backend.

Ranks are laid out by megatron-core (order tp-cp-ep-dp-pp): the tensor-parallel group is the
innermost, pipeline stages the outermost, and data parallel takes what is left of the world.
On a machine without CUDA the backend is gloo and :mod:`.cpu_shims` is installed; with CUDA it
is NCCL, one GPU per rank (``LOCAL_RANK``).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from evr1.config import MegatronConfig
from evr1.train.backends.megatron import cpu_shims


@dataclass(frozen=True)
class Layout:
    """Where this rank sits in the (dp, pp, tp) grid."""

    world: int
    rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(timeout_min: int = 30) -> None:
    """Join the default process group from torchrun/srun environment variables
    (Slurm tasks get them from ``evr1.pipeline.rendezvous``, called by the training stage
    before the trainer is built, or from the sbatch script).

    A single process with no launcher variables becomes a world of one (on a free local
    port), so the backend also runs from a plain ``python`` call.
    """
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=timeout_min))


def setup_model_parallel(cfg: MegatronConfig) -> Layout:
    """Initialise megatron-core's groups for ``cfg`` (tp x pp x dp = world) and return the
    layout of this rank. Installs the CPU shims when there is no GPU."""
    # heavy: megatron-core is imported only when the megatron backend runs
    from megatron.core import parallel_state as ps

    init_distributed()
    world = dist.get_world_size()
    tp, pp = cfg.tensor_parallel, cfg.pipeline_parallel
    if tp < 1 or pp < 1 or world % (tp * pp):
        raise ValueError(f"world size {world} is not a multiple of tensor_parallel={tp} x "
                         f"pipeline_parallel={pp}")
    if not torch.cuda.is_available():
        cpu_shims.install()
    if ps.model_parallel_is_initialized():
        if (ps.get_tensor_model_parallel_world_size(),
                ps.get_pipeline_model_parallel_world_size()) != (tp, pp):
            raise RuntimeError("megatron-core is already initialised with another TP/PP layout "
                               "in this process")
    else:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp,
                                     pipeline_model_parallel_size=pp,
                                     create_gloo_process_groups=False)
    return Layout(world=world, rank=dist.get_rank(), tp=tp, pp=pp, dp=world // (tp * pp),
                  tp_rank=ps.get_tensor_model_parallel_rank(),
                  pp_rank=ps.get_pipeline_model_parallel_rank(),
                  dp_rank=ps.get_data_parallel_rank())


def seed_model_parallel(seed: int) -> None:
    """Seed the CPU RNG (and, on GPU, megatron's per-TP-rank CUDA RNG streams)."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        # heavy: megatron-core is imported only when the megatron backend runs
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
