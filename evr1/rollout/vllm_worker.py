"""Code that runs inside vLLM's worker, next to the model (``worker_extension_cls``).

vLLM builds its worker class with this class mixed in, so its methods can be called by name
through ``LLM.collective_rpc``. With ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (evr1's default for a
colocated engine) the worker lives in the trainer's process and the call passes the trainer's
tensors by reference; with multiprocessing on, the engine sends each bucket as one byte string
(:func:`pack_bucket`) to the worker process. Either way no file is written.

Per-rank shards (``evr1_load_weight_shards``, the megatron backend at TP=k with a vLLM engine of
TP=k in the same processes): each rank passes only its own pieces of the HF tensors
(:class:`evr1.rollout.base.WeightShard`) and nothing crosses ranks. vLLM's loaders take HF
tensors and keep their rank's slice themselves (``narrow`` at ``tp_rank * chunk`` for the
column- and row-parallel layers; the vocabulary rows of :class:`VocabParallelEmbedding`), and
the layerwise reload needs those loaders (see :class:`WeightSyncExtension`). So each piece is
placed at its own offset in an uninitialised buffer of the whole tensor's shape
(:func:`stage_shard`), from which the loader reads exactly that piece and nothing else: the
other ranks' slices are never written or read. That holds when the trainer cut the tensor the
way vLLM does, which is checked per tensor: equal chunks of ``size / TP`` (vLLM's split of
q/k/v, gate/up, o, down); for a vocabulary matrix, the same rows per rank as vLLM's padded
split. Where the vocabulary rows differ (a vocabulary that is not a multiple of vLLM's padding,
64), the TP ranks all-gather that one tensor (every rank decides alike: the decision depends
on sizes only).

This module imports vLLM only inside the worker's methods, so it imports anywhere.
"""

from __future__ import annotations

from typing import Any

import torch

from evr1.rollout.base import WeightShard

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


def stage_shard(shard: WeightShard, tp_rank: int, tp_size: int,
                engine_vocab_chunk: int | None = None) -> torch.Tensor | None:
    """What vLLM's loader on TP rank ``tp_rank`` of ``tp_size`` should be given for ``shard``:
    the tensor itself when it is whole, else an uninitialised buffer of the whole tensor's
    shape holding ``shard.tensor`` at its offset (the loader reads only that slice). ``None``
    when this rank's piece is not the slice the engine keeps, which happens only for a
    vocabulary matrix whose rows per rank (``shard.chunk``) differ from the engine's
    (``engine_vocab_chunk``): then the whole tensor must be gathered. Any other split the engine
    would not cut alike raises."""
    if shard.dim is None:
        return shard.tensor
    where = f"{shard.name}: rank {tp_rank} of {tp_size} holds {tuple(shard.tensor.shape)}"
    length = shard.tensor.shape[shard.dim]
    start = tp_rank * shard.chunk
    if length != max(0, min(shard.chunk, shard.size - start)):
        raise ValueError(f"{where}, not chunk {tp_rank} of {shard.chunk} along dim "
                         f"{shard.dim} of {shard.size}")
    if shard.vocab:
        if engine_vocab_chunk is None:
            raise ValueError(f"{where}: the engine has no vocabulary-parallel layer of "
                             f"{shard.size} rows for these vocabulary rows")
        if engine_vocab_chunk != shard.chunk:
            return None
    elif shard.chunk * tp_size != shard.size:
        raise ValueError(f"{where}: a split into {tp_size} chunks of {shard.chunk} is not the "
                         f"engine's even split of {shard.size} along dim {shard.dim}")
    if start == 0 and length == shard.size:
        return shard.tensor  # one rank: the piece is the whole tensor
    full = torch.empty(shard.full_shape(), dtype=shard.tensor.dtype,
                       device=shard.tensor.device)
    full.narrow(shard.dim, start, length).copy_(shard.tensor)
    return full


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

    def evr1_load_weight_shards(self, tp_rank: int, tp_size: int, shards: list[WeightShard],
                                ) -> tuple[int, int]:
        """Load one bucket of this rank's own pieces of HF tensors (in-process only: the
        pieces are the trainer's tensors, passed by reference). Returns the number of vLLM
        parameters written and the bytes received from other ranks (a vocabulary matrix
        split unlike vLLM's; otherwise 0). Collective over the TP group only in that case,
        which every rank reaches for the same tensor."""
        # optional heavy dependency: vLLM is installed only on GPU machines
        from vllm.config import set_current_vllm_config

        # optional heavy dependency: vLLM is installed only on GPU machines
        from vllm.distributed.parallel_state import get_tp_group

        group = get_tp_group()
        if (tp_rank, tp_size) != (group.rank_in_group, group.world_size):
            raise ValueError(f"sync_weights: the trainer's shards are of TP rank {tp_rank} of "
                             f"{tp_size}, this vLLM worker is TP rank {group.rank_in_group} "
                             f"of {group.world_size}")
        model = self.model_runner.get_model()
        vocab_chunks = _vocab_chunks(model)
        gathered = 0

        def staged() -> Any:
            nonlocal gathered
            for shard in shards:
                tensor = stage_shard(shard, tp_rank, tp_size, vocab_chunks.get(shard.size))
                if tensor is None:  # vocabulary rows split unlike vLLM's: gather this one
                    piece = shard.tensor
                    short = shard.chunk - piece.shape[0]
                    if short:
                        piece = torch.cat([piece, piece.new_zeros(short, *piece.shape[1:])])
                    tensor = group.all_gather(piece.contiguous(), dim=0)[:shard.size]
                    gathered += (tp_size - 1) * piece.numel() * piece.element_size()
                yield shard.name, tensor

        with set_current_vllm_config(self.vllm_config):
            loaded = model.load_weights(weights=staged())
        return (len(loaded) if loaded is not None else len(shards)), gathered

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


def _vocab_chunks(model: torch.nn.Module) -> dict[int, int]:
    """Vocabulary size -> rows per TP rank of the model's vocabulary-parallel layers (input
    embedding, output head). 0 where the layers of one size disagree or hold added (LoRA) rows:
    tensors of that size are then gathered whole."""
    # optional heavy dependency: vLLM is installed only on GPU machines
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    chunks: dict[int, set[int]] = {}
    for module in model.modules():
        if isinstance(module, VocabParallelEmbedding):
            rows = module.num_embeddings_per_partition if module.num_added_embeddings == 0 \
                else 0
            chunks.setdefault(module.org_vocab_size, set()).add(rows)
    return {size: rows.pop() if len(rows) == 1 else 0 for size, rows in chunks.items()}
