"""MotionBench (THUDM): one record per video with its questions under ``qa``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from evr1.data.schema import Sample
from evr1.eval.benchmarks.base import Benchmark, LoadContext, MetricSpec
from evr1.eval.benchmarks.common import converted_sample, is_converted, records
from evr1.eval.formats import Record, split_inline_options, under, with_suffixes

# --------------------------------------------------------------------------- MotionBench


# The hub's release: video_info.meta.jsonl (dev answers; test answers are "NA") beside the
# extracted video folders.
MOTIONBENCH_LAYOUTS = (("video_info.meta.jsonl",),
                       ("MotionBench/video_info.meta.jsonl", "*/video_info.meta.jsonl"),
                       ("*.jsonl",))


def load_motionbench(ctx: LoadContext) -> Iterator[Sample]:
    for rec in records(ctx, MOTIONBENCH_LAYOUTS):
        if is_converted(rec.raw):
            yield converted_sample(ctx, rec)
            continue
        video = rec.text("video_path", "video", "key")
        names = with_suffixes(video)
        path = ctx.media.find(*under(("", "videos", "MotionBench"), names),
                              search=[Path(n).name for n in names])
        for n, qa in enumerate(rec.get("qa")):
            sub = Record({**qa, "_file": rec.raw["_file"], "_row": rec.raw["_row"]}, ctx.name)
            answer = sub.text("answer", default="NA")
            if answer.strip().upper() in ("NA", "N/A", ""):
                ctx.skipped["no public answer (test split)"] += 1
                continue
            stem, options = split_inline_options(sub.text("question"))
            task = sub.text("question_type", "category",
                            default=rec.text("question_type", "video_type", default=""))
            sid = sub.text("uid", default=f"{rec.text('key', default=video)}-{n}")
            yield ctx.choice(sub, sid, stem, options, answer, path, {"task": task})


MOTIONBENCH = Benchmark(
    name="motionbench", title="MotionBench", formats="JSONL (video_info.meta.jsonl layout)",
    problem_types=("multiple_choice",), metric=MetricSpec("accuracy", breakdowns=("task",)),
    precision="documented", source="huggingface.co/datasets/THUDM/MotionBench",
    files="annotation: the downloaded dataset folder (video_info.meta.jsonl) or the JSONL; "
           "video_root: the folder its video_path entries start from (a video elsewhere under "
           "it is found by its file name)",
    load=load_motionbench,
    notes="Items without a public answer (the test split) are skipped and counted; categories "
          "(MR, LM, CM, MO, AO, RC) from question_type.")


ENTRIES = (MOTIONBENCH,)
