"""Streaming / live benchmarks: OVO-Bench (backward + real-time) and LiveSports-3K QA."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from evr1.data.schema import Sample
from evr1.eval.benchmarks.base import Benchmark, LoadContext, MetricSpec
from evr1.eval.benchmarks.common import DEFAULT_LAYOUTS, converted_sample, is_converted, records
from evr1.eval.formats import as_options, under, with_suffixes

# --------------------------------------------------------------------------- OVO-Bench

OVO_GROUPS = {"backward": ("EPM", "ASI", "HLD"),
              "realtime": ("STU", "OJR", "ATR", "ACR", "OCR", "FPD"),
              "forward": ("REC", "SSR", "CRR")}


# The hub's release: ovo_bench_new.json beside src_videos/ (and chunked_videos/ once cut).
OVOBENCH_LAYOUTS = (("ovo_bench_new.json",), ("*.json",))


def load_ovobench(ctx: LoadContext) -> Iterator[Sample]:
    for rec in records(ctx, OVOBENCH_LAYOUTS):
        if is_converted(rec.raw):
            yield converted_sample(ctx, rec, ("ovo_task",))
            continue
        task = rec.text("task")
        if task in OVO_GROUPS["forward"] or "test_info" in rec.raw:
            ctx.skipped["forward active responding (needs streaming probes)"] += 1
            continue
        qid = rec.text("id")
        video = rec.text("video", default="")
        path = ctx.media.find(*under(("chunked_videos", ""), with_suffixes(qid)),
                              *([f"src_videos/{video}", video] if video else []))
        answer = rec.get("gt", "answer")
        yield ctx.choice(rec, qid, rec.text("question"), as_options(rec.get("options")),
                         int(answer) if str(answer).isdigit() else answer, path,
                         {"task": task, "realtime": rec.get("realtime", default=None)})


OVOBENCH = Benchmark(
    name="ovobench", title="OVO-Bench (backward + real-time)",
    formats="JSON (ovo_bench_new.json)", problem_types=("multiple_choice",),
    metric=MetricSpec("group_mean", category="task", groups=OVO_GROUPS, breakdowns=("task",)),
    precision="documented", source="huggingface.co/datasets/JoeLeelyf/OVO-Bench",
    files="annotation: the downloaded dataset folder or ovo_bench_new.json; video_root: the "
           "folder holding chunked_videos/ "
           "(clips cut at each question's real-time stamp by the benchmark's script)",
    load=load_ovobench,
    notes="Backward and real-time tasks; forward active-responding tasks (REC, SSR, CRR) need "
          "streaming probes and are skipped (counted). Score = mean of the group means.")


# --------------------------------------------------------------------------- LiveSports-3K QA


# The hub's release keeps the QA and the captioning (CC) parts apart: the QA files only.
LIVESPORTS_LAYOUTS = (("*QA*.json", "*QA*.jsonl", "*QA*.csv", "*QA*.parquet", "*qa*.json",
                       "*qa*.jsonl", "*qa*.csv", "*qa*.parquet"),
                      ("*QA*/test-*.parquet", "*qa*/test-*.parquet"), *DEFAULT_LAYOUTS)


def load_livesports(ctx: LoadContext) -> Iterator[Sample]:
    for rec in records(ctx, LIVESPORTS_LAYOUTS):
        if is_converted(rec.raw):
            yield converted_sample(ctx, rec, ("q_type_livesports",))
            continue
        video = rec.text("video_id", "video")
        begin = rec.get("begin", "start", "start_time", default=None)
        end = rec.get("end", "end_time", default=None)
        names = [f"{video}_{begin}_{end}.mp4"] if begin is not None and end is not None else []
        names += [rec.text("video_path", default="")] + with_suffixes(video)
        names = [n for n in names if n]
        path = ctx.media.find(*under(("", "clips", "videos"), names),
                              search=[Path(n).name for n in names])
        sid = rec.text("question_id", "id", default=f"{video}-{rec.raw['_row']}")
        meta = {"task": rec.text("q_type", "question_type", "type", default=""),
                "ocr": rec.get("ocr", default=None)}
        options = as_options(rec.get("options", "choices"))
        yield ctx.choice(rec, sid, rec.text("question"), options, rec.get("answer"), path, meta)


LIVESPORTS3K_QA = Benchmark(
    name="livesports3k_qa", title="LiveSports-3K QA", formats="JSON / JSONL / parquet",
    problem_types=("multiple_choice",), metric=MetricSpec("accuracy", breakdowns=("task",)),
    precision="documented", source="huggingface.co/datasets/stdKonjac/LiveSports-3K",
    files="annotation: the downloaded folder (its QA file is read, not the captioning one) or "
           "the QA file; video_root: the folder of clips "
           "<video_id>_<begin>_<end>.mp4",
    load=load_livesports,
    notes="Clips are cut from the long videos beforehand (question types who/when/what).")


ENTRIES = (OVOBENCH, LIVESPORTS3K_QA)
