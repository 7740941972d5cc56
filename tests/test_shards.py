"""HDF5 shards: atomic writes, completion markers, O(1) reads, reads from DataLoader workers."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from evr1.config import load_config
from evr1.files import atomic_write_json, atomic_write_jsonl, file_sha256
from evr1.video.shards import (
    MANIFEST,
    MediaEntry,
    ShardError,
    ShardReader,
    ShardWriter,
    TaskFiles,
    frames_sha256,
    merge_manifests,
    sampling_params,
    task_is_complete,
)


def clip(seed: int, t: int = 4, h: int = 28, w: int = 56) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def write_task(out: Path, task: int, num_tasks: int, clips: dict[str, np.ndarray],
               sampling: dict | None = None) -> None:
    """A minimal task: one shard with the given clips, then failures, then the manifest."""
    files = TaskFiles.of(out, task, num_tasks)
    writer = ShardWriter(files.shard, "lzf")
    media, samples = {}, {}
    for n, (sample_id, frames) in enumerate(clips.items()):
        key = writer.add(frames, {"path": f"{sample_id}.mp4"})
        entry = MediaEntry(shard=files.shard.name, key=key, path=f"{sample_id}.mp4",
                           data_type="video", shape=list(frames.shape),
                           num_frames=frames.shape[0], sha256=frames_sha256(frames),
                           backend="pyav", indices=list(range(frames.shape[0])),
                           timestamps_s=[0.5 * i for i in range(frames.shape[0])],
                           source_fps=2.0, source_num_frames=frames.shape[0],
                           source_size=[frames.shape[1], frames.shape[2]],
                           sampling=sampling or {})
        media[f"{task}-{n}"] = asdict(entry)
        samples[sample_id] = f"{task}-{n}"
    writer.commit()
    atomic_write_jsonl(files.failures, [{"id": f"bad{task}", "path": "x.mp4", "reason": "empty"}])
    atomic_write_json(files.manifest, {
        "version": 1, "task": task, "num_tasks": num_tasks, "shard": files.shard.name,
        "shard_sha256": file_sha256(files.shard), "shard_bytes": files.shard.stat().st_size,
        "media": media, "samples": samples})


def test_writer_is_invisible_until_commit_and_abort_leaves_nothing(tmp_path):
    final = tmp_path / "shard-00000-of-00001.h5"
    writer = ShardWriter(final)
    writer.add(clip(0), {"path": "a.mp4"})
    assert not final.exists(), "a half-written shard must not be visible under its final name"
    writer.abort()
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(RuntimeError), ShardWriter(final) as writer:
        writer.add(clip(1), {})
        raise RuntimeError("killed midway")
    assert list(tmp_path.iterdir()) == [], "an exception must not leave a temporary behind"


def test_writer_stores_frames_per_frame_chunks_with_attributes(tmp_path):
    final = tmp_path / "s.h5"
    writer = ShardWriter(final, "lzf")
    frames = clip(2)
    key = writer.add(frames, {"indices": [0, 2, 4, 6], "backend": "pyav"})
    writer.commit()
    with h5py.File(final, "r") as f:
        ds = f[key]
        np.testing.assert_array_equal(ds[()], frames)
        assert ds.chunks == (1, 28, 56, 3)
        assert ds.compression == "lzf"
        assert json.loads(ds.attrs["indices"]) == [0, 2, 4, 6]
        assert ds.attrs["backend"] == "pyav"


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_writer_gives_byte_identical_shards_without_lzf(tmp_path, compression):
    """The same frames and attributes, written twice (with other work in between, which
    leaves other memory behind): the same bytes. (LZF's are not reproducible; its frames are,
    which the preprocess re-run tests check.)"""
    def write(name: str) -> bytes:
        writer = ShardWriter(tmp_path / name, compression)
        for seed in range(3):
            writer.add(clip(seed), {"indices": [0, 1, 2, 3], "backend": "pyav"})
        writer.commit()
        return (tmp_path / name).read_bytes()

    first = write("a.h5")
    np.sort(np.random.default_rng(0).random(1 << 18))  # other work between the two writes
    assert write("b.h5") == first


def test_writer_rejects_non_uint8_rgb(tmp_path):
    writer = ShardWriter(tmp_path / "s.h5")
    with pytest.raises(ValueError, match="uint8"):
        writer.add(np.zeros((2, 4, 4, 3), np.float32), {})
    with pytest.raises(ValueError, match=r"\[T,H,W,3\]"):
        writer.add(np.zeros((2, 4, 4), np.uint8), {})
    writer.abort()


def test_identical_inputs_give_byte_identical_shards(tmp_path):
    for name in ("a", "b"):
        write_task(tmp_path / name, 0, 1, {"s0": clip(0), "s1": clip(1)})
    assert file_sha256(tmp_path / "a" / "shard-00000-of-00001.h5") == \
        file_sha256(tmp_path / "b" / "shard-00000-of-00001.h5")


def test_task_complete_only_when_manifest_present_and_checksum_matches(tmp_path):
    files = TaskFiles.of(tmp_path, 0, 1)
    assert not task_is_complete(files)
    write_task(tmp_path, 0, 1, {"s0": clip(0)})
    assert task_is_complete(files)
    # Flip one byte inside the frame data: same size, different content.
    data = bytearray(files.shard.read_bytes())
    data[-100] ^= 0xFF
    files.shard.write_bytes(bytes(data))
    assert not task_is_complete(files, verify=True)
    files.shard.unlink()
    assert not task_is_complete(files, verify=False)


def test_merge_names_missing_tasks_and_combines_parts(tmp_path):
    write_task(tmp_path, 0, 3, {"s0": clip(0)})
    write_task(tmp_path, 2, 3, {"s2": clip(2)})
    with pytest.raises(ShardError, match=r"tasks \[1\] of 3"):
        merge_manifests(tmp_path, 3)
    write_task(tmp_path, 1, 3, {"s1": clip(1), "s1b": clip(3)})
    merged = merge_manifests(tmp_path, 3)
    assert set(merged["samples"]) == {"s0", "s1", "s1b", "s2"}
    assert merged["num_failures"] == 3
    failures = (tmp_path / "failures.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in failures] == ["bad0", "bad1", "bad2"]


def test_reader_returns_exact_frames_and_metadata(tmp_path):
    clips = {f"s{i}": clip(i, t=2 + 2 * (i % 2)) for i in range(6)}
    write_task(tmp_path, 0, 2, dict(list(clips.items())[:3]))
    write_task(tmp_path, 1, 2, dict(list(clips.items())[3:]))
    merge_manifests(tmp_path, 2)
    reader = ShardReader(tmp_path)
    assert len(reader) == 6 and "s4" in reader and "nope" not in reader
    for sample_id, frames in clips.items():
        got = reader.get(sample_id)
        np.testing.assert_array_equal(got.frames, frames)
        assert got.media.sha256 == frames_sha256(frames)
        assert got.media.num_frames == frames.shape[0]
    with pytest.raises(KeyError, match="failures.jsonl"):
        reader.get("nope")
    reader.close()


def test_reader_without_manifest_says_what_to_run(tmp_path):
    with pytest.raises(ShardError, match="launchers/preprocess.py"):
        ShardReader(tmp_path)


class _ShardFrames(torch.utils.data.Dataset):
    def __init__(self, reader: ShardReader, ids: list[str]) -> None:
        self.reader, self.ids = reader, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[str, str]:
        return self.ids[i], frames_sha256(self.reader.get(self.ids[i]).frames)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_reader_in_dataloader_workers(tmp_path, context):
    clips = {f"s{i}": clip(i) for i in range(8)}
    write_task(tmp_path, 0, 1, clips)
    merge_manifests(tmp_path, 1)
    reader = ShardReader(tmp_path)
    reader.get("s0")  # the parent opens a handle first: workers must not reuse it
    loader = torch.utils.data.DataLoader(
        _ShardFrames(reader, list(clips)), batch_size=None, num_workers=2,
        multiprocessing_context=context)
    got = dict(loader)
    assert got == {k: frames_sha256(v) for k, v in clips.items()}
    assert json.loads((tmp_path / MANIFEST).read_text())["version"] == 1


def test_reader_refuses_shards_of_another_budget_or_geometry(tmp_path):
    """Frames sampled at 2 fps for Qwen2.5-VL's patch 14 are not read by a config that asks
    for 1 fps, another pixel budget, or Qwen3-VL's patch 16: the error names the setting, the
    folder and both values."""
    demo = Path(__file__).resolve().parents[1] / "configs/demo_cpu.yaml"
    made_with = load_config(demo, [])
    write_task(tmp_path, 0, 1, {"s0": clip(0)}, sampling_params(made_with.data, "video"))
    merge_manifests(tmp_path, 1)
    assert ShardReader(tmp_path, made_with.data).get("s0").media.sampling["fps"] == 2.0
    ShardReader(tmp_path)  # without a config (tools/inspect_shards.py): no check
    cases = [(["data.video.fps=1.0"], "data.video.fps is 2.0 in these shards", "but 1.0"),
             (["data.video.max_frames=8"], "data.video.max_frames is 4 in", "but 8"),
             (["data.video.max_pixels=6272"], "data.video.max_pixels is 3136 in", "but 6272"),
             (["data.temporal_patch_size=1"], "data.temporal_patch_size is 2 in", "but 1"),
             (["model.family=qwen3_vl", "data.patch_size=16"], "data.patch_size is 14 in",
              "but 16")]
    for overrides, recorded, wanted in cases:
        reading = load_config(demo, overrides)
        with pytest.raises(ShardError) as err:
            ShardReader(tmp_path, reading.data)
        message = str(err.value)
        assert message.startswith(f"{tmp_path}: ") and recorded in message, message
        assert wanted in message and "s0.mp4" in message
    # The image budget does not concern a folder of videos.
    ShardReader(tmp_path, load_config(demo, ["data.image.max_pixels=50000"]).data)


def test_reader_checks_what_shards_of_older_versions_recorded(tmp_path):
    # Before patch_size / merge_size were recorded, only their product was.
    cfg = load_config(None, [])
    old = {k: v for k, v in sampling_params(cfg.data, "video").items()
           if k not in ("patch_size", "merge_size")}
    write_task(tmp_path, 0, 1, {"s0": clip(0)}, old)
    merge_manifests(tmp_path, 1)
    ShardReader(tmp_path, cfg.data)
    with pytest.raises(ShardError, match=r"data.patch_size x data.merge_size is 28 .* but 32"):
        ShardReader(tmp_path, load_config(None, ["model.family=qwen3_vl",
                                                 "data.patch_size=16"]).data)
