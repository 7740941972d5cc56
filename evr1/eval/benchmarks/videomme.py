"""Video-MME (lmms-lab/Video-MME).
"""

from __future__ import annotations

from collections.abc import Iterator

from evr1.data.schema import Sample
from evr1.eval.benchmarks.base import Benchmark, LoadContext, MetricSpec
from evr1.eval.benchmarks.common import (
    converted_sample,
    is_converted,
    records,
)
from evr1.eval.formats import (
    as_options,
    under,
    with_suffixes,
)
from evr1.eval.prompts import Template

# --------------------------------------------------------------------------- Video-MME


VIDEOMME_TEMPLATE = Template(
    pre=("Select the best answer to the following multiple-choice question based on the video. "
         "Respond with only the letter (A, B, C, or D) of the correct option.\n"),
    post_choice="The best answer is:")


def load_videomme(ctx: LoadContext) -> Iterator[Sample]:
    for rec in records(ctx):
        if is_converted(rec.raw):
            yield converted_sample(ctx, rec)
            continue
        vid = rec.text("videoID")
        path = ctx.media.find(*under(("data", "", "videos"), with_suffixes(vid)))
        meta = {"duration": rec.text("duration", default=""),
                "domain": rec.text("domain", default=""),
                "sub_category": rec.text("sub_category", default=""),
                "task_type": rec.text("task_type", default=""), "video": vid}
        yield ctx.choice(rec, rec.text("question_id"), rec.text("question"),
                         as_options(rec.get("options")), rec.get("answer"), path, meta)


VIDEOMME = Benchmark(
    name="videomme", title="Video-MME", formats="parquet (videomme/test-*.parquet), JSON/JSONL",
    problem_types=("multiple_choice",),
    metric=MetricSpec("accuracy", breakdowns=("duration", "domain", "task_type")),
    precision="precise", source="huggingface.co/datasets/lmms-lab/Video-MME",
    layout="annotation: videomme/test-00000-of-00001.parquet; video_root: the folder holding "
           "data/<videoID>.mp4 (or the data/ folder itself)",
    load=load_videomme, template=VIDEOMME_TEMPLATE,
    notes="Without subtitles (the 'w/o subs' setting).")


ENTRIES = (VIDEOMME,)
