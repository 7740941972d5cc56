"""Temporal and spatio-temporal grounding: Charades-STA and HC-STVG-style files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from evr1.data.schema import Sample
from evr1.eval.benchmarks.base import Benchmark, LoadContext, MetricSpec
from evr1.eval.benchmarks.common import converted_sample, is_converted, records
from evr1.eval.formats import (
    FormatError,
    Record,
    find_annotation_files,
    read_records,
    under,
    with_suffixes,
)
from evr1.eval.prompts import Template, build_prompt

# --------------------------------------------------------------------------- Charades-STA

CHARADES_TEMPLATE = Template(post_other=(
    "Please find the visual event described by the sentence in the video, determining its "
    "starting and ending times. Answer in the format: 'The event happens in the start time - "
    "end time seconds'."))


def _charades_txt(path: Path) -> Iterator[dict[str, Any]]:
    """``<video> <start> <end>##<sentence>`` per line (the official test file)."""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        head, sep, sentence = line.partition("##")
        parts = head.split()
        if not sep or len(parts) != 3:
            raise FormatError(f"{path}:{n + 1}: expected '<video> <start> <end>##<sentence>', "
                              f"got {line[:80]!r}")
        try:
            span = [float(parts[1]), float(parts[2])]
        except ValueError:
            raise FormatError(f"{path}:{n + 1}: start and end must be numbers, got "
                              f"{parts[1]!r} {parts[2]!r}") from None
        yield {"video": parts[0], "timestamp": span,
               "sentence": sentence.strip(), "_file": str(path), "_row": n}


def _charades_json(rec: Record) -> Iterator[dict[str, Any]]:
    """{video: {duration, timestamps: [[s, e]...], sentences: [...]}} or one row per query."""
    raw = rec.raw
    if "sentences" in raw and "timestamps" in raw:
        for i, (span, sentence) in enumerate(zip(raw["timestamps"], raw["sentences"],
                                                 strict=True)):
            yield {"video": raw.get("_key") or raw.get("video"), "timestamp": span,
                   "sentence": sentence, "duration": raw.get("duration"), "_file": raw["_file"],
                   "_row": f"{raw['_row']}.{i}"}
    else:
        yield raw


# The official release (TALL): charades_sta_test.txt beside charades_sta_train.txt; the hub's
# copy (lmms-lab/charades_sta): test-*.parquet.
CHARADES_LAYOUTS = (("charades_sta_test.txt",), ("*test*.txt",),
                    ("test-*.parquet", "data/test-*.parquet", "*/test-*.parquet"),
                    ("*.json", "*.jsonl"))


def _charades_rows(ctx: LoadContext) -> Iterator[dict[str, Any]]:
    for file in find_annotation_files(ctx.annotation, CHARADES_LAYOUTS):
        if file.suffix.lower() == ".txt":
            yield from _charades_txt(file)
        else:
            for raw in read_records(file):
                yield from _charades_json(Record(raw, ctx.name))


def load_charades_sta(ctx: LoadContext) -> Iterator[Sample]:
    for row in _charades_rows(ctx):
        rec = Record(row, ctx.name)
        if is_converted(row):
            yield converted_sample(ctx, rec)
            continue
        video = rec.text("video", "vid", "video_id")
        span = rec.get("timestamp", "timestamps", "span")
        if isinstance(span, str) and span.lstrip().startswith("["):
            try:
                span = json.loads(span)
            except json.JSONDecodeError:
                pass  # reported as not [start, end] below
        if isinstance(span, list) and span and isinstance(span[0], list):
            span = span[0]
        if not isinstance(span, list) or len(span) != 2:
            raise rec.fail(f"timestamp must be [start, end], got {span!r}")
        sentence = rec.text("sentence", "query", "caption", "description")
        path = ctx.media.find(*under(("", "videos", "Charades_v1_480"), with_suffixes(video)))
        question = (f'Find the start and end time of the event "{sentence.strip().rstrip(".")}"'
                    " in the video.")
        prompt = (build_prompt(f"Sentence: {sentence}", None, "temporal_grounding", "official",
                               CHARADES_TEMPLATE) if ctx.style == "official" else None)
        yield ctx.sample(f"{video}-{rec.raw['_row']}", question, "temporal_grounding",
                         [float(span[0]), float(span[1])], path,
                         meta={"video": video, "duration": rec.get("duration", default=None)},
                         prompt=prompt)


CHARADES_STA = Benchmark(
    name="charades_sta", title="Charades-STA (test)",
    formats="text (charades_sta_test.txt: '<vid> <start> <end>##<sentence>'), JSON",
    problem_types=("temporal_grounding",),
    metric=MetricSpec("grounding", thresholds=(0.3, 0.5, 0.7)), precision="precise",
    source="github.com/jiyanggao/TALL (charades_sta_test.txt); videos from Charades",
    files="annotation: the folder holding charades_sta_test.txt (the train file is not read), "
           "the file, or lmms-lab's test-*.parquet; video_root: Charades_v1_480/ or the folder "
           "holding it (default: the annotation folder)",
    load=load_charades_sta, template=CHARADES_TEMPLATE,
    notes="Main score mIoU; R@1 at IoU 0.3 / 0.5 / 0.7 as sub-scores.")


# --------------------------------------------------------------------------- STVG


def _hcstvg_tube(rec: Record) -> tuple[dict[str, Any], dict[str, Any]]:
    """HC-STVG-style record: per-frame [x, y, w, h] boxes from st_frame, times in seconds."""
    boxes = rec.get("bbox", "boxes")
    st_frame = int(rec.get("st_frame"))
    st_time, ed_time = float(rec.get("st_time")), float(rec.get("ed_time"))
    fps = rec.get("fps", default=None)
    if fps is None and st_time > 0:
        fps = st_frame / st_time
    if fps is None:
        frames, seconds = rec.get("frame_count", "img_num", default=None), rec.get(
            "duration", default=None)
        if frames is None or seconds is None:
            raise rec.fail("cannot tell the frame rate: give fps, or frame_count and duration")
        fps = float(frames) / float(seconds)
    by_second: dict[str, list[float]] = {}
    for i, box in enumerate(boxes):
        second = int(round((st_frame + i) / float(fps)))
        if str(second) not in by_second and len(box) == 4:
            x, y, w, h = (float(v) for v in box)
            by_second[str(second)] = [x, y, x + w, y + h]
    kwargs: dict[str, Any] = {"box_format": "pixel"}
    hw = rec.get("img_hw", default=None)
    if isinstance(hw, list) and len(hw) == 2:
        kwargs["image_size"] = [int(hw[1]), int(hw[0])]
    return {"span": [st_time, ed_time], "boxes": by_second}, kwargs


# HC-STVG: anno_v2/val_v2.json (v2) or test.json (v1) beside the training annotations.
STVG_LAYOUTS = (("*val*.json", "*test*.json"), ("anno*/*val*.json", "anno*/*test*.json"),
                ("*.json", "*.jsonl"))


def load_stvg(ctx: LoadContext) -> Iterator[Sample]:
    for rec in records(ctx, STVG_LAYOUTS):
        if is_converted(rec.raw):
            yield converted_sample(ctx, rec)
            continue
        video = rec.text("_key", "video", "vid", "video_name")
        names = with_suffixes(video)
        path = ctx.media.find(*under(("", "videos", "video", "v2_video"), names),
                              search=[Path(n).name for n in names])
        sentence = rec.text("English", "caption", "sentence", "query")
        solution, kwargs = _hcstvg_tube(rec)
        question = (f'Find when and where this happens in the video: "{sentence.strip()}". '
                    "Give the time span and the box of the described person in each second.")
        yield ctx.sample(f"{Path(video).stem}-{rec.raw['_row']}", question,
                         "spatial_temporal_grounding", solution, path,
                         meta={"video": video}, reward_kwargs=kwargs)


STVG = Benchmark(
    name="stvg", title="Spatio-temporal video grounding (HC-STVG style)",
    formats="JSON (HC-STVG: {video: {English, st_time, ed_time, st_frame, bbox, img_hw}}), or "
            "converted records with a {time, boxes} solution",
    problem_types=("spatial_temporal_grounding",), metric=MetricSpec("stvg"),
    precision="documented", source="HC-STVG v1/v2 (github.com/tzhhhh123/HC-STVG); "
                                   "EasyVideoR1's ST-Align subset (converted layout)",
    files="annotation: the test annotation JSON or its folder (val/test files are read, not "
           "train); video_root: its video folder",
    load=load_stvg,
    notes="Boxes are compared per whole second (the official metrics are per frame): m_tIoU, "
          "m_vIoU and vIoU@0.3/0.5 with vIoU = sum of box IoU over shared seconds / seconds in "
          "either tube.")


ENTRIES = (CHARADES_STA, STVG)
