"""benchmarks/cache_gpu.py on CPU: its clips, its loader order check, and that every frame source
it times gives the trainer the same prompts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evr1.data.dataset import PromptSampler, PromptSet
from evr1.data.schema import write_samples
from evr1.data.synthetic import real_video_files
from evr1.pipeline import stages
from evr1.rollout.base import Prompt
from evr1.video.decode import probe
from evr1.video.shards import ShardReader

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


def test_every_frame_source_gives_the_trainer_the_same_prompts(bench, tmp_path):
    """The benchmark compares like with like: for its tiny clips, the shards, the DataLoader's
    items (what its workers return) and decoding in the step give each sample the same
    prompt, and the loader path hands the trainer's sampler order through. The timed run is
    the benchmark itself (``python benchmarks/cache_gpu.py --tiny``, docs/performance.md), not
    a test: its model build, worker processes and timed steps took ~150 s of CI."""
    args = bench.parse_args(["--tiny", "--device", "cpu"])
    sources = real_video_files()[:args.clips]
    clips = [Path(bench.encode_clip(str(source), str(tmp_path / f"clip-{i}.mp4"),
                                    args.clip_seconds, bench.clip_size(args), args.clip_fps))
             for i, source in enumerate(sources)]
    train_jsonl = tmp_path / "train.jsonl"
    write_samples(train_jsonl, bench.clip_samples(clips))
    cfg = bench.config(args, tmp_path, train_jsonl, "cpu")
    assert stages.preprocess_sequential(cfg) == 0
    base = PromptSet.load(str(train_jsonl), ShardReader(cfg.shard_dir, cfg.data))
    assert len(base) == args.clips

    def same(got: Prompt, want: Prompt) -> None:
        assert (got.sample_id, got.problem, got.data_type) == \
            (want.sample_id, want.problem, want.data_type)
        np.testing.assert_array_equal(got.frames, want.frames)
        # Both rates are (frames - 1) / (last - first timestamp) of the same sampled frames.
        assert got.fps == want.fps

    decoded = bench.DecodedVideos(base.samples, cfg.data)
    inline = bench.TimedPrompts(base, "inline", cfg.data)
    for i in range(len(base)):
        assert base.prompt(i).frames.shape[0] == 4  # the tiny budget: 4 frames
        same(decoded[i], base.prompt(i))
        same(inline.prompt(i), base.prompt(i))
    # The loader path, in this process (num_workers=0): batches in the sampler's order.
    batches = bench.step_batches(len(base), cfg.seed, args.prompts, 3)
    loader = torch.utils.data.DataLoader(decoded, batch_sampler=batches, num_workers=0,
                                         collate_fn=bench.as_list)
    fed = bench.TimedPrompts(base, "loader", cfg.data, iter(loader))
    for index in (i for batch in batches for i in batch):
        same(fed.prompt(index), base.prompt(index))
    assert fed.seconds > 0 and inline.seconds > 0
