"""One preprocessing array task: its slice of media files -> decoded, sampled frames -> a shard.

The work list is the set of distinct media files referenced by the input JSONL files (several
questions often share one video: it is decoded and stored once). Task ``i`` of ``N`` takes a
contiguous slice of that list, so every task can compute its own share from the config alone,
with no coordinator. A finished task is skipped on a re-run (its manifest part exists and its
shard matches the recorded checksum); an unfinished one starts over from a clean slate.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from evr1.config import Config
from evr1.data.schema import Sample, load_samples
from evr1.files import atomic_write_json, atomic_write_jsonl, file_sha256
from evr1.video.decode import load_visual
from evr1.video.shards import (
    MANIFEST_VERSION,
    MediaEntry,
    ShardWriter,
    TaskFiles,
    frames_sha256,
    merge_manifests,
    remove_stale_temporaries,
    task_is_complete,
)

log = logging.getLogger("evr1.preprocess")


@dataclass
class MediaJob:
    """One media file to decode, and every sample that uses it."""

    path: str
    data_type: str
    sample_ids: list[str] = field(default_factory=list)


@dataclass
class TaskSummary:
    task: int
    skipped: bool = False
    media: int = 0
    samples: int = 0
    failures: int = 0
    frames: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    backends: dict[str, int] = field(default_factory=dict)


def input_files(cfg: Config) -> list[str]:
    files = cfg.preprocess.inputs or [p for p in (cfg.data.train_jsonl, cfg.data.eval_jsonl) if p]
    if not files:
        raise ValueError("nothing to preprocess: set preprocess.inputs or data.train_jsonl")
    return files


def load_all_samples(cfg: Config) -> list[Sample]:
    """Samples of every input file; media are checked later, per file, as failures."""
    samples: list[Sample] = []
    seen: dict[str, str] = {}
    for path in input_files(cfg):
        for sample in load_samples(path, media_root=cfg.data.media_root or None,
                                   check_media=False, fallback_type=cfg.reward.fallback_type):
            if sample.id in seen:
                raise ValueError(f"{path}: sample id {sample.id!r} also appears in "
                                 f"{seen[sample.id]}")
            seen[sample.id] = path
            samples.append(sample)
    return samples


def collect_media(samples: list[Sample]) -> list[MediaJob]:
    """Distinct (path, data_type) pairs in order of first appearance; text samples have none."""
    jobs: dict[tuple[str, str], MediaJob] = {}
    for sample in samples:
        if sample.data_type == "text" or not sample.path:
            continue
        key = (str(sample.path), sample.data_type)
        jobs.setdefault(key, MediaJob(path=key[0], data_type=key[1])).sample_ids.append(sample.id)
    return list(jobs.values())


def task_slice(num_items: int, task: int, num_tasks: int) -> range:
    """Contiguous, balanced slice of ``num_items`` for array task ``task`` of ``num_tasks``."""
    if not 0 <= task < num_tasks:
        raise ValueError(f"task index {task} is outside 0..{num_tasks - 1}")
    return range(task * num_items // num_tasks, (task + 1) * num_items // num_tasks)


def sampling_params(cfg: Config, data_type: str) -> dict[str, object]:
    budget = cfg.data.video if data_type == "video" else cfg.data.image
    params: dict[str, object] = {"factor": cfg.data.resize_factor,
                                 "min_pixels": budget.min_pixels, "max_pixels": budget.max_pixels}
    if data_type == "video":
        params.update(fps=budget.fps, min_frames=budget.min_frames, max_frames=budget.max_frames,
                      total_pixels=budget.total_pixels,
                      temporal_patch=cfg.data.temporal_patch_size)
    return params


def preprocess_shard(cfg: Config, task: int) -> TaskSummary:
    """Preprocess array task ``task`` of ``cfg.preprocess.num_tasks``; safe to re-run."""
    num_tasks = cfg.preprocess.num_tasks
    out_dir = cfg.shard_dir
    files = TaskFiles.of(out_dir, task, num_tasks)
    if task_is_complete(files, verify=cfg.preprocess.verify_on_skip):
        log.info("task %d/%d already complete (%s): skipped", task, num_tasks, files.manifest.name)
        try_merge(out_dir, num_tasks)
        return TaskSummary(task=task, skipped=True)
    remove_stale_temporaries(out_dir, files)
    for stale in (files.manifest, files.failures, files.shard):
        stale.unlink(missing_ok=True)  # an incomplete earlier attempt: start clean

    jobs = collect_media(load_all_samples(cfg))
    mine = [jobs[i] for i in task_slice(len(jobs), task, num_tasks)]
    summary = TaskSummary(task=task, media=len(mine),
                          samples=sum(len(j.sample_ids) for j in mine))
    start = time.perf_counter()
    media, sample_media, failures = {}, {}, []
    writer = ShardWriter(files.shard, cfg.preprocess.compression)
    with writer:
        for n, job in enumerate(tqdm(mine, desc=f"preprocess task {task}/{num_tasks}",
                                     unit="file", mininterval=1.0)):
            try:
                visual = load_visual(job.path, job.data_type, cfg.data,
                                     backend=cfg.preprocess.backend,
                                     dali_device=cfg.preprocess.dali_device)
            except Exception as exc:  # one bad file must not cost the rest of the task
                reason = f"{type(exc).__name__}: {exc}"
                log.warning("%s: %s", job.path, reason)
                failures += [{"id": sid, "path": job.path, "reason": reason}
                             for sid in job.sample_ids]
                continue
            entry = store_visual(writer, files.shard.name, job, visual,
                                 sampling_params(cfg, job.data_type))
            media_id = f"{task:05d}-{n:06d}"
            media[media_id] = asdict(entry)
            sample_media.update({sid: media_id for sid in job.sample_ids})
            summary.frames += entry.num_frames
            summary.backends[entry.backend] = summary.backends.get(entry.backend, 0) + 1
        if media:
            writer.commit()
        else:
            writer.abort()
    summary.failures = len(failures)
    summary.seconds = time.perf_counter() - start
    summary.bytes_written = files.shard.stat().st_size if media else 0
    # Failures first, manifest last: the manifest part is the task's completion marker.
    atomic_write_jsonl(files.failures, failures)
    atomic_write_json(files.manifest, {
        "version": MANIFEST_VERSION, "task": task, "num_tasks": num_tasks,
        "shard": files.shard.name if media else None,
        "shard_sha256": file_sha256(files.shard) if media else None,
        "shard_bytes": summary.bytes_written,
        "media": media, "samples": sample_media, "stats": asdict(summary)})
    try_merge(out_dir, num_tasks)
    return summary


def store_visual(writer: ShardWriter, shard_name: str, job: MediaJob, visual,
                 sampling: dict[str, object]) -> MediaEntry:
    frames = visual.frames
    entry = MediaEntry(
        shard=shard_name, key="", path=job.path, data_type=job.data_type,
        shape=list(frames.shape), num_frames=int(frames.shape[0]), sha256=frames_sha256(frames),
        backend=visual.backend, indices=[int(i) for i in visual.indices],
        timestamps_s=[round(float(t), 6) for t in visual.timestamps_s],
        source_fps=float(visual.source_fps), source_num_frames=int(visual.source_num_frames),
        source_size=[int(s) for s in visual.source_size], sampling=sampling)
    attrs = asdict(entry)
    del attrs["shard"], attrs["key"]
    entry.key = writer.add(frames, attrs)
    return entry


def try_merge(out_dir: Path, num_tasks: int) -> bool:
    """Merge the manifests when every task has finished; any task may do it, idempotently."""
    parts = [TaskFiles.of(out_dir, t, num_tasks).manifest for t in range(num_tasks)]
    if not all(p.exists() for p in parts):
        return False
    merge_manifests(out_dir, num_tasks)
    return True
