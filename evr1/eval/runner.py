"""One evaluation array task: a (model, benchmark, shard) -> a predictions JSONL.

The task takes every ``num_shards``-th question of the prepared benchmark file (round robin,
so long and short videos spread evenly), reads their frames from the benchmark's shard cache
(the preprocess stage's output: nothing is decoded twice), generates one response per question
and scores it. A question whose media failed in preprocessing (failures.jsonl), or failed to
decode / timed out when decoding on the fly, is written as ``media_failed`` with the reason
and scores 0; a batch whose generation raises is retried question by question, and a question
that still fails is written as ``error``. Nothing is dropped.

The predictions file is written atomically, then the shard marker (settings, counts, timing);
a re-run skips a shard whose marker matches the current settings and redoes any other.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from evr1.config import Config
from evr1.data.dataset import sampled_fps
from evr1.data.schema import Sample, load_samples
from evr1.eval.plan import EvalTask, ShardFiles, eval_tasks
from evr1.eval.scoring import ERROR, MEDIA_FAILED, score_response
from evr1.files import atomic_write_json, atomic_write_jsonl, file_sha256, read_jsonl
from evr1.models.loading import load_model, load_processor, resolve_device
from evr1.rollout.base import Prompt, SamplingParams, generate_isolating_failures
from evr1.rollout.hf import HFRolloutEngine
from evr1.video.decode import load_visual
from evr1.video.shards import ShardError, ShardReader

log = logging.getLogger("evr1.eval")


@dataclass
class TaskResult:
    index: int
    name: str
    skipped: bool = False
    items: int = 0
    seconds: float = 0.0
    generate_seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------- settings


def sampling_settings(cfg: Config) -> dict[str, Any]:
    """What decides the responses; recorded with every shard and in the results."""
    e = cfg.eval
    return {"temperature": e.temperature, "top_p": e.top_p, "max_new_tokens": e.max_new_tokens,
            "seed": e.seed, "n": 1, "engine": e.engine, "prompt_style": e.prompt_style,
            "frames": e.frames, "dtype": cfg.model.dtype}


def fingerprint(cfg: Config, task: EvalTask) -> dict[str, Any]:
    return {"model": str(task.model.path), "prepared_sha256": file_sha256(task.bench.prepared),
            "sampling": sampling_settings(cfg), "num_shards": task.num_shards}


def shard_is_complete(files: ShardFiles, expected: dict[str, Any]) -> bool:
    if not (files.marker.is_file() and files.predictions.is_file()):
        return False
    try:
        marker = json.loads(files.marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return marker.get("fingerprint") == expected


def shard_samples(prepared: Path, shard: int, num_shards: int) -> list[Sample]:
    if not prepared.is_file():
        raise FileNotFoundError(f"{prepared} does not exist: run python launchers/eval.py "
                                "--config C --prepare (the --array launcher does it first)")
    return load_samples(prepared, check_media=False)[shard::num_shards]


# --------------------------------------------------------------------------- frames


class ShardFrames:
    """Frames from the benchmark's shard cache; failures come from failures.jsonl."""

    def __init__(self, shard_dir: Path, default_fps: float) -> None:
        try:
            self.reader = ShardReader(shard_dir)
        except ShardError as exc:
            raise ShardError(f"{exc}\n(for a benchmark: python launchers/eval.py --config C "
                             "--preprocess caches every benchmark's frames)") from None
        self.failures = {r["id"]: r.get("reason", "failed in preprocessing")
                         for r in read_jsonl(shard_dir / "failures.jsonl")}
        self.default_fps = default_fps

    def get(self, sample: Sample) -> tuple[np.ndarray, float] | str:
        if sample.id in self.failures:
            return self.failures[sample.id]
        if sample.id not in self.reader:
            return "no frames in the shard cache (not preprocessed: rerun --preprocess)"
        cached = self.reader.get(sample.id)
        return cached.frames, sampled_fps(cached.media, self.default_fps)


class DecodedFrames:
    """Frames decoded, sampled and resized on the fly (the slow path, for comparison), each
    under a time limit: a decoder that hangs on a broken file costs one question, not the
    task. The timed-out decode keeps running in a daemon thread until the process ends."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def get(self, sample: Sample) -> tuple[np.ndarray, float] | str:
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["visual"] = load_visual(sample.path, sample.data_type, self.cfg.data,
                                            backend=self.cfg.preprocess.backend,
                                            dali_device=self.cfg.preprocess.dali_device)
            except Exception as exc:  # reported as this question's media failure
                box["error"] = f"{type(exc).__name__}: {exc}"

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        thread.join(self.cfg.eval.decode_timeout_s)
        if thread.is_alive():
            return f"decode timed out after {self.cfg.eval.decode_timeout_s:g} s"
        if "error" in box:
            return box["error"]
        visual = box["visual"]
        ts = visual.timestamps_s
        fps = (len(ts) - 1) / (ts[-1] - ts[0]) if len(ts) > 1 and ts[-1] > ts[0] else \
            self.cfg.data.video.fps
        return visual.frames, fps


# --------------------------------------------------------------------------- engine


def cpu_threads(cfg: Config, num_tasks: int) -> int:
    """Torch threads for one task: its share of the CPUs it may use.

    An explicit ``OMP_NUM_THREADS`` wins. Local array tasks run side by side (as many as
    cores, see ``evr1.pipeline.executor``); each torch process would otherwise start one thread
    per core, and oversubscribed OpenMP threads spin against each other (measured: 2 tasks on
    2 cores took 3x longer than 1 task). On a Slurm node the allocation's CPUs (the affinity
    mask) are this task's own.
    """
    explicit = os.environ.get("OMP_NUM_THREADS", "")
    if explicit.isdigit() and int(explicit) > 0:
        return int(explicit)
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    if os.environ.get("SUBMITIT_EXECUTOR") != "local":
        return available
    side_by_side = max(1, min(cfg.launch.array_parallelism, os.cpu_count() or 1, num_tasks))
    return max(1, available // side_by_side)


def make_engine(cfg: Config, model_path: Path) -> Any:
    if cfg.eval.engine == "vllm":
        # optional heavy dependency: vLLM is installed only on GPU machines
        from evr1.rollout.vllm import make_vllm_engine

        return make_vllm_engine(model_path, cfg.rollout, seed=cfg.eval.seed)

    device = resolve_device(cfg.eval.device, "eval.device")
    model = load_model(model_path, cfg.model.dtype, device,
                       attn_implementation=cfg.model.attn_implementation)
    return HFRolloutEngine(model, load_processor(model_path))


# --------------------------------------------------------------------------- rows


def base_row(sample: Sample, task: EvalTask) -> dict[str, Any]:
    meta = {k: v for k, v in sample.meta.items() if k not in ("reward_kwargs", "question")}
    return {"id": sample.id, "benchmark": task.bench.alias, "benchmark_name": task.bench.bench.name,
            "model": task.model.label, "problem_type": sample.problem_type,
            "question": sample.meta.get("question", sample.problem), "solution": sample.solution,
            "options": sample.options, "reward_kwargs": sample.meta.get("reward_kwargs") or {},
            "meta": meta}


def failed_row(sample: Sample, task: EvalTask, status: str, reason: str) -> dict[str, Any]:
    details = {"iou": 0.0} if sample.problem_type == "temporal_grounding" else {}
    return {**base_row(sample, task), "response": None, "extracted": None, "method": "none",
            "score": 0.0, "status": status, "reason": reason[:500], "details": details}


def scored_row(sample: Sample, task: EvalTask, response: str, truncated: bool) -> dict[str, Any]:
    scored = score_response(sample.problem_type, response, sample.solution, sample.options,
                            sample.meta.get("reward_kwargs"))
    return {**base_row(sample, task), "response": response, "extracted": scored.extracted,
            "method": scored.method, "score": scored.score, "status": scored.status,
            "details": scored.details, "truncated": truncated}


def evaluate_samples(engine: Any, frames: ShardFrames | DecodedFrames, samples: Sequence[Sample],
                     task: EvalTask, params: SamplingParams, batch_size: int
                     ) -> tuple[list[dict[str, Any]], float]:
    """Rows in the order of ``samples``, and the seconds spent generating."""
    rows: dict[str, dict[str, Any]] = {}
    generate_s = 0.0
    bar = tqdm(total=len(samples), desc=f"eval {task.name}", unit="q", mininterval=2.0)
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        ready: list[tuple[Sample, Prompt]] = []
        for sample in batch:
            if sample.data_type == "text":
                ready.append((sample, Prompt(sample.id, sample.problem, "text")))
                continue
            got = frames.get(sample)
            if isinstance(got, str):
                rows[sample.id] = failed_row(sample, task, MEDIA_FAILED, got)
            else:
                ready.append((sample, Prompt(sample.id, sample.problem, sample.data_type,
                                             got[0], fps=got[1])))
        if ready:
            t0 = time.perf_counter()
            groups = generate_isolating_failures(engine, [p for _, p in ready], params)
            generate_s += time.perf_counter() - t0
            for (sample, _), group in zip(ready, groups, strict=True):
                if isinstance(group, str):
                    rows[sample.id] = failed_row(sample, task, ERROR, group)
                else:
                    text, truncated, _ = group[0]  # n=1: one response per question
                    rows[sample.id] = scored_row(sample, task, text, truncated)
        bar.update(len(batch))
    bar.close()
    return [rows[s.id] for s in samples], generate_s


# --------------------------------------------------------------------------- the task


def evaluate_shard(cfg: Config, index: int) -> TaskResult:
    """Array task ``index`` of ``eval_tasks(cfg)``; safe to re-run."""
    tasks = eval_tasks(cfg)
    if not 0 <= index < len(tasks):
        raise ValueError(f"eval task index {index} is outside 0..{len(tasks) - 1}")
    task = tasks[index]
    files = ShardFiles.of(cfg, task.model.label, task.bench.alias, task.shard, task.num_shards)
    expected = fingerprint(cfg, task)
    if shard_is_complete(files, expected):
        log.info("%s: already complete (%s), skipped", task.name, files.marker.name)
        return TaskResult(index, task.name, skipped=True)
    files.marker.unlink(missing_ok=True)  # a stale or partial earlier attempt: redo it
    samples = shard_samples(task.bench.prepared, task.shard, task.num_shards)
    start = time.perf_counter()

    torch.manual_seed(cfg.eval.seed * 1_000_003 + task.shard)  # reproducible sampling
    torch.set_num_threads(cpu_threads(cfg, len(tasks)))
    rows: list[dict[str, Any]] = []
    generate_s = 0.0
    if samples:  # more shards than questions leaves some empty: no model to load for them
        frames: ShardFrames | DecodedFrames = (
            DecodedFrames(cfg) if cfg.eval.frames == "decode"
            else ShardFrames(task.bench.shard_dir, cfg.data.video.fps))
        engine = make_engine(cfg, task.model.path)
        params = SamplingParams(n=1, temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
                                max_new_tokens=cfg.eval.max_new_tokens, seed=cfg.eval.seed)
        rows, generate_s = evaluate_samples(engine, frames, samples, task, params,
                                            cfg.eval.batch_size)
    seconds = time.perf_counter() - start
    status = Counter(r["status"] for r in rows)
    status["truncated"] = sum(1 for r in rows if r.get("truncated"))
    atomic_write_jsonl(files.predictions, rows)
    result = TaskResult(index, task.name, items=len(rows), seconds=seconds,
                        generate_seconds=generate_s, counts=dict(status))
    atomic_write_json(files.marker, {
        "fingerprint": expected, "model": task.model.label, "benchmark": task.bench.alias,
        "shard": task.shard, "num_shards": task.num_shards, "sampling": expected["sampling"],
        "result": asdict(result)})
    log.info("%s: %d questions in %.1f s (%s)", task.name, len(rows), seconds, dict(status))
    return result
