"""Video reasoning benchmarks with their own layouts: Video-Holmes, MINERVA, MMVU, Video-MMMU.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from evr1.data.schema import Sample
from evr1.eval.benchmarks.base import Benchmark, LoadContext, MetricSpec
from evr1.eval.benchmarks.common import (
    converted_sample,
    file_stem,
    is_converted,
    records,
)
from evr1.eval.formats import (
    as_options,
    lettered,
    under,
    with_suffixes,
)
from evr1.rewards.numeric import last_number

# --------------------------------------------------------------------------- Video-Holmes


def load_video_holmes(ctx: LoadContext) -> Iterator[Sample]:
    for rec in records(ctx):
        if is_converted(rec.raw):
            yield converted_sample(ctx, rec)
            continue
        video = rec.text("video ID", "video_id")
        path = ctx.media.find(*under(("videos_cropped", "videos", ""), with_suffixes(video)))
        options = as_options(rec.get("Options", "options"))
        qid = rec.text("Question ID", "question_id", default=str(rec.raw["_row"]))
        meta = {"question_type": rec.text("Question Type", "question_type", default="")}
        yield ctx.choice(rec, f"{video}-{qid}", rec.text("Question", "question"), options,
                         rec.get("Answer", "answer"), path, meta)


VIDEO_HOLMES = Benchmark(
    name="video_holmes", title="Video-Holmes", formats="JSON (test_Video-Holmes.json)",
    problem_types=("multiple_choice",),
    metric=MetricSpec("accuracy", breakdowns=("question_type",)), precision="precise",
    source="huggingface.co/datasets/TencentARC/Video-Holmes",
    layout="annotation: Benchmark/test_Video-Holmes.json; video_root: Benchmark/ (holding "
           "videos_cropped/)",
    load=load_video_holmes, notes="Question types SR, IMC, TCI, TA, MHR, PAR, CTI.")


# --------------------------------------------------------------------------- MINERVA


def load_minerva(ctx: LoadContext) -> Iterator[Sample]:
    for rec in records(ctx):
        if is_converted(rec.raw):
            yield converted_sample(ctx, rec)
            continue
        texts = [rec.text(f"answer_choice_{i}") for i in range(5)
                 if rec.raw.get(f"answer_choice_{i}") not in (None, "")]
        options = lettered(texts)
        video = rec.text("video_id")
        path = ctx.media.find(*under(("", "videos", video), with_suffixes(video)))
        answer = rec.get("answer_id", "answer")
        meta = {"category": rec.text("category", "question_type", "reasoning_type", default="")}
        yield ctx.choice(rec, rec.text("key", default=str(rec.raw["_row"])),
                         rec.text("question"), options,
                         int(answer) if str(answer).isdigit() else answer, path, meta)


MINERVA = Benchmark(
    name="minerva", title="MINERVA", formats="JSON (minerva.json)",
    problem_types=("multiple_choice",), metric=MetricSpec("accuracy", breakdowns=("category",)),
    precision="documented", source="github.com/google-deepmind/neptune (MINERVA release)",
    layout="annotation: minerva.json; video_root: the folder of <video_id>.mp4",
    load=load_minerva,
    notes="Fields key, video_id, question, answer_choice_0..4, answer_id; no ASR transcript.")


# --------------------------------------------------------------------------- MMVU


def _mmvu_video(value: str) -> list[str]:
    """The release gives hub URLs (.../resolve/main/videos/Art/0.mp4): keep the relative part."""
    if "/resolve/main/" in value:
        rel = value.split("/resolve/main/", 1)[1]
        return [rel, rel.split("/", 1)[1] if "/" in rel else rel, Path(rel).name]
    return [value]


def load_mmvu(ctx: LoadContext) -> Iterator[Sample]:
    for rec in records(ctx):
        if is_converted(rec.raw):
            yield converted_sample(ctx, rec)
            continue
        path = ctx.media.find(*_mmvu_video(rec.text("video")))
        metadata = rec.get("metadata", default={}) or {}
        meta = {"subject": metadata.get("subject", "") if isinstance(metadata, dict) else "",
                "question_type": rec.text("question_type", default="")}
        options = as_options(rec.get("choices", "options", default=None))
        sid = rec.text("id", default=str(rec.raw["_row"]))
        if options:
            yield ctx.choice(rec, sid, rec.text("question"), options, rec.get("answer"), path,
                             meta)
        else:
            yield ctx.sample(sid, rec.text("question"), "open_ended", rec.text("answer"), path,
                             meta=meta)


MMVU = Benchmark(
    name="mmvu", title="MMVU (validation)", formats="JSON (validation.json)",
    problem_types=("multiple_choice", "open_ended"),
    metric=MetricSpec("accuracy", breakdowns=("subject", "question_type")),
    precision="documented", source="huggingface.co/datasets/yale-nlp/MMVU",
    layout="annotation: validation.json; video_root: the dataset folder (holding videos/)",
    load=load_mmvu, notes="Open-ended questions need the judge (the benchmark uses GPT-4o).")


# --------------------------------------------------------------------------- Video-MMMU


def load_videommmu(ctx: LoadContext) -> Iterator[Sample]:
    for rec in records(ctx):
        if is_converted(rec.raw):
            yield converted_sample(ctx, rec)
            continue
        track = rec.text("track", "config", default=file_stem(rec).split("-")[0])
        vid = rec.text("id")
        path = ctx.media.find(*under(("", track, track.lower(), track.capitalize(), "videos"),
                                     with_suffixes(vid)))
        meta = {"track": track}
        options = as_options(rec.get("options", default=None))
        answer = rec.get("answer")
        if options and str(rec.raw.get("question_type", "multiple-choice")).startswith("multi"):
            yield ctx.choice(rec, vid, rec.text("question"), options, answer, path, meta)
        elif last_number(str(answer)) is not None and len(str(answer)) < 24:
            yield ctx.sample(vid, rec.text("question"), "numerical", str(answer), path, meta=meta)
        else:
            yield ctx.sample(vid, rec.text("question"), "open_ended", str(answer), path,
                             meta=meta)


VIDEOMMMU = Benchmark(
    name="videommmu", title="Video-MMMU", formats="parquet per track (Perception, "
    "Comprehension, Adaptation), JSON",
    problem_types=("multiple_choice", "numerical", "open_ended"),
    metric=MetricSpec("accuracy", breakdowns=("track",)), precision="documented",
    source="huggingface.co/datasets/lmms-lab/VideoMMMU",
    layout="annotation: the folder of track files (the file name gives the track); "
           "video_root: the folder of <id>.mp4 (or <track>/<id>.mp4)",
    load=load_videommmu,
    notes="The Adaptation track's extra image is not attached (a sample holds one medium); "
          "Δknowledge is not computed.")


ENTRIES = (VIDEO_HOLMES, MINERVA, MMVU, VIDEOMMMU)
