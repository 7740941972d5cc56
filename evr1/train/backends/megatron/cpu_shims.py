"""The only patches evr1 applies to megatron-core, and only when CUDA is absent.

megatron-core (0.16.1 and 0.19.2 tested; tests/test_megatron.py checks that the first three
are still needed) assumes a GPU in four places that a CPU run under gloo reaches; everything
else runs unchanged with ``use_cpu_initialization=True``:

1. ``GlobalMemoryBuffer.get_tensor`` (scratch space of the local attention's ``baddbmm``)
   allocates on ``torch.cuda.current_device()``: allocate on the CPU instead.
2. ``CudaRNGStatesTracker.fork`` swaps CUDA RNG states around dropout: make it a no-op context.
   Dropout must then be 0 (evr1 sets attention and hidden dropout to 0 for RL anyway), so no
   random numbers are drawn inside it.
3. ``MultimodalRotaryEmbedding.__init__`` (the M-RoPE of Qwen-VL) builds its inverse
   frequencies on ``torch.cuda.current_device()``: build the module with the CUDA device
   query answering "cpu" for the duration of that one constructor.
4. ``dist_checkpointing.save`` / ``load`` (torch_dist backend) call ``torch.cuda.synchronize()``
   after staging tensors to the host and put a collective's flag tensor on
   ``torch.cuda.current_device()``: run them with the same "cpu" answer and a no-op
   synchronize (the tensors are already on the host).

:func:`install` is idempotent and refuses to patch when CUDA is available, so a GPU run can
never pick these up by accident.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
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
    _patch_dist_checkpointing()
    _installed = True


def installed() -> bool:
    return _installed


def _patch_memory_buffer() -> None:
    # heavy: megatron-core is imported only when the megatron backend runs
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
    # heavy: megatron-core is imported only when the megatron backend runs
    from megatron.core.tensor_parallel import random

    @contextlib.contextmanager
    def fork(self: Any, name: str = "") -> Iterator[None]:
        yield

    random.CudaRNGStatesTracker.fork = fork


@contextlib.contextmanager
def _cuda_queries_on_host() -> Iterator[None]:
    """``torch.cuda.current_device()`` answers "cpu" and ``torch.cuda.synchronize()`` does
    nothing, for code that only asks CUDA where to put small tensors or waits for copies."""
    saved = torch.cuda.current_device, torch.cuda.synchronize
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.cuda.current_device, torch.cuda.synchronize = saved  # type: ignore[assignment]


def _on_host(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _cuda_queries_on_host():
            return fn(*args, **kwargs)

    return wrapper


def _patch_mrope_init() -> None:
    # heavy: megatron-core is imported only when the megatron backend runs
    from megatron.core.models.common.embeddings import rotary_pos_embedding as rope

    rope.MultimodalRotaryEmbedding.__init__ = _on_host(rope.MultimodalRotaryEmbedding.__init__)


def _patch_dist_checkpointing() -> None:
    # Both names: callers use ``dist_checkpointing.save`` (the package re-exports them).
    from megatron.core import dist_checkpointing

    # heavy: megatron-core is imported only when the megatron backend runs
    from megatron.core.dist_checkpointing import serialization

    for name in ("save", "load"):
        wrapped = _on_host(getattr(serialization, name))
        setattr(serialization, name, wrapped)
        setattr(dist_checkpointing, name, wrapped)
