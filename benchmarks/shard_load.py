"""Loading a training sample from shards vs decoding + sampling + resizing it on the fly.

    python benchmarks/shard_load.py                      # demo data, two budgets
    python benchmarks/shard_load.py --repeats 5

For each budget the media files are preprocessed once into a shard (not timed), then every
sample is loaded both ways, side by side in the same process, and the frames are checked to be
identical. Prints samples/s for both paths and the ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from evr1.config import Config, load_config
from evr1.data.synthetic import make_synthetic
from evr1.video.decode import load_visual
from evr1.video.preprocess import collect_media, load_all_samples, preprocess_shard
from evr1.video.shards import ShardReader

ROOT = Path(__file__).resolve().parents[1]

BUDGETS = {
    # The CPU demo: 4 frames of at most 56x56.
    "demo (4 frames, 56x56)": [],
    # Qwen-VL video defaults as in the method's recipe: 2 fps, up to 128 frames, 262,144 px.
    "qwen default (2 fps, <=128 frames, 262k px)": [
        "data.video.min_pixels=100352", "data.video.max_pixels=262144",
        "data.video.max_frames=128", "data.image.max_pixels=1048576"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-videos", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        base = load_config(ROOT / "configs/demo_cpu.yaml",
                           [f"synthetic.out_dir={data}", f"synthetic.num_videos={args.num_videos}",
                            "synthetic.include_corrupt=false"])
        make_synthetic(base.synthetic, progress=False)
        print(f"{'budget':<46} {'samples':>7} {'frames/sample':>13} {'decode/s':>9} "
              f"{'shard/s':>9} {'ratio':>7}")
        for name, overrides in BUDGETS.items():
            cfg = load_config(ROOT / "configs/demo_cpu.yaml", [
                f"run_dir={tmp}/{len(overrides)}", f"data.train_jsonl={data / 'train.jsonl'}",
                f"data.eval_jsonl={data / 'heldout.jsonl'}", "preprocess.num_tasks=1",
                *overrides])
            measure(name, cfg, args.repeats)


def measure(name: str, cfg: Config, repeats: int) -> None:
    preprocess_shard(cfg, 0)
    reader = ShardReader(cfg.shard_dir)
    jobs = [j for j in collect_media(load_all_samples(cfg)) if j.sample_ids[0] in reader]
    backend = {j.path: reader.entry(j.sample_ids[0]).backend.split("-")[0] for j in jobs}

    def from_video() -> list[np.ndarray]:
        return [load_visual(j.path, j.data_type, cfg.data, backend=backend[j.path]).frames
                for j in jobs]

    def from_shard() -> list[np.ndarray]:
        return [reader.get(j.sample_ids[0]).frames for j in jobs]

    decoded, loaded = from_video(), from_shard()  # warm-up, and the same-frames check
    for a, b in zip(decoded, loaded, strict=True):
        np.testing.assert_array_equal(a, b)
    t_decode = best_of(from_video, repeats)
    t_shard = best_of(from_shard, repeats)
    frames = sum(x.shape[0] for x in loaded) / len(loaded)
    print(f"{name:<46} {len(jobs):>7} {frames:>13.1f} {len(jobs) / t_decode:>9.1f} "
          f"{len(jobs) / t_shard:>9.1f} {t_decode / t_shard:>6.1f}x")


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


if __name__ == "__main__":
    main()
