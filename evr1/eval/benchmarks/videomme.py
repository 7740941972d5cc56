"""Video-MME (lmms-lab/Video-MME)."""

from __future__ import annotations

import re
from collections.abc import Iterator

from evr1.data.schema import Sample
from evr1.eval.benchmarks.base import Benchmark, LoadContext, MetricSpec
from evr1.eval.benchmarks.common import converted_sample, is_converted, records
from evr1.eval.formats import Record, as_options, under, with_suffixes
from evr1.eval.prompts import Template

# --------------------------------------------------------------------------- Video-MME


VIDEOMME_TEMPLATE = Template(
    pre=("Select the best answer to the following multiple-choice question based on the video. "
         "Respond with only the letter (A, B, C, or D) of the correct option.\n"),
    post_choice="The best answer is:")


# The hub's parquet (one row per question); the official repository's JSON nests the three
# questions of a video under "questions".
VIDEOMME_LAYOUTS = (("videomme/test-*.parquet",), ("test-*.parquet",),
                    ("*.parquet", "*.json", "*.jsonl"))
_YOUTUBE_ID = re.compile(r"[?&]v=([\w-]{6,})")


def _videomme_rows(rec: Record) -> Iterator[Record]:
    questions = rec.raw.get("questions")
    if not isinstance(questions, list):
        yield rec
        return
    video = {k: v for k, v in rec.raw.items() if k != "questions"}
    for n, question in enumerate(questions):
        if not isinstance(question, dict):
            raise rec.fail(f"questions[{n}] is a {type(question).__name__}, not an object")
        yield Record({**video, **question, "_row": f"{rec.raw['_row']}.{n}"}, rec.benchmark)


def _videomme_video(rec: Record) -> str:
    """Videos are named by their YouTube id: ``videoID``, else the id in ``url``."""
    found = _YOUTUBE_ID.search(rec.text("url", default=""))
    return rec.text("videoID", default=found.group(1) if found else ...)


def load_videomme(ctx: LoadContext) -> Iterator[Sample]:
    for parent in records(ctx, VIDEOMME_LAYOUTS):
        if is_converted(parent.raw):
            yield converted_sample(ctx, parent)
            continue
        for rec in _videomme_rows(parent):
            yield _videomme_question(ctx, rec)


def _videomme_question(ctx: LoadContext, rec: Record) -> Sample:
    vid = _videomme_video(rec)
    path = ctx.media.find(*under(("data", "", "videos"), with_suffixes(vid)),
                          search=with_suffixes(vid))
    meta = {"duration": rec.text("duration", default=""),
            "domain": rec.text("domain", default=""),
            "sub_category": rec.text("sub_category", default=""),
            "task_type": rec.text("task_type", default=""), "video": vid}
    return ctx.choice(rec, rec.text("question_id"), rec.text("question"),
                      as_options(rec.get("options")), rec.get("answer"), path, meta)


VIDEOMME = Benchmark(
    name="videomme", title="Video-MME",
    formats="parquet (videomme/test-*.parquet); the official JSON (questions nested per video)",
    problem_types=("multiple_choice",),
    metric=MetricSpec("accuracy", breakdowns=("duration", "domain", "task_type")),
    precision="precise", source="huggingface.co/datasets/lmms-lab/Video-MME",
    files="annotation: the downloaded dataset folder (or videomme/test-00000-of-00001.parquet); "
           "video_root: the folder holding data/<videoID>.mp4 (default: the annotation folder)",
    load=load_videomme, template=VIDEOMME_TEMPLATE,
    notes="Without subtitles (the 'w/o subs' setting).")


ENTRIES = (VIDEOMME,)
