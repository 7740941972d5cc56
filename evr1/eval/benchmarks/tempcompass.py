"""TempCompass: four task types (multi-choice, yes/no, caption matching, captioning).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from evr1.data.schema import Sample
from evr1.eval.benchmarks.base import Benchmark, LoadContext, MetricSpec
from evr1.eval.benchmarks.common import (
    file_stem,
    records,
)
from evr1.eval.formats import (
    Record,
    split_inline_options,
    under,
    with_suffixes,
)
from evr1.eval.prompts import Template

# --------------------------------------------------------------------------- TempCompass

TEMPCOMPASS_TASKS = ("multi-choice", "yes_no", "caption_matching", "captioning")
TEMPCOMPASS_TEMPLATE = Template(post_choice="Please directly give the best option:",
                                post_other="Please answer yes or no:")


def _tempcompass_rows(rec: Record) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(video_id, dim, item) from a flat row or the nested {video: {dim: [items]}} layout."""
    raw = rec.raw
    if "question" in raw:
        yield rec.text("video_id", "video"), rec.text("dim", default=""), raw
        return
    video = str(raw.get("_key", ""))
    for dim, items in raw.items():
        if dim.startswith("_") or not isinstance(items, list):
            continue
        for item in items:
            if isinstance(item, dict):
                yield video, dim, item


def load_tempcompass(ctx: LoadContext) -> Iterator[Sample]:
    for rec in records(ctx):
        task = str(rec.raw.get("task") or rec.raw.get("task_type") or file_stem(rec))
        task = task.replace("multi_choice", "multi-choice")
        if task not in TEMPCOMPASS_TASKS:
            raise rec.fail(f"cannot tell the task type from file name {file_stem(rec)!r}; name "
                           f"the files {', '.join(TEMPCOMPASS_TASKS)} or add a task column")
        for n, (video, dim, item) in enumerate(_tempcompass_rows(rec)):
            sub = Record({**item, "_file": rec.raw["_file"], "_row": rec.raw["_row"]}, ctx.name)
            if task == "captioning":
                ctx.skipped["captioning: needs an LLM to answer the paired question"] += 1
                continue
            path = ctx.media.find(*under(("videos", ""), with_suffixes(video)))
            sid = f"{task}-{video}-{dim}-{rec.raw['_row']}-{n}"
            meta = {"task": task, "dim": dim, "video": video}
            question = sub.text("question")
            if task == "yes_no":
                yield ctx.sample(sid, question, "boolean", sub.text("answer").strip().lower(),
                                 path, meta=meta)
                continue
            stem, options = split_inline_options(question)
            yield ctx.choice(sub, sid, stem, options, sub.get("answer"), path, meta)


TEMPCOMPASS = Benchmark(
    name="tempcompass", title="TempCompass",
    formats="parquet per task (lmms-lab/TempCompass) or the official questions/<task>.json",
    problem_types=("multiple_choice", "boolean"),
    metric=MetricSpec("accuracy", breakdowns=("task", "dim")), precision="precise",
    source="huggingface.co/datasets/lmms-lab/TempCompass; github.com/llyx97/TempCompass",
    layout="annotation: the folder of multi-choice / yes_no / caption_matching files (their "
           "names give the task); video_root: the videos/ folder",
    load=load_tempcompass, template=TEMPCOMPASS_TEMPLATE,
    notes="Precise for the lmms-eval parquet files; the official nested JSON ({video: {dim: "
          "[items]}}) and caption_matching's 'Caption A: ...' option lines are documented "
          "layouts. captioning is skipped (its scoring needs an LLM to answer the paired "
          "question; the count is reported).")


ENTRIES = (TEMPCOMPASS,)
