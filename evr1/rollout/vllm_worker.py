"""Code that runs inside vLLM's worker, next to the model (``worker_extension_cls``).

vLLM builds its worker class with this class mixed in, so its methods can be called by name
through ``LLM.collective_rpc``. With ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (evr1's default for a
colocated engine) the worker lives in the trainer's process and the call passes the trainer's
tensors by reference; with multiprocessing on, the engine sends each bucket as one byte string
(:func:`pack_bucket`) to the worker process. Either way no file is written.

This module imports vLLM only inside the worker's methods, so it imports anywhere.
"""

from __future__ import annotations

from typing import Any

import torch

# The qualified name vLLM resolves in each worker process.
EXTENSION_QUALNAME = "evr1.rollout.vllm_worker.WeightSyncExtension"

# A bucket as it crosses a process boundary: names, dtypes, shapes, and all bytes in one blob.
# vLLM's RPC arguments are msgpack-decoded without a schema, so a tensor inside a list arrives
# as a plain list; bytes and strings arrive intact.
PackedBucket = tuple[list[str], list[str], list[list[int]], bytes]


# Each tensor starts on this byte boundary in the blob, so it can be viewed in its own dtype
# (a view needs an offset divisible by the element size) without another copy.
_ALIGN = 16


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def pack_bucket(named_tensors: list[tuple[str, torch.Tensor]]) -> PackedBucket:
    """Serialise a bucket into one byte string (one copy to host memory, then one to bytes)."""
    chunks = []
    for _, tensor in named_tensors:
        raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        chunks.append(raw)
        padding = _aligned(raw.numel()) - raw.numel()
        if padding:
            chunks.append(torch.zeros(padding, dtype=torch.uint8))
    blob = torch.cat(chunks).numpy().tobytes() if chunks else b""
    return ([name for name, _ in named_tensors],
            [str(t.dtype).removeprefix("torch.") for _, t in named_tensors],
            [list(t.shape) for _, t in named_tensors], blob)


def unpack_bucket(packed: PackedBucket) -> list[tuple[str, torch.Tensor]]:
    """The inverse of :func:`pack_bucket`; the tensors are views of one host buffer."""
    names, dtypes, shapes, blob = packed
    buffer = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else \
        torch.empty(0, dtype=torch.uint8)
    out, offset = [], 0
    for name, dtype_name, shape in zip(names, dtypes, shapes, strict=True):
        dtype = getattr(torch, dtype_name)
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        tensor = buffer[offset:offset + nbytes].view(dtype).reshape(shape)
        out.append((name, tensor))
        offset += _aligned(nbytes)
    return out


class WeightSyncExtension:
    """Mixed into vLLM's worker; ``self`` is the worker (it owns ``model_runner``).

    A sync is three calls: ``evr1_begin_weight_sync``, ``evr1_load_weights`` once per bucket,
    ``evr1_finish_weight_sync``. This is vLLM's layerwise in-place reload spread over buckets:
    after the first load, vLLM may have repacked a layer's weights into a kernel layout (the CPU
    backend does) and dropped the loaders, so a plain ``copy_`` or ``load_weights`` into the
    live parameters is wrong. Begin restores checkpoint-format parameters with loaders; each
    layer is re-processed into kernel format as soon as all its tensors have arrived.
    """

    model_runner: Any  # provided by the vLLM worker class this is mixed into
    vllm_config: Any

    def evr1_begin_weight_sync(self) -> None:
        # optional heavy dependency: vLLM is installed only on GPU machines
        from vllm.config import set_current_vllm_config

        # optional heavy dependency: vLLM is installed only on GPU machines
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.get_model())

    def evr1_load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        """Load one bucket of Hugging Face-named tensors.

        The model's own ``load_weights`` maps HF names to vLLM's fused parameters (q/k/v into
        ``qkv_proj``, gate/up into ``gate_up_proj``) and keeps this worker's tensor-parallel
        slice, so the trainer sends plain, unsharded HF tensors. Returns the number of vLLM
        parameters written; an unknown name raises inside ``load_weights``.
        """
        # optional heavy dependency: vLLM is installed only on GPU machines
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(self.vllm_config):
            loaded = self.model_runner.get_model().load_weights(weights=iter(named_tensors))
        return len(loaded) if loaded is not None else len(named_tensors)

    def evr1_load_packed_weights(self, packed: PackedBucket) -> int:
        """:meth:`evr1_load_weights` for a bucket sent from another process."""
        return self.evr1_load_weights(unpack_bucket(packed))

    def evr1_finish_weight_sync(self) -> None:
        """Process the layers still pending, then drop state derived from the old weights
        (vision-encoder outputs, multimodal processor cache)."""
        # optional heavy dependency: vLLM is installed only on GPU machines
        from vllm.config import set_current_vllm_config

        # optional heavy dependency: vLLM is installed only on GPU machines
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        runner = self.model_runner
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(runner.get_model(), self.vllm_config.model_config)
        for reset in ("reset_encoder_cache", "reset_mm_cache"):
            if hasattr(runner, reset):
                getattr(runner, reset)()

    def evr1_weight_fingerprint(self) -> float:
        """Sum of all parameters (float64): a cheap check that weights changed (tests)."""
        model = self.model_runner.get_model()
        with torch.no_grad():
            return float(sum(p.detach().double().sum().item() for p in model.parameters()))
