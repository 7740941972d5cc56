"""Video reasoning benchmarks with their own layouts: Video-Holmes, MINERVA, MMVU, Video-MMMU."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from evr1.data.schema import Sample
from evr1.eval.benchmarks.base import Benchmark, LoadContext, MetricSpec
from evr1.eval.benchmarks.common import converted_sample, file_config, is_converted, records
from evr1.eval.formats import Record, as_options, lettered, under, with_suffixes
from evr1.rewards.numeric import last_number

# --------------------------------------------------------------------------- Video-Holmes


# The hub's release: Benchmark/test_Video-Holmes.json beside Benchmark/videos_cropped/.
VIDEO_HOLMES_LAYOUTS = (("test_Video-Holmes.json",), ("Benchmark/test_Video-Holmes.json",),
                        ("*.json",))


def load_video_holmes(ctx: LoadContext) -> Iterator[Sample]:
    for rec in records(ctx, VIDEO_HOLMES_LAYOUTS):
        if is_converted(rec.raw):
            yield converted_sample(ctx, rec)
            continue
        video = rec.text("video ID", "video_id")
        folders = ("videos_cropped", "videos", "Benchmark/videos_cropped", "Benchmark/videos", "")
        path = ctx.media.find(*under(folders, with_suffixes(video)))
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
    files="annotation: the downloaded dataset folder, Benchmark/ or "
           "Benchmark/test_Video-Holmes.json; video_root: the folder holding videos_cropped/ "
           "(default: the annotation folder)",
    load=load_video_holmes, notes="Question types SR, IMC, TCI, TA, MHR, PAR, CTI.")


# --------------------------------------------------------------------------- MINERVA


MINERVA_LAYOUTS = (("minerva.json",), ("*.json",))


def load_minerva(ctx: LoadContext) -> Iterator[Sample]:
    for rec in records(ctx, MINERVA_LAYOUTS):
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
    files="annotation: minerva.json (or its folder); video_root: the folder of "
           "<video_id>.mp4 (or <video_id>/<video_id>.mp4)",
    load=load_minerva,
    notes="Fields key, video_id, question, answer_choice_0..4, answer_id; no ASR transcript.")


# --------------------------------------------------------------------------- MMVU


def _mmvu_video(value: str) -> list[str]:
    """The release gives hub URLs (.../resolve/main/videos/Art/0.mp4): keep the relative part."""
    if "/resolve/main/" in value:
        rel = value.split("/resolve/main/", 1)[1]
        return [rel, rel.split("/", 1)[1] if "/" in rel else rel, Path(rel).name]
    return [value]


# The hub's release: validation.json (test.json has no answers) beside videos/<subject>/;
# its parquet copy is validation-*.parquet.
MMVU_LAYOUTS = (("validation.json",), ("validation-*.parquet", "data/validation-*.parquet"),
                ("*.json",))


def _mmvu_options(rec: Record) -> list[str] | None:
    """Open-ended records carry ``choices`` too, with five empty strings: no options."""
    if str(rec.raw.get("question_type", "")).lower().startswith("open"):
        return None
    raw = rec.get("choices", "options", default=None)
    options = as_options(raw)
    if options and not any(re.sub(r"^[A-Z]\.\s*", "", o).strip() for o in options):
        return None
    return options


def load_mmvu(ctx: LoadContext) -> Iterator[Sample]:
    for rec in records(ctx, MMVU_LAYOUTS):
        if is_converted(rec.raw):
            yield converted_sample(ctx, rec)
            continue
        video = _mmvu_video(rec.text("video"))
        path = ctx.media.find(*video, search=[Path(video[0]).name] if len(video) == 1 else ())
        metadata = rec.get("metadata", default={}) or {}
        meta = {"subject": metadata.get("subject", "") if isinstance(metadata, dict) else "",
                "question_type": rec.text("question_type", default="")}
        options = _mmvu_options(rec)
        sid = rec.text("id", default=str(rec.raw["_row"]))
        if options:
            yield ctx.choice(rec, sid, rec.text("question"), options, rec.get("answer"), path,
                             meta)
        else:
            yield ctx.sample(sid, rec.text("question"), "open_ended", rec.text("answer"), path,
                             meta=meta)


MMVU = Benchmark(
    name="mmvu", title="MMVU (validation)",
    formats="JSON (validation.json) or parquet (validation-*.parquet)",
    problem_types=("multiple_choice", "open_ended"),
    metric=MetricSpec("accuracy", breakdowns=("subject", "question_type")),
    precision="documented", source="huggingface.co/datasets/yale-nlp/MMVU",
    files="annotation: the downloaded dataset folder (validation.json is read, not test.json) "
           "or validation.json; video_root: the dataset folder (holding videos/<subject>/; "
           "default: the annotation folder)",
    load=load_mmvu, notes="Open-ended questions need the judge (the benchmark uses GPT-4o).")


# --------------------------------------------------------------------------- Video-MMMU


VIDEOMMMU_TRACKS = ("Perception", "Comprehension", "Adaptation")
# The hub's release: one config folder per track (Perception/test-00000-of-00001.parquet; on
# its parquet branch Perception/test/0000.parquet); other configs there repeat a track's items.
VIDEOMMMU_LAYOUTS = (tuple(f"{t}/test-*.parquet" for t in VIDEOMMMU_TRACKS),
                     tuple(f"{t}/test/*.parquet" for t in VIDEOMMMU_TRACKS),
                     ("*.parquet", "*.json", "*.jsonl"))


def _videommmu_track(rec: Record) -> str:
    """The track from the config folder, else the file name ("Perception-x.json")."""
    name = file_config(rec)
    for track in VIDEOMMMU_TRACKS:
        if name.lower().startswith(track.lower()):
            return track
    raise rec.fail(f"cannot tell the track from the file's name or folder {name!r}: "
                   f"expected one of {', '.join(VIDEOMMMU_TRACKS)}, or a track column")


def load_videommmu(ctx: LoadContext) -> Iterator[Sample]:
    for rec in records(ctx, VIDEOMMMU_LAYOUTS):
        if is_converted(rec.raw):
            yield converted_sample(ctx, rec)
            continue
        track = rec.text("track", default="") or _videommmu_track(rec)
        vid = rec.text("id")
        # Videos may sit flat, in track folders or in subject folders (Business/, Science/...)
        # that the record does not name: found by file name under the video root.
        path = ctx.media.find(*under(("", track, track.lower(), "videos"), with_suffixes(vid)),
                              search=with_suffixes(vid))
        meta = {"track": track}
        options = as_options(rec.get("options", default=None))
        answer = rec.get("answer")
        sid = f"{track}-{vid}"  # the three tracks ask about the same videos (same ids)
        if options and str(rec.raw.get("question_type", "multiple-choice")).startswith("multi"):
            yield ctx.choice(rec, sid, rec.text("question"), options, answer, path, meta)
        elif last_number(str(answer)) is not None and len(str(answer)) < 24:
            yield ctx.sample(sid, rec.text("question"), "numerical", str(answer), path, meta=meta)
        else:
            yield ctx.sample(sid, rec.text("question"), "open_ended", str(answer), path,
                             meta=meta)


VIDEOMMMU = Benchmark(
    name="videommmu", title="Video-MMMU", formats="parquet per track (Perception, "
    "Comprehension, Adaptation), JSON",
    problem_types=("multiple_choice", "numerical", "open_ended"),
    metric=MetricSpec("accuracy", breakdowns=("track",)), precision="documented",
    source="huggingface.co/datasets/lmms-lab/VideoMMMU",
    files="annotation: the downloaded dataset folder (Perception/, Comprehension/, "
           "Adaptation/ config folders), one track folder or file (its folder or name gives the "
           "track); video_root: the folder holding the videos, flat or in track or subject "
           "folders (default: the annotation folder)",
    load=load_videommmu,
    notes="The Adaptation track's extra image is not attached (a sample holds one medium); "
          "Δknowledge is not computed.")


ENTRIES = (VIDEO_HOLMES, MINERVA, MMVU, VIDEOMMMU)
