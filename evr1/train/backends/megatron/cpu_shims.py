"""The only patches evr1 applies to megatron-core, and only when CUDA is absent.

megatron-core 0.16 assumes a GPU in three places that a CPU forward/backward under gloo
reaches; everything else runs unchanged with ``use_cpu_initialization=True``:

1. ``GlobalMemoryBuffer.get_tensor`` (scratch space of the local attention's ``baddbmm``)
   allocates on ``torch.cuda.current_device()``: allocate on the CPU instead.
2. ``CudaRNGStatesTracker.fork`` swaps CUDA RNG states around dropout: make it a no-op context.
   Dropout must then be 0 (evr1 sets attention and hidden dropout to 0 for RL anyway), so no
   random numbers are drawn inside it.
3. ``MultimodalRotaryEmbedding.__init__`` (the M-RoPE of Qwen-VL) builds its inverse
   frequencies on ``torch.cuda.current_device()``: build the module with the CUDA device
   query answering "cpu" for the duration of that one constructor.

:func:`install` is idempotent and refuses to patch when CUDA is available, so a GPU run can
never pick these up by accident.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch

_installed = False


def install() -> None:
    """Patch megatron-core for CPU-only runs (no-op when already installed)."""
    global _installed
    if _installed:
        return
    if torch.cuda.is_available():
        raise RuntimeError("evr1 CPU shims for megatron-core must not be installed when CUDA "
                           "is available")
    _patch_memory_buffer()
    _patch_rng_fork()
    _patch_mrope_init()
    _installed = True


def installed() -> bool:
    return _installed


def _patch_memory_buffer() -> None:
    from megatron.core import utils

    def get_tensor(self: Any, tensor_shape: Any, dtype: torch.dtype, name: str,
                   mem_alloc_context: Any = None) -> torch.Tensor:
        numel = 1
        for size in tensor_shape:
            numel *= int(size)
        key = (name, dtype)
        buffer = self.buffer.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self.buffer[key] = torch.empty(numel, dtype=dtype, device="cpu")
        return buffer[:numel].view(*tensor_shape)

    utils.GlobalMemoryBuffer.get_tensor = get_tensor


def _patch_rng_fork() -> None:
    from megatron.core.tensor_parallel import random

    @contextlib.contextmanager
    def fork(self: Any, name: str = "") -> Iterator[None]:
        yield

    random.CudaRNGStatesTracker.fork = fork


def _patch_mrope_init() -> None:
    from megatron.core.models.common.embeddings import rotary_pos_embedding as rope

    original = rope.MultimodalRotaryEmbedding.__init__

    @functools.wraps(original)
    def init_on_cpu(self: Any, *args: Any, **kwargs: Any) -> None:
        saved = torch.cuda.current_device
        torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
        try:
            original(self, *args, **kwargs)
        finally:
            torch.cuda.current_device = saved  # type: ignore[assignment]

    rope.MultimodalRotaryEmbedding.__init__ = init_on_cpu
