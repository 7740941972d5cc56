"""TempCompass: four task types (multi-choice, yes/no, caption matching, captioning)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from evr1.data.schema import Sample
from evr1.eval.benchmarks.base import Benchmark, LoadContext, MetricSpec
from evr1.eval.benchmarks.common import file_config, records
from evr1.eval.formats import Record, split_inline_options, under, with_suffixes
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


# The hub's release has one config folder per task (multi-choice/test-00000-of-00001.parquet);
# the official repository one JSON per task (questions/multi-choice.json).
TEMPCOMPASS_LAYOUTS = (tuple(f"{task}/test-*.parquet" for task in TEMPCOMPASS_TASKS),
                       tuple(f"{task}/test/*.parquet" for task in TEMPCOMPASS_TASKS),
                       tuple(f"questions/{task}.json" for task in TEMPCOMPASS_TASKS),
                       ("*.parquet", "*.json"))


def load_tempcompass(ctx: LoadContext) -> Iterator[Sample]:
    for rec in records(ctx, TEMPCOMPASS_LAYOUTS):
        task = str(rec.raw.get("task") or rec.raw.get("task_type") or file_config(rec))
        task = task.replace("multi_choice", "multi-choice")
        if task not in TEMPCOMPASS_TASKS:
            raise rec.fail(f"cannot tell the task type from the file's name or folder "
                           f"{file_config(rec)!r}: expected one of "
                           f"{', '.join(TEMPCOMPASS_TASKS)}, or a task column")
        for n, (video, dim, item) in enumerate(_tempcompass_rows(rec)):
            sub = Record({**item, "_file": rec.raw["_file"], "_row": rec.raw["_row"]}, ctx.name)
            if task == "captioning":
                ctx.skipped["captioning: needs an LLM to answer the paired question"] += 1
                continue
            path = ctx.media.find(*under(("videos", "", "../videos"), with_suffixes(video)))
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
    formats="parquet per task config (lmms-lab/TempCompass: <task>/test-*.parquet) or the "
            "official questions/<task>.json",
    problem_types=("multiple_choice", "boolean"),
    metric=MetricSpec("accuracy", breakdowns=("task", "dim")), precision="precise",
    source="huggingface.co/datasets/lmms-lab/TempCompass; github.com/llyx97/TempCompass",
    files="annotation: the downloaded dataset folder (config folders multi-choice/, yes_no/, "
           "caption_matching/, captioning/, or the official questions/<task>.json), one config "
           "folder or one file (its folder or name gives the task); video_root: the folder "
           "holding videos/ (default: the annotation folder)",
    load=load_tempcompass, template=TEMPCOMPASS_TEMPLATE,
    notes="Precise for the lmms-eval parquet files; the official nested JSON ({video: {dim: "
          "[items]}}) and caption_matching's 'Caption A: ...' option lines are documented "
          "layouts. captioning is skipped (its scoring needs an LLM to answer the paired "
          "question; the count is reported).")


ENTRIES = (TEMPCOMPASS,)
