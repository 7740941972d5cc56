"""Benchmarks read by one generic loader (question, options or not, answer, video):
VCR-Bench, VideoReasonBench, LongVideo-Reason, VideoMathQA, ODV-Bench.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from evr1.data.schema import Sample
from evr1.eval.benchmarks.base import Benchmark, LoadContext, Loader, MetricSpec
from evr1.eval.benchmarks.common import DEFAULT_LAYOUTS, converted_sample, is_converted, records
from evr1.eval.formats import (
    Layouts,
    Record,
    as_options,
    letter_of,
    split_inline_options,
    strip_tags,
    under,
    with_suffixes,
)

# --------------------------------------------------------------------------- generic layouts


def generic_choice_or_open(ctx: LoadContext, rec: Record, sid: Any, meta: dict[str, Any],
                           video_names: Sequence[str], folders: Sequence[str] = ("", "videos",
                                                                                 "video")
                           ) -> Sample:
    """A record with a question, an answer and, for multiple choice, options (list or map)."""
    video = rec.text(*video_names)
    names = with_suffixes(video)
    # Releases keep videos in folders their records do not always name: by file name as well.
    path = ctx.media.find(*under(folders, names), search=[Path(n).name for n in names])
    question = rec.text("question", "problem", "Question")
    raw_options = rec.get("options", "choices", "candidates", "Options", default=None)
    options = as_options(raw_options)
    answer = strip_tags(rec.get("answer", "solution", "Answer", "gt"))
    if options:
        if isinstance(answer, int) and not isinstance(answer, bool):
            answer = int(answer)
        return ctx.choice(rec, sid, question, options, answer, path, meta)
    inline_question, inline = split_inline_options(question)
    if len(inline) >= 2 and letter_of(answer, inline):
        return ctx.choice(rec, sid, inline_question, inline, answer, path, meta)
    return ctx.sample(sid, question, "open_ended", str(answer), path, meta=meta)


def _generic_loader(category_names: Sequence[str], video_names: Sequence[str],
                    id_names: Sequence[str] = ("id", "question_id", "qid", "uid"),
                    meta_key: str = "task", layouts: Layouts = DEFAULT_LAYOUTS) -> Loader:
    def load(ctx: LoadContext) -> Iterator[Sample]:
        for rec in records(ctx, layouts):
            if is_converted(rec.raw):
                yield converted_sample(ctx, rec, category_names)
                continue
            sid = rec.text(*id_names, default=str(rec.raw["_row"]))
            meta = {meta_key: rec.text(*category_names, default="")}
            yield generic_choice_or_open(ctx, rec, sid, meta, video_names)
    return load


# The hub's release: config folders mcq/ and mbin/ (multi-binary, not read) of test-*.parquet,
# the default config in data/.
VIDEOMATHQA_LAYOUTS = (("mcq/test-*.parquet",), ("data/test-*.parquet",),
                       ("*.json", "*.jsonl", "*.parquet"))

VCRBENCH = Benchmark(
    name="vcrbench", title="VCR-Bench", formats="JSON / JSONL",
    problem_types=("multiple_choice", "open_ended"),
    metric=MetricSpec("accuracy", breakdowns=("task",)), precision="documented",
    source="huggingface.co/datasets/VLM-Reasoning/VCR-Bench",
    files="annotation: the question file; video_root: the folder its video paths start from",
    load=_generic_loader(("dimension", "category", "task"), ("video_path", "video", "path")),
    notes="Reports answer accuracy per dimension; the chain-of-thought score (recall/precision "
          "of reasoning steps by a judge) is not computed. Open-ended items need the judge.")

VIDEOREASONBENCH = Benchmark(
    name="videoreasonbench", title="VideoReasonBench", formats="JSON / JSONL",
    problem_types=("open_ended",), metric=MetricSpec("accuracy", breakdowns=("task",)),
    precision="documented", source="huggingface.co/datasets/lyx97/reasoning_videos",
    files="annotation: the question file; video_root: the folder of its video files",
    load=_generic_loader(("dim", "dimension", "level", "task"), ("video", "video_path", "path")),
    notes="Open-ended: scored by the judge (as the benchmark does with an LLM), else unjudged.")

LONGVIDEO_REASON = Benchmark(
    name="longvideo_reason", title="LongVideo-Reason (eval set)", formats="JSON / JSONL",
    problem_types=("multiple_choice",), metric=MetricSpec("accuracy", breakdowns=("task",)),
    precision="documented", source="github.com/NVlabs/Long-RL (LongVideo-Reason)",
    files="annotation: the evaluation question file; video_root: its video folder",
    load=_generic_loader(("category", "question_type", "type", "task"),
                         ("video", "video_path", "path", "video_id")),
    notes="Categories Temporal, Goal, Plot, Spatial when the file names them.")

VIDEOMATHQA = Benchmark(
    name="videomathqa", title="VideoMathQA", formats="JSON / JSONL / parquet",
    problem_types=("multiple_choice",), metric=MetricSpec("accuracy", breakdowns=("task",)),
    precision="documented", source="huggingface.co/datasets/MBZUAI/VideoMathQA",
    files="annotation: the downloaded dataset folder (mcq/test-*.parquet, else "
           "data/test-*.parquet) or the MCQ file; video_root: the folder of <videoID>.mp4 (a "
           "video elsewhere under it is found by its file name)",
    load=_generic_loader(("category", "question_type", "task"),
                         ("video_id", "videoID", "video", "video_path"),
                         layouts=VIDEOMATHQA_LAYOUTS),
    notes="Multiple-choice setting; the multi-binary setting is not implemented.")

ODVBENCH = Benchmark(
    name="odvbench", title="ODV-Bench", formats="JSON / JSONL",
    problem_types=("multiple_choice",), metric=MetricSpec("accuracy", breakdowns=("task",)),
    precision="documented", source="huggingface.co/datasets/MCG-NJU/ODV-Bench",
    files="annotation: the question file; video_root: the folder of the (pre-cut) clips",
    load=_generic_loader(("task", "category", "type", "question_type"),
                         ("clip", "video_path", "video", "path")),
    notes="Questions refer to segments of long videos: cut the clips first (as EasyVideoR1's "
          "eval/preprocess does) and point video_root at them.")


ENTRIES = (VCRBENCH, VIDEOREASONBENCH, LONGVIDEO_REASON, VIDEOMATHQA, ODVBENCH)
