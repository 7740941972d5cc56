"""MotionBench (THUDM): one record per video with its questions under ``qa``.
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
    Record,
    split_inline_options,
    under,
    with_suffixes,
)

# --------------------------------------------------------------------------- MotionBench


def load_motionbench(ctx: LoadContext) -> Iterator[Sample]:
    for rec in records(ctx):
        if is_converted(rec.raw):
            yield converted_sample(ctx, rec)
            continue
        video = rec.text("video_path", "video", "key")
        path = ctx.media.find(*under(("", "videos", "MotionBench"), with_suffixes(video)))
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
    layout="annotation: the dev-split JSONL; video_root: the folder of its video_path entries",
    load=load_motionbench,
    notes="Items without a public answer (the test split) are skipped and counted; categories "
          "(MR, LM, CM, MO, AO, RC) from question_type.")


ENTRIES = (MOTIONBENCH,)
