"""Pre-flight check: every prompt a job will build fits its token budget, before the job starts.

A Qwen-VL prompt is the chat template's text with one placeholder token per merged vision
patch in place of each visual: a video of T frames of H x W pixels takes

    T / temporal_patch x (H / patch) x (W / patch) / merge^2

tokens (an image the same with one temporal patch), and Qwen3-VL also writes a
``<t seconds>`` stamp and a vision start/end pair before and after each temporal patch. A
prompt over ``data.max_prompt_length``, or one whose longest response would run past the
model's context, fails hours into a job, or worse, gets cut and then fails with "video
features and video tokens do not match" (the placeholders no longer match the frames). This
check counts every sample's prompt from the shapes of its cached frames (the shard manifest:
no frame is read) and the model's own tokenizer and chat template, refuses naming each sample
that would overflow (and each whose frames do not fit the model's patch grid), and otherwise
prints the token budget per data file: min / median / max vision and prompt tokens.

    python -m evr1.models.preflight --config C [key=value ...]   # the training data
    python -m evr1.eval.preflight --config C [key=value ...]     # the eval benchmarks

The pipeline runs it at the start of the train job and before the eval tasks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from evr1.config import Config, ConfigError, load_config
from evr1.data.dataset import PromptSet, sampled_fps
from evr1.data.schema import Sample
from evr1.models.inputs import build_prompt_messages
from evr1.models.loading import load_processor, read_model_type
from evr1.models.tokenizer import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START
from evr1.video.shards import ShardError, ShardReader

# Model types whose processor writes a "<t seconds>" stamp before each temporal patch.
TIMESTAMPED = ("qwen3_vl", "qwen3_vl_moe")
# Prompts tokenized per call: the fast tokenizer encodes a batch on all cores.
BATCH = 512
# Stands for the problem text when the chat template is rendered once per data type.
_SENTINEL = "\x00evr1-problem\x00"
# How many refused samples an error message lists (all of them are in the report).
SHOWN = 20


class PreflightError(ValueError):
    """A sample's prompt would not fit (or its frames do not fit the model's patch grid)."""


@dataclass(frozen=True)
class VisionGeometry:
    """Patch size, spatial merge and temporal patch of one modality's processor."""

    patch: int
    merge: int
    temporal: int

    @classmethod
    def of(cls, sub_processor: Any) -> VisionGeometry:
        return cls(int(sub_processor.patch_size), int(sub_processor.merge_size),
                   int(sub_processor.temporal_patch_size))

    @property
    def factor(self) -> int:
        return self.patch * self.merge

    def problem(self, data_type: str, frames: int, height: int, width: int) -> str | None:
        """Why frames of this shape cannot be encoded, or None."""
        if height % self.factor or width % self.factor:
            return (f"frames are {height}x{width}, not multiples of {self.factor} (patch "
                    f"{self.patch} x merge {self.merge}): the shards were made for another "
                    "model family (data.patch_size); preprocess again")
        if data_type == "video" and frames % self.temporal:
            return f"{frames} frames is not a multiple of the temporal patch {self.temporal}"
        if data_type == "image" and frames != 1:
            return f"an image has one frame, the cache holds {frames}"
        return None

    def groups(self, frames: int) -> int:
        """Temporal patches (the first entry of the processor's grid_thw)."""
        return -(-frames // self.temporal)

    def tokens_per_group(self, height: int, width: int) -> int:
        return (height // self.patch) * (width // self.patch) // self.merge ** 2

    def tokens(self, frames: int, height: int, width: int) -> int:
        """Placeholder tokens of one visual: groups x merged patches per group."""
        return self.groups(frames) * self.tokens_per_group(height, width)


def model_context(model_dir: str | Path) -> int | None:
    """The text model's ``max_position_embeddings`` from config.json (None when absent)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    text = config.get("text_config") or {}
    value = text.get("max_position_embeddings") or config.get("max_position_embeddings")
    return int(value) if value else None


def frame_timestamps(frames: int, fps: float, temporal: int) -> list[float]:
    """Qwen3-VL's stamp per temporal patch: the mean time of its first and last frame, with
    frame i at i / fps (evr1 passes the sampled frames as indices 0..T-1 at their rate)."""
    times = [i / fps for i in range(frames)]
    times += [times[-1]] * (-len(times) % temporal)  # the processor repeats the last frame
    return [(times[i] + times[i + temporal - 1]) / 2 for i in range(0, len(times), temporal)]


@dataclass(frozen=True)
class PromptCount:
    vision_tokens: int
    prompt_tokens: int  # the whole prompt: template text, stamps and vision placeholders


class TokenCounter:
    """Prompt lengths as one model folder's processor builds them (``evr1.models.inputs.
    encode``), without pixels: the text is rendered and tokenized with one placeholder per
    visual (per temporal patch for Qwen3-VL), and the placeholders are then counted at the
    number of tokens the frames take."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        self.processor = load_processor(self.model_dir)
        self.timestamped = read_model_type(self.model_dir) in TIMESTAMPED
        self.context = model_context(self.model_dir)
        self.video = VisionGeometry.of(self.processor.video_processor)
        self.image = VisionGeometry.of(self.processor.image_processor)
        vocab = self.processor.tokenizer.get_vocab()
        self.placeholder_ids = {vocab[t] for t in (IMAGE_PAD, VIDEO_PAD) if t in vocab}
        # data type -> the template's text around the problem, or None: render every prompt
        self._frames: dict[str, tuple[str, str] | None] = {}

    def geometry(self, data_type: str) -> VisionGeometry:
        return self.video if data_type == "video" else self.image

    def count(self, problem: str, data_type: str, shape: tuple[int, int, int] | None = None,
              fps: float = 2.0) -> PromptCount:
        """``shape`` is (frames, height, width) of the cached visual (None for text)."""
        return self.count_many([(problem, data_type, shape, fps)])[0]

    def count_many(self, items: Sequence[tuple[str, str, tuple[int, int, int] | None, float]],
                   ) -> list[PromptCount]:
        """:meth:`count` for many (problem, data_type, shape, fps), tokenized as one batch."""
        texts, visions = [], []
        for problem, data_type, shape, fps in items:
            text = self._render(problem, data_type)
            vision = 0
            if data_type != "text":
                if shape is None:
                    raise ValueError(f"a {data_type} sample needs the shape of its frames")
                frames, height, width = shape
                vision = self.geometry(data_type).tokens(frames, height, width)
                if data_type == "video" and self.timestamped:
                    text = self._with_stamps(text, frames, fps)
            texts.append(text)
            visions.append(vision)
        out = []
        for ids, vision in zip(self.processor.tokenizer(texts)["input_ids"], visions,
                               strict=True):
            placeholders = sum(1 for i in ids if i in self.placeholder_ids)
            out.append(PromptCount(vision, len(ids) - placeholders + vision))
        return out

    def _render(self, problem: str, data_type: str) -> str:
        """The chat template's text for one prompt, as ``encode`` renders it. Rendering is
        slow next to tokenizing, so the template is rendered once per data type around a
        placeholder and the problem put in its place; a template that changes the problem
        text (compared on the first problem of each type and on one with surrounding
        whitespace) is rendered for every prompt."""
        if data_type not in self._frames:
            frame = self._apply(_SENTINEL, data_type).split(_SENTINEL)
            parts = (frame[0], frame[1]) if len(frame) == 2 else None
            for probe in (problem, " \n  A question?\n\n "):
                if parts and parts[0] + probe + parts[1] != self._apply(probe, data_type):
                    parts = None
            self._frames[data_type] = parts
        parts = self._frames[data_type]
        return parts[0] + problem + parts[1] if parts else self._apply(problem, data_type)

    def _apply(self, problem: str, data_type: str) -> str:
        return self.processor.apply_chat_template(build_prompt_messages(problem, data_type),
                                                  tokenize=False, add_generation_prompt=True)

    def _with_stamps(self, text: str, frames: int, fps: float) -> str:
        # The processor replaces the template's <start><video_pad><end> by, per temporal
        # patch, "<t seconds>" + <start> + pads + <end>: one pad each here, counted above.
        wrapper = VISION_START + VIDEO_PAD + VISION_END
        if text.count(wrapper) != 1:
            raise RuntimeError(f"the chat template of {self.model_dir} rendered "
                               f"{text.count(wrapper)} video placeholders for one video")
        stamps = "".join(f"<{t:.1f} seconds>{wrapper}"
                         for t in frame_timestamps(frames, fps, self.video.temporal))
        return text.replace(wrapper, stamps)


# --------------------------------------------------------------------------- the check


@dataclass(frozen=True)
class PreflightInput:
    """Samples a job will prompt with, and the shards holding their frames."""

    source: str  # what the summary and errors name: a data file, or a benchmark and its file
    samples: Sequence[Sample]
    reader: ShardReader | None
    default_fps: float = 2.0  # the rate of a cached clip whose timestamps do not give one


@dataclass(frozen=True)
class Limits:
    max_prompt_length: int  # 0: none (data.max_prompt_length)
    max_new_tokens: int
    new_tokens_field: str  # the config field max_new_tokens comes from
    context: int | None  # the model's max_position_embeddings


@dataclass(frozen=True)
class SampleCount:
    source: str
    sample_id: str
    data_type: str
    shape: tuple[int, int, int] | None  # cached frames (T, H, W); None for text
    vision_tokens: int
    prompt_tokens: int


@dataclass
class PreflightReport:
    model: str
    limits: Limits
    counts: list[SampleCount] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # one line each, naming the sample
    no_frames: dict[str, int] = field(default_factory=dict)  # per source: failed / uncached

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """The token budget per source: min / median / max of vision and prompt tokens."""
        lim = self.limits
        bounds = [f"prompt + {lim.new_tokens_field} {lim.max_new_tokens} <= context "
                  f"{lim.context if lim.context else '(unknown)'}"]
        if lim.max_prompt_length:
            bounds.insert(0, f"prompt <= data.max_prompt_length {lim.max_prompt_length}")
        lines = [f"pre-flight ({self.model}): {'; '.join(bounds)}"]
        for source in dict.fromkeys([c.source for c in self.counts] + list(self.no_frames)):
            rows = [c for c in self.counts if c.source == source]
            line = f"  {source}: {len(rows)} prompts"
            if rows:
                line += (f"; vision tokens {_spread([c.vision_tokens for c in rows])}; "
                         f"prompt tokens {_spread([c.prompt_tokens for c in rows])} "
                         "(min / median / max)")
            if self.no_frames.get(source):
                line += f"; {self.no_frames[source]} without cached frames (not counted)"
            lines.append(line)
        if self.problems:
            lines.append(f"  REFUSED: {len(self.problems)} sample(s) cannot be run")
        return "\n".join(lines)

    def error(self) -> PreflightError:
        shown = "\n".join(f"  - {p}" for p in self.problems[:SHOWN])
        more = (f"\n  ... and {len(self.problems) - SHOWN} more"
                if len(self.problems) > SHOWN else "")
        return PreflightError(
            f"pre-flight refused {len(self.problems)} sample(s) for {self.model}:\n{shown}{more}"
            "\nLower the frame or pixel budget (data.video: max_frames, max_pixels, "
            "total_pixels), raise data.max_prompt_length, shorten max_new_tokens, or leave "
            "these samples out.\n" + self.summary())


def _spread(values: list[int]) -> str:
    return f"{min(values)} / {statistics.median(values):g} / {max(values)}"


def check_prompts(counter: TokenCounter, inputs: Sequence[PreflightInput],
                  limits: Limits) -> PreflightReport:
    """Count every sample's prompt and list each one that cannot run (never raises on data)."""
    report = PreflightReport(str(counter.model_dir), limits)
    for item in inputs:
        with tqdm(total=len(item.samples), desc=f"pre-flight {item.source}", disable=None,
                  leave=False) as bar:
            for start in range(0, len(item.samples), BATCH):
                chunk = item.samples[start:start + BATCH]
                _check_chunk(counter, item, chunk, limits, report)
                bar.update(len(chunk))
    return report


def _check_chunk(counter: TokenCounter, item: PreflightInput, samples: Sequence[Sample],
                 limits: Limits, report: PreflightReport) -> None:
    ready: list[tuple[Sample, tuple[int, int, int] | None, float]] = []
    for sample in samples:
        shape, fps = None, item.default_fps
        if sample.data_type != "text":
            if item.reader is None or sample.id not in item.reader:
                report.no_frames[item.source] = report.no_frames.get(item.source, 0) + 1
                continue
            entry = item.reader.entry(sample.id)
            shape = (int(entry.shape[0]), int(entry.shape[1]), int(entry.shape[2]))
            fps = sampled_fps(entry, item.default_fps)
            bad = counter.geometry(sample.data_type).problem(sample.data_type, *shape)
            if bad:
                report.problems.append(f"{item.source}: sample {sample.id!r} ({entry.path}): "
                                       f"{bad}")
                continue
        ready.append((sample, shape, fps))
    counts = counter.count_many([(s.problem, s.data_type, shape, fps)
                                 for s, shape, fps in ready])
    for (sample, shape, _), count in zip(ready, counts, strict=True):
        report.counts.append(SampleCount(item.source, sample.id, sample.data_type, shape,
                                         count.vision_tokens, count.prompt_tokens))
        report.problems += [f"{item.source}: sample {sample.id!r}: {p}"
                            for p in _overflows(count, shape, limits)]


def _overflows(count: PromptCount, shape: tuple[int, int, int] | None,
               limits: Limits) -> list[str]:
    what = f"{count.prompt_tokens} prompt tokens"
    if shape:
        visual = (f"{shape[0]} frames of {shape[1]}x{shape[2]}" if shape[0] > 1 else
                  f"{shape[1]}x{shape[2]} pixels")
        what += f" ({count.vision_tokens} for {visual})"
    out = []
    if limits.max_prompt_length and count.prompt_tokens > limits.max_prompt_length:
        out.append(f"{what} > data.max_prompt_length {limits.max_prompt_length}")
    if limits.context and count.prompt_tokens + limits.max_new_tokens > limits.context:
        out.append(f"{what} + {limits.new_tokens_field} {limits.max_new_tokens} = "
                   f"{count.prompt_tokens + limits.max_new_tokens} > the model's context "
                   f"{limits.context} (max_position_embeddings)")
    return out


def run_checks(counter: TokenCounter, inputs: Sequence[PreflightInput],
               limits: Limits) -> PreflightReport:
    """:func:`check_prompts`, raising :class:`PreflightError` when any sample is refused."""
    report = check_prompts(counter, inputs, limits)
    if not report.ok:
        raise report.error()
    return report


# --------------------------------------------------------------------------- training


def training_inputs(cfg: Config) -> list[PreflightInput]:
    """The training and held-out samples the trainer will prompt with, and their frames."""
    reader = ShardReader(cfg.shard_dir)
    inputs = []
    for jsonl in (cfg.data.train_jsonl, cfg.data.eval_jsonl):
        if not jsonl:
            continue
        prompts = PromptSet.load(jsonl, reader, cfg.data.media_root, cfg.data.include_tasks,
                                 cfg.data.video.fps, cfg.reward.fallback_type)
        inputs.append(PreflightInput(jsonl, prompts.samples, reader, cfg.data.video.fps))
    return inputs


def training_limits(cfg: Config, counter: TokenCounter) -> Limits:
    return Limits(cfg.data.max_prompt_length, cfg.rollout.max_new_tokens,
                  "rollout.max_new_tokens", counter.context)


def preflight_training(cfg: Config, model_dir: str | Path) -> PreflightReport:
    """Check the training data against the model in ``model_dir``; PreflightError if any
    sample cannot run."""
    counter = TokenCounter(model_dir)
    return run_checks(counter, training_inputs(cfg), training_limits(cfg, counter))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Pre-flight check of the training data: every prompt fits "
                    "data.max_prompt_length and the model's context.")
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="key.sub=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if not (cfg.model_path / "config.json").is_file():
            raise ConfigError(f"no model in {cfg.model_path} yet (model.tiny builds it at the "
                              "start of training); set model.path to a model folder")
        print(preflight_training(cfg, cfg.model_path).summary())
    except (ValueError, ShardError) as exc:  # config, data and refusals: say what, exit 1
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
