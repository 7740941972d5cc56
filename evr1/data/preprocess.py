"""One preprocessing array task: its slice of media files -> decoded, sampled frames -> a shard.

The work list is the set of distinct media files referenced by the input JSONL files (several
questions often share one video: it is decoded and stored once). Task ``i`` of ``N`` takes a
contiguous slice of that list (``evr1.tasks.contiguous``), so every task can compute its own
share from the config alone, with no coordinator. The manifest part is the task's completion
marker (``evr1.tasks``): it records the settings that decide the frames (budgets, geometry,
decoder, compression, the input files' checksums). A re-run skips a task finished with the
same settings (and whose shard still matches its checksum), starts an unfinished one over
from a clean slate, and refuses one finished with other settings unless ``force`` is given
(then it is redone).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from evr1 import tasks
from evr1.config import Config
from evr1.data.schema import Sample, load_samples
from evr1.files import atomic_write_jsonl, file_sha256
from evr1.video.decode import load_visual
from evr1.video.shards import (
    FAILURES,
    MANIFEST,
    MANIFEST_VERSION,
    MediaEntry,
    ShardWriter,
    TaskFiles,
    frames_sha256,
    merge_manifests,
    remove_stale_temporaries,
    sampling_params,
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


REDO = tasks.redo_hint("python launchers/preprocess.py --config C --array (for benchmark "
                       "frames: launchers/eval.py --preprocess)", "preprocess.out_dir")


def settings(cfg: Config) -> dict[str, object]:
    """What decides a task's frames: a task finished with other settings is not reused."""
    d = cfg.data
    return {
        "data": {"video": asdict(d.video),
                 "image": {"min_pixels": d.image.min_pixels, "max_pixels": d.image.max_pixels},
                 "patch_size": d.patch_size, "merge_size": d.merge_size,
                 "temporal_patch_size": d.temporal_patch_size,
                 "max_source_pixels": d.max_source_pixels, "media_root": d.media_root},
        "preprocess": {"backend": cfg.preprocess.backend,
                       "dali_device": cfg.preprocess.dali_device,
                       "compression": cfg.preprocess.compression,
                       "num_tasks": cfg.preprocess.num_tasks},
        # Which media files exist and which task takes each: the inputs' content.
        "inputs": {path: file_sha256(Path(path)) for path in input_files(cfg)}}


def task_files(cfg: Config) -> list[tasks.TaskFiles]:
    n = cfg.preprocess.num_tasks
    return [TaskFiles.of(cfg.shard_dir, t, n).marked(t, n) for t in range(n)]


def check_tasks(cfg: Config, force: bool = False, only: list[int] | None = None) -> list[int]:
    """Before the array runs: ``SettingsMismatch`` naming every task (of ``only``, default
    all) finished with other settings and what changed, or with ``force`` their files (and
    the merged manifest made from them) deleted. Returns the tasks cleared."""
    current = settings(cfg)
    chosen = [f for f in task_files(cfg) if only is None or f.task in only]
    cleared = tasks.check_stage([(f, current) for f in chosen], force=force, redo=REDO)
    if cleared:
        drop_merged(cfg.shard_dir)
    return cleared


def drop_merged(out_dir: Path) -> None:
    for name in (MANIFEST, FAILURES):  # made from tasks that are being redone
        (out_dir / name).unlink(missing_ok=True)


def preprocess_shard(cfg: Config, task: int, force: bool = False) -> TaskSummary:
    """Preprocess array task ``task`` of ``cfg.preprocess.num_tasks``; safe to re-run.

    A task finished with other settings raises ``evr1.tasks.SettingsMismatch``; with
    ``force`` it is redone (a task finished with these settings is skipped either way)."""
    num_tasks = cfg.preprocess.num_tasks
    tasks.check_index(task, num_tasks)
    out_dir = cfg.shard_dir
    files = TaskFiles.of(out_dir, task, num_tasks)
    current = settings(cfg)
    status = tasks.claim(files.marked(task, num_tasks), current, force=force, redo=REDO)
    if status == tasks.COMPLETE and task_is_complete(files, verify=cfg.preprocess.verify_on_skip):
        log.info("task %d/%d already complete (%s): skipped", task, num_tasks, files.manifest.name)
        try_merge(out_dir, num_tasks)
        return TaskSummary(task=task, skipped=True)
    if status == tasks.STALE:
        drop_merged(out_dir)
    remove_stale_temporaries(out_dir, files)
    for stale in (files.manifest, files.failures, files.shard):
        stale.unlink(missing_ok=True)  # an incomplete earlier attempt: start clean

    jobs = collect_media(load_all_samples(cfg))
    mine = [jobs[i] for i in tasks.contiguous(len(jobs), task, num_tasks)]
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
                                 sampling_params(cfg.data, job.data_type))
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
    tasks.write_marker(
        files.marked(task, num_tasks), current,
        version=MANIFEST_VERSION, task=task, num_tasks=num_tasks,
        shard=files.shard.name if media else None,
        shard_sha256=file_sha256(files.shard) if media else None,
        shard_bytes=summary.bytes_written,
        media=media, samples=sample_media, stats=asdict(summary))
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
