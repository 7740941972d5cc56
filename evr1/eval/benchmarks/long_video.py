"""Long-video benchmarks: LVBench, LongVideoBench, MLVU."""

from __future__ import annotations

import re
from collections.abc import Iterator

from evr1.data.schema import Sample
from evr1.eval.benchmarks.base import Benchmark, LoadContext, MetricSpec
from evr1.eval.benchmarks.common import converted_sample, file_stem, is_converted, records
from evr1.eval.formats import Record, lettered, split_inline_options, under, with_suffixes
from evr1.eval.prompts import Template

# --------------------------------------------------------------------------- LVBench


# The official release: video_info.meta.jsonl (one line per video, its questions under "qa");
# lmms-lab's hub copy: one parquet row per question (uid, question, answer, key, video_path).
LVBENCH_LAYOUTS = (("video_info.meta.jsonl", "data/video_info.meta.jsonl"),
                   ("data/train-*.parquet", "data/test-*.parquet"),
                   ("*.jsonl", "*.parquet", "*.json"))


def load_lvbench(ctx: LoadContext) -> Iterator[Sample]:
    for rec in records(ctx, LVBENCH_LAYOUTS):
        if is_converted(rec.raw):
            yield converted_sample(ctx, rec)
            continue
        key = rec.text("key")
        path = ctx.media.find(*under(("", "videos", "all_videos", "video"), with_suffixes(key)))
        questions = rec.get("qa") if "qa" in rec.raw or "question" not in rec.raw else [rec.raw]
        for n, qa in enumerate(questions):
            sub = Record({**qa, "_file": rec.raw["_file"], "_row": rec.raw["_row"]}, ctx.name)
            stem, options = split_inline_options(sub.text("question"))
            qtype = sub.get("question_type", default=[])
            meta = {"question_type": qtype if isinstance(qtype, list) else [qtype],
                    "time_reference": sub.text("time_reference", default=""), "video": key}
            yield ctx.choice(sub, sub.text("uid", default=f"{key}-{n}"), stem, options,
                             sub.get("answer"), path, meta)


LVBENCH = Benchmark(
    name="lvbench", title="LVBench",
    formats="JSONL (video_info.meta.jsonl, questions under qa) or parquet (one row per question)",
    problem_types=("multiple_choice",),
    metric=MetricSpec("accuracy", breakdowns=("question_type",)), precision="precise",
    source="huggingface.co/datasets/THUDM/LVBench (github.com/THUDM/LVBench)",
    files="annotation: the downloaded folder (video_info.meta.jsonl, data/video_info.meta.jsonl "
           "or data/train-*.parquet) or the file; video_root: the folder of <key>.mp4",
    load=load_lvbench,
    notes="A question can have several question types; it counts in each.")


# --------------------------------------------------------------------------- LongVideoBench


# The hub's release: lvb_val.json (answers) beside lvb_test_wo_gt.json (none), videos/ and
# subtitles/; its parquet copy is validation-*.parquet.
LONGVIDEOBENCH_LAYOUTS = (("lvb_val.json",), ("validation-*.parquet",),
                          ("data/validation-*.parquet", "*/validation-*.parquet"),
                          ("*.json", "*.parquet"))


def load_longvideobench(ctx: LoadContext) -> Iterator[Sample]:
    for rec in records(ctx, LONGVIDEOBENCH_LAYOUTS):
        if is_converted(rec.raw):
            yield converted_sample(ctx, rec)
            continue
        if rec.raw.get("correct_choice") is None:
            ctx.skipped["no public answer (test split)"] += 1
            continue
        if "candidates" in rec.raw:
            texts = [str(c) for c in rec.get("candidates")]
        else:
            texts = [str(rec.raw[f"option{i}"]) for i in range(5)
                     if rec.raw.get(f"option{i}") not in (None, "N/A")]
        options = lettered(texts)
        video = rec.text("video_path", "video_id")
        path = ctx.media.find(*under(("", "videos"), with_suffixes(video)))
        meta = {"duration_group": rec.text("duration_group", default=""),
                "question_category": rec.text("question_category", default="")}
        answer = rec.get("correct_choice")
        yield ctx.choice(rec, rec.text("id"), rec.text("question"), options,
                         int(answer) if str(answer).isdigit() else answer, path, meta)


LONGVIDEOBENCH = Benchmark(
    name="longvideobench", title="LongVideoBench",
    formats="JSON (lvb_val.json, candidates) or parquet (option0..option4)",
    problem_types=("multiple_choice",),
    metric=MetricSpec("accuracy", breakdowns=("duration_group", "question_category")),
    precision="precise", source="huggingface.co/datasets/longvideobench/LongVideoBench",
    files="annotation: the downloaded dataset folder (lvb_val.json is read, not "
           "lvb_test_wo_gt.json), lvb_val.json or validation-00000-of-00001.parquet; video_root: "
           "the folder holding videos/ (default: the annotation folder)",
    load=load_longvideobench, notes="Without interleaved subtitles.")


# --------------------------------------------------------------------------- MLVU

MLVU_TEMPLATE = Template(post_choice="Only give the best option.\nBest option: (")


# The hub's release: MLVU/json/<n>_<task>.json and MLVU/video/<n>_<task>/.
MLVU_LAYOUTS = (("json/*.json",), ("MLVU/json/*.json",), ("*.json",))


def load_mlvu(ctx: LoadContext) -> Iterator[Sample]:
    for rec in records(ctx, MLVU_LAYOUTS):
        if is_converted(rec.raw):
            yield converted_sample(ctx, rec)
            continue
        stem = file_stem(rec)
        task = rec.text("question_type", "task_type", default=re.sub(r"^\d+_", "", stem))
        video = rec.text("video", "video_name")
        # Basenames repeat across the task folders (363 in the dev set): the task folder (the
        # JSON's stem, with or without its number) comes before a flat layout.
        bare = re.sub(r"^\d+_", "", stem)
        folders = (stem, f"video/{stem}", f"MLVU/video/{stem}", bare, f"video/{bare}",
                   f"MLVU/video/{bare}", f"../video/{stem}", "")
        path = ctx.media.find(*under(folders, [video]))
        sid = f"{stem}-{rec.raw['_row']}"
        meta = {"task": task, "duration": rec.get("duration", default=None)}
        if "candidates" in rec.raw:
            options = lettered([str(c) for c in rec.get("candidates")])
            yield ctx.choice(rec, sid, rec.text("question"), options, rec.get("answer"), path,
                             meta)
        elif re.search(r"^\(?[A-D][.)]", rec.text("question"), re.MULTILINE):
            question, options = split_inline_options(rec.text("question"))
            yield ctx.choice(rec, sid, question, options, rec.get("answer"), path, meta)
        else:  # the generation tasks (sub-scene captioning, summary)
            yield ctx.sample(sid, rec.text("question"), "open_ended", rec.text("answer"), path,
                             meta=meta)


MLVU = Benchmark(
    name="mlvu", title="MLVU (dev)", formats="JSON, one file per task (json/<n>_<task>.json)",
    problem_types=("multiple_choice", "open_ended"),
    metric=MetricSpec("category_mean", category="task", main_types=("multiple_choice",),
                      breakdowns=("task",)),
    precision="precise", source="huggingface.co/datasets/MLVU/MVLU",
    files="annotation: the downloaded dataset folder (holding MLVU/json/), MLVU/ or "
           "MLVU/json/; video_root: MLVU/video/ (holding <n>_<task>/ folders) or a folder above "
           "it (default: the annotation folder)",
    load=load_mlvu, template=MLVU_TEMPLATE,
    notes="Main score is M-Avg (mean over the multiple-choice tasks); the generation tasks are "
          "open-ended (judge) and reported per task.")


ENTRIES = (LVBENCH, LONGVIDEOBENCH, MLVU)
