"""HDF5 tensor shards: decoded, sampled, resized frames written once and read many times.

Layout of one shard (written by array task i of N)::

    shard-0000i-of-0000N.h5
      frames/<n>     uint8 [T, H, W, 3], attributes = sampling metadata of that media file

Several samples (questions) often share one video, so a shard stores each media file once and
the manifest maps every sample id to its dataset. A task writes, in this order:

1. the shard, under a temporary name, fsynced, then renamed into place;
2. ``manifest-i-of-N.json``, also atomically: its presence marks the task as complete;
3. ``failures-i-of-N.jsonl``: one line per sample that could not be decoded.

When every task is complete the parts are merged into ``manifest.json`` and ``failures.jsonl``.
Everything is JSON or HDF5: no pickle anywhere in the data path.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from evr1 import tasks
from evr1.config import DataConfig
from evr1.files import atomic_write_json, atomic_write_jsonl, file_sha256, fsync_dir, read_jsonl
from evr1.tasks import part_name

MANIFEST_VERSION = 1
MANIFEST = "manifest.json"
FAILURES = "failures.jsonl"


class ShardError(RuntimeError):
    """A shard or manifest is missing, incomplete or does not match its checksum."""


# --------------------------------------------------------------------------- naming


@dataclass(frozen=True)
class TaskFiles:
    """The three files one array task owns."""

    shard: Path
    manifest: Path
    failures: Path

    @classmethod
    def of(cls, out_dir: Path, task: int, num_tasks: int) -> TaskFiles:
        return cls(shard=out_dir / part_name("shard", task, num_tasks, ".h5"),
                   manifest=out_dir / part_name("manifest", task, num_tasks, ".json"),
                   failures=out_dir / part_name("failures", task, num_tasks, ".jsonl"))

    def marked(self, task: int, num_tasks: int) -> tasks.TaskFiles:
        """The same files as ``evr1.tasks`` sees them: the manifest part is the marker; a
        task whose every sample failed writes no shard, so the shard is not required."""
        return tasks.TaskFiles(task, num_tasks, marker=self.manifest, outputs=(self.failures,),
                               extra=(self.shard,))


def frames_sha256(frames: np.ndarray) -> str:
    """Content checksum of a frame tensor: shape and dtype are part of what is hashed."""
    digest = hashlib.sha256(f"{frames.dtype}{frames.shape}".encode())
    digest.update(np.ascontiguousarray(frames).data)
    return digest.hexdigest()


# --------------------------------------------------------------------------- manifest entries


@dataclass
class MediaEntry:
    """Where one decoded media file lives and how it was sampled."""

    shard: str  # file name inside the shard folder
    key: str  # dataset path inside the shard
    path: str  # source media file
    data_type: str  # video | image
    shape: list[int]  # [T, H, W, 3]
    num_frames: int
    sha256: str
    backend: str
    indices: list[int]
    timestamps_s: list[float]
    source_fps: float
    source_num_frames: int
    source_size: list[int]  # [h, w] before resizing
    sampling: dict[str, Any] = field(default_factory=dict)  # the budget that produced it


def sampling_params(data: DataConfig, data_type: str) -> dict[str, Any]:
    """The budget and geometry a media file of ``data_type`` is sampled and resized with:
    recorded with every entry (``MediaEntry.sampling``), and checked by ``ShardReader``
    against the config that reads the shards."""
    budget = data.video if data_type == "video" else data.image
    # Named settings before the derived factor, so that a mismatch names the field.
    params: dict[str, Any] = {"patch_size": data.patch_size, "merge_size": data.merge_size,
                              "factor": data.resize_factor, "min_pixels": budget.min_pixels,
                              "max_pixels": budget.max_pixels}
    if data_type == "video":
        params.update(fps=budget.fps, min_frames=budget.min_frames, max_frames=budget.max_frames,
                      total_pixels=budget.total_pixels, temporal_patch=data.temporal_patch_size)
    return params


def setting_name(param: str, data_type: str) -> str:
    """The config field behind a ``sampling_params`` key."""
    budget = "video" if data_type == "video" else "image"
    return {"factor": "data.patch_size x data.merge_size", "patch_size": "data.patch_size",
            "merge_size": "data.merge_size", "temporal_patch": "data.temporal_patch_size",
            }.get(param, f"data.{budget}.{param}")


# --------------------------------------------------------------------------- writing


class ShardWriter:
    """Writes one shard through a temporary file; ``commit`` makes it visible atomically.

    Chunking and compression: each frame is one chunk ([1, H, W, 3]) so a reader that wants a
    subset of frames (eval at fewer frames) touches only those, and a whole clip is a handful of
    contiguous chunk reads. LZF is the default compression: it decompresses at memory speed,
    which keeps shard loading far cheaper than decoding, and it halves the size of synthetic and
    screen-like content; real camera footage barely compresses losslessly, so ``none`` costs
    little there. gzip is available for cold storage but its decompression dominates load time.
    Byte-for-byte reproducible shards need ``none`` or ``gzip`` (see ``__init__``).
    """

    def __init__(self, final_path: Path, compression: str = "lzf") -> None:
        self.final_path = final_path
        self.compression = None if compression == "none" else compression
        final_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=final_path.parent, prefix=f".{final_path.name}.",
                                   suffix=".tmp")
        os.close(fd)
        self.tmp_path = Path(tmp)
        # track_order + no timestamps: the same frames give the same layout on a re-run, and a
        # byte-identical shard with compression none or gzip. Not with LZF: h5py's bundled
        # liblzf is built without INIT_HTAB, so its compressor starts from an uninitialised
        # hash table and may pick other (valid) matches from run to run. Such shards decompress
        # to the same frames; compare them by their frames' sha256, not the file's.
        self._h5 = h5py.File(self.tmp_path, "w", track_order=True)
        self._frames = self._h5.create_group("frames", track_order=True)
        self._count = 0
        self.bytes_raw = 0

    def add(self, frames: np.ndarray, attrs: dict[str, Any]) -> str:
        """Store one media file's frames; returns its dataset key."""
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [T,H,W,3], got {frames.dtype} {frames.shape}")
        key = f"frames/{self._count}"
        ds = self._frames.create_dataset(
            str(self._count), data=frames, chunks=(1, *frames.shape[1:]),
            compression=self.compression, track_times=False)
        for name, value in attrs.items():
            ds.attrs[name] = json.dumps(value) if isinstance(value, (dict, list)) else value
        self._count += 1
        self.bytes_raw += frames.nbytes
        return key

    def commit(self) -> None:
        self._h5.flush()
        self._h5.close()
        with open(self.tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp_path, self.final_path)
        fsync_dir(self.final_path.parent)

    def abort(self) -> None:
        try:
            self._h5.close()
        finally:
            self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def remove_stale_temporaries(out_dir: Path, task_files: TaskFiles) -> None:
    """Delete temporary files a killed earlier attempt of this task left behind."""
    for final in (task_files.shard, task_files.manifest, task_files.failures):
        for tmp in out_dir.glob(f".{final.name}.*.tmp"):
            tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- task completion


def load_task_manifest(task_files: TaskFiles) -> dict[str, Any] | None:
    if not task_files.manifest.exists():
        return None
    try:
        return json.loads(task_files.manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def task_is_complete(task_files: TaskFiles, verify: bool = True) -> bool:
    """A task is complete when its manifest part exists and its shard matches the checksum."""
    part = load_task_manifest(task_files)
    if part is None or not task_files.failures.exists():
        return False
    if part.get("shard") is None:  # a task whose every sample failed writes no shard
        return True
    if not task_files.shard.exists():
        return False
    if task_files.shard.stat().st_size != part["shard_bytes"]:
        return False
    return not verify or file_sha256(task_files.shard) == part["shard_sha256"]


# --------------------------------------------------------------------------- merging


def merge_manifests(out_dir: Path, num_tasks: int) -> dict[str, Any]:
    """Merge every task's manifest and failures into ``manifest.json`` / ``failures.jsonl``.

    Raises ShardError naming the tasks that are not complete yet.
    """
    parts, missing = [], []
    for task in range(num_tasks):
        part = load_task_manifest(TaskFiles.of(out_dir, task, num_tasks))
        (missing.append(task) if part is None else parts.append(part))
    if missing:
        raise ShardError(f"{out_dir}: tasks {missing} of {num_tasks} have no manifest yet")
    settings = [tasks.recorded_settings(part) for part in parts]
    if any(s != settings[0] for s in settings):  # only tasks run by hand with other configs
        odd = [t for t, s in enumerate(settings) if s != settings[0]]
        raise ShardError(f"{out_dir}: tasks {odd} of {num_tasks} were made with other settings "
                         "than task 0: "
                         + "; ".join(tasks.differences(settings[0] or {}, settings[odd[0]] or {}))
                         + " (re-run the stage with the settings wanted and --force)")
    samples: dict[str, Any] = {}
    media: dict[str, Any] = {}
    shards = []
    for part in parts:
        if part.get("shard"):
            shards.append({k: part[k] for k in ("task", "shard", "shard_sha256", "shard_bytes")})
        media.update(part["media"])
        samples.update(part["samples"])
    failures = []
    for task in range(num_tasks):
        failures.extend(read_jsonl(TaskFiles.of(out_dir, task, num_tasks).failures))
    merged = {"version": MANIFEST_VERSION, "num_tasks": num_tasks, "shards": shards,
              "media": media, "samples": samples, "num_failures": len(failures)}
    if settings[0] is not None:
        merged["settings"] = settings[0]
    atomic_write_json(out_dir / MANIFEST, merged)
    atomic_write_jsonl(out_dir / FAILURES, failures)
    return merged


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ShardSample:
    frames: np.ndarray  # uint8 [T, H, W, 3]
    media: MediaEntry


class ShardReader:
    """Frames + sampling metadata for a sample id, in O(1), from a merged shard folder.

    Safe across DataLoader worker processes: HDF5 handles are opened lazily and per process
    (a handle inherited through fork is never reused), so each worker reads with its own.

    Given the reading config's ``data`` section, the budget and geometry every entry was
    made with (fps, frame counts, pixel budgets, patch / merge / temporal patch sizes) must
    be the config's: frames sampled for another model or budget are refused (ShardError
    naming the setting, the folder and both values), not fed to the model.
    """

    def __init__(self, shard_dir: str | Path, data: DataConfig | None = None) -> None:
        self.shard_dir = Path(shard_dir)
        manifest_path = self.shard_dir / MANIFEST
        if not manifest_path.exists():
            raise ShardError(f"{manifest_path} not found: run the preprocess stage (and its "
                             "merge) first: python launchers/preprocess.py --config C --array")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("version") != MANIFEST_VERSION:
            raise ShardError(f"{manifest_path}: manifest version {manifest.get('version')} "
                             f"is not {MANIFEST_VERSION}")
        self.media = {k: MediaEntry(**v) for k, v in manifest["media"].items()}
        self.sample_media: dict[str, str] = manifest["samples"]
        self._handles: dict[str, h5py.File] = {}
        self._pid = os.getpid()
        if data is not None:
            self.check_settings(data)

    def check_settings(self, data: DataConfig) -> None:
        """Raise ShardError at the first recorded sampling setting that is not ``data``'s."""
        seen: set[tuple[str, str]] = set()
        for entry in self.media.values():
            key = (entry.data_type, json.dumps(entry.sampling, sort_keys=True))
            if key in seen:
                continue
            seen.add(key)
            expected = sampling_params(data, entry.data_type)
            # Shards of older versions record fewer keys; each recorded one is checked.
            for name, want in expected.items():
                if name in entry.sampling and entry.sampling[name] != want:
                    setting = setting_name(name, entry.data_type)
                    raise ShardError(
                        f"{self.shard_dir}: {setting} is {entry.sampling[name]} in these shards "
                        f"(e.g. {entry.data_type} {entry.path}) but {want} in this config: its "
                        "frames were sampled and resized for the recorded value. Set "
                        f"{setting} back, or preprocess again with this config (python "
                        "launchers/preprocess.py --config C --array --force, or another "
                        "preprocess.out_dir)")

    def __len__(self) -> int:
        return len(self.sample_media)

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self.sample_media

    @property
    def ids(self) -> list[str]:
        return list(self.sample_media)

    def entry(self, sample_id: str) -> MediaEntry:
        try:
            return self.media[self.sample_media[sample_id]]
        except KeyError:
            raise KeyError(f"sample {sample_id!r} is not in {self.shard_dir / MANIFEST} "
                           "(not preprocessed, or recorded in failures.jsonl)") from None

    def get(self, sample_id: str) -> ShardSample:
        entry = self.entry(sample_id)
        return ShardSample(frames=self.read_frames(entry), media=entry)

    def read_frames(self, entry: MediaEntry) -> np.ndarray:
        return self._file(entry.shard)[entry.key][()]

    def _file(self, shard: str) -> h5py.File:
        if os.getpid() != self._pid:  # forked into a worker: never share a parent's handle
            self._handles = {}
            self._pid = os.getpid()
        handle = self._handles.get(shard)
        if handle is None:
            handle = h5py.File(self.shard_dir / shard, "r")
            self._handles[shard] = handle
        return handle

    def close(self) -> None:
        if os.getpid() == self._pid:
            for handle in self._handles.values():
                handle.close()
        self._handles = {}

    def __getstate__(self) -> dict[str, Any]:
        # Spawned DataLoader workers receive the reader without any open handle.
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

