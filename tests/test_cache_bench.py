"""benchmarks/cache_gpu.py on CPU: its clips, its loader order check, and a whole --tiny run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from evr1.data.dataset import PromptSampler
from evr1.data.synthetic import real_video_files
from evr1.rollout.base import Prompt
from evr1.video.decode import probe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    # Importable by name: its worker processes (forkserver) unpickle its functions so.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        yield importlib.import_module("cache_gpu")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_clips_are_looped_to_the_asked_length_and_size(bench, tmp_path):
    source = real_video_files()[0]
    out = bench.encode_clip(str(source), str(tmp_path / "long.mp4"), 5.0, (96, 64), 6)
    info = probe(out)
    # 5 s at 6 fps: 30 frames, whatever the source's length (its clips are 4-10 s long).
    assert (info.num_frames, info.width, info.height, info.codec) == (30, 96, 64, "h264")
    assert abs(info.fps - 6) < 1e-6


def test_loader_batches_follow_the_trainers_sampler(bench):
    batches = bench.step_batches(5, seed=3, per_step=2, steps=4)
    sampler = PromptSampler(5, 3)
    assert batches == [sampler.next(2) for _ in range(4)]


def test_loader_prompts_out_of_order_are_an_error(bench):
    class Base:
        samples = [type("S", (), {"id": f"s{i}"})() for i in range(2)]
        reader, default_fps = None, 2.0

    feed = iter([[Prompt("s1", "?", "video")]])
    prompts = bench.TimedPrompts(Base(), "loader", None, feed)
    with pytest.raises(RuntimeError, match="loader order: got s1, the trainer drew s0"):
        prompts.prompt(0)


@pytest.mark.slow
def test_tiny_run_reports_every_series(bench, tmp_path):
    out = tmp_path / "cache.md"
    assert bench.main(["--tiny", "--device", "cpu", "--workdir", str(tmp_path / "w"),
                       "--out", str(out), "--inline"]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert set(data["series"]) == {"shards", "loader (2 workers)", "decode in the step"}
    for series in data["series"].values():
        assert len(series["timings"]) == 1 and len(series["warmup_step_s"]) == 1
        assert series["timings"][0]["step_s"] > 0
    assert data["setup"]["frames_per_prompt"] == 4  # the tiny budget: 4 frames
    assert data["decode_workers"]["workers"] == 2 and data["shard_read"]["GB"] > 0
    table = out.read_text()
    assert table.count("| shards |") == 1 and "| decode in the step |" in table
