"""The benchmark registry: how to read each benchmark's official files, and how it is scored.

Every entry says which annotation formats it reads, which problem types its questions become,
the prompt template of its own evaluation, the metric and the sub-scores it reports, and how
well evr1 knows its format: ``precise`` (checked against the published files and the reference
evaluation code) or ``documented`` (the fields its paper / README / release describe; a file
that differs fails with a message naming the fields found). docs/benchmarks.md has the table.

A loader turns the official annotation file into evr1 ``Sample``s whose ``meta`` carries what
the sub-scores group by (category, duration, ...) and whose ``path`` is the media file under the
user's video root. ``prepare_benchmark`` writes them as an evr1 JSONL, so the preprocess stage
caches their frames exactly as it does for training data.

Loaders also accept the "converted" layout that EasyVideoR1 ships for these benchmarks (records
with ``problem``, ``problem_type``, ``options``, ``solution``, ``path``), since many users have
those files already.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evr1.data.schema import Sample, load_samples
from evr1.eval.formats import (
    LETTERS,
    FormatError,
    MediaResolver,
    Record,
    as_options,
    letter_of,
    lettered,
    read_records,
    split_inline_options,
    under,
    with_suffixes,
)
from evr1.eval.prompts import GENERIC, Template, build_prompt
from evr1.rewards import Verdict, register
from evr1.rewards.numeric import last_number, solution_number

log = logging.getLogger("evr1.eval")


# --------------------------------------------------------------------------- metric specs


@dataclass(frozen=True)
class MetricSpec:
    """How a benchmark turns per-item scores into its reported numbers (see metrics.py).

    kind: ``accuracy`` (mean over all items), ``category_mean`` (mean of per-category means,
    e.g. MVBench's 20 tasks), ``group_mean`` (mean of group means of category means: OVO-Bench),
    ``grounding`` (R@IoU thresholds and mIoU), ``stvg`` (m_tIoU, m_vIoU, vIoU@thresholds).
    """

    kind: str = "accuracy"
    category: str = "task"  # meta key of the category (category_mean, group_mean)
    merge: dict[str, tuple[str, ...]] = field(default_factory=dict)  # categories averaged first
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)  # group_mean
    main_types: tuple[str, ...] = ()  # only items of these problem types count in the main score
    breakdowns: tuple[str, ...] = ()  # meta keys reported as sub-scores
    thresholds: tuple[float, ...] = (0.3, 0.5, 0.7)  # grounding / stvg


@dataclass
class LoadContext:
    """What a loader needs besides the annotation file."""

    name: str
    alias: str
    annotation: Path
    media: MediaResolver
    style: str = "tags"
    media_out: Path | None = None  # where loaders write media embedded in annotations (images)
    template: Template = GENERIC
    skipped: Counter = field(default_factory=Counter)  # reason -> items not converted

    def sample(self, source_id: Any, question: str, problem_type: str, solution: Any,
               path: str | None, *, options: Sequence[str] | None = None,
               meta: dict[str, Any] | None = None, data_type: str = "video",
               reward_kwargs: dict[str, Any] | None = None, prompt: str | None = None) -> Sample:
        meta = {k: v for k, v in (meta or {}).items() if v is not None and v != ""}
        meta.update(benchmark=self.name, source_id=str(source_id), question=question)
        if reward_kwargs:
            meta["reward_kwargs"] = reward_kwargs
        text = prompt or build_prompt(question, options, problem_type, self.style, self.template)
        return Sample(id=f"{self.alias}-{source_id}", problem_type=problem_type, problem=text,
                      options=list(options) if options else None, solution=solution,
                      data_type=data_type, path=path, meta=meta)

    def choice(self, rec: Record, source_id: Any, question: str, options: Sequence[str] | None,
               answer: Any, path: str, meta: dict[str, Any] | None = None,
               data_type: str = "video") -> Sample:
        """A multiple-choice sample; the answer may be a letter, an index or an option text."""
        if not options:
            raise rec.fail(f"question {source_id!r} has no options")
        letter = letter_of(strip_tags(answer), options)
        if letter is None:
            raise rec.fail(f"answer {answer!r} is neither a letter, an index nor the text of "
                           f"one of the {len(options)} options")
        return self.sample(source_id, question, "multiple_choice", letter, path, options=options,
                           meta=meta, data_type=data_type)


Loader = Callable[[LoadContext], Iterable[Sample]]


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    formats: str  # the files it reads, as published
    problem_types: tuple[str, ...]
    metric: MetricSpec
    precision: str  # precise | documented
    source: str  # where the official files come from
    layout: str  # what annotation / video_root point at
    load: Loader
    template: Template = GENERIC
    notes: str = ""


BENCHMARKS: dict[str, Benchmark] = {}


def register_benchmark(bench: Benchmark) -> Benchmark:
    BENCHMARKS[bench.name] = bench
    return bench


def get_benchmark(name: str) -> Benchmark:
    key = name.strip().lower().replace("-", "_")
    if key not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}")
    return BENCHMARKS[key]


# --------------------------------------------------------------------------- shared helpers


_TAG = re.compile(r"</?answer>", re.IGNORECASE)


def strip_tags(value: Any) -> Any:
    return _TAG.sub("", value).strip() if isinstance(value, str) else value


def records(ctx: LoadContext, suffixes: Sequence[str] | None = None) -> Iterator[Record]:
    rows = read_records(ctx.annotation, suffixes) if suffixes else read_records(ctx.annotation)
    for raw in rows:
        yield Record(raw, ctx.name)


def file_stem(rec: Record) -> str:
    return Path(str(rec.raw.get("_file", ""))).stem


def is_converted(raw: dict[str, Any]) -> bool:
    """A record in the converted layout (problem / problem_type / solution / path)."""
    return all(k in raw for k in ("problem", "problem_type", "solution"))


_CONVERTED_TYPES = {"multiple choice": "multiple_choice", "numerical": "numerical",
                    "regression": "regression", "open-ended": "open_ended",
                    "free-form": "open_ended", "ocr": "ocr",
                    "temporal grounding": "temporal_grounding",
                    "spatial-temporal grounding": "spatial_temporal_grounding",
                    "yes/no": "boolean", "boolean": "boolean"}


def converted_sample(ctx: LoadContext, rec: Record, category_keys: Sequence[str] = ()) -> Sample:
    """A converted-layout record; leftover fields (ovo_task, q_type_...) go into meta."""
    raw = rec.raw
    ptype = _CONVERTED_TYPES.get(str(raw["problem_type"]).strip().lower(),
                                 str(raw["problem_type"]))
    source_id = raw.get("problem_id", raw.get("id", raw["_row"]))
    question = str(raw["problem"])
    solution = strip_tags(raw["solution"])
    path = ctx.media.find(str(raw.get("path") or raw.get("video") or ""))
    meta = {k: v for k, v in raw.items() if not k.startswith("_") and k not in
            ("problem", "problem_type", "solution", "options", "path", "data_type",
             "problem_id", "data_source") and isinstance(v, (str, int, float))}
    for key in category_keys:
        if key in raw:
            meta.setdefault("task", raw[key])
    data_type = str(raw.get("data_type") or "video")
    if ptype == "multiple_choice":
        return ctx.choice(rec, source_id, question, as_options(raw.get("options")), solution,
                          path, meta, data_type)
    if ptype == "spatial_temporal_grounding":
        solution, kwargs = tube_solution(rec, solution)
        return ctx.sample(source_id, question, ptype, solution, path, meta=meta,
                          data_type=data_type, reward_kwargs=kwargs)
    return ctx.sample(source_id, question, ptype, solution, path, meta=meta, data_type=data_type)


def tube_solution(rec: Record, solution: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A ``{"time"|"span": [s, e], "boxes": {...}}`` solution in the reward's shape."""
    if isinstance(solution, str):
        try:
            solution = json.loads(solution)
        except json.JSONDecodeError as exc:
            raise rec.fail(f"solution is not a JSON object: {solution[:80]!r}") from exc
    if not isinstance(solution, dict) or "boxes" not in solution:
        raise rec.fail("a spatial-temporal solution needs span/time and boxes")
    span = solution.get("span", solution.get("time"))
    return {"span": span, "boxes": solution["boxes"]}, {"box_format": "pixel"}


# --------------------------------------------------------------------------- synthetic / evr1


def load_synthetic(ctx: LoadContext) -> Iterator[Sample]:
    """An evr1 sample JSONL (the synthetic held-out set): ids and prompts kept as they are,
    so frames already cached for training are found under the same ids."""
    root = ctx.media.root if str(ctx.media.root) not in ("", ".") else None
    for sample in load_samples(ctx.annotation, media_root=root, check_media=False):
        sample.meta.setdefault("task", str(sample.meta.get("task") or sample.problem_type))
        yield sample


register_benchmark(Benchmark(
    name="synthetic", title="evr1 synthetic held-out set (any evr1 JSONL)",
    formats="evr1 sample JSONL", problem_types=("multiple_choice", "numerical", "boolean",
                                                "temporal_grounding", "spatial_grounding"),
    metric=MetricSpec("accuracy", breakdowns=("task",)), precision="precise",
    source="tools/make_synthetic.py (heldout.jsonl)",
    layout="annotation: the JSONL (default data.eval_jsonl); video_root: data.media_root",
    load=load_synthetic))


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


register_benchmark(Benchmark(
    name="videomme", title="Video-MME", formats="parquet (videomme/test-*.parquet), JSON/JSONL",
    problem_types=("multiple_choice",),
    metric=MetricSpec("accuracy", breakdowns=("duration", "domain", "task_type")),
    precision="precise", source="huggingface.co/datasets/lmms-lab/Video-MME",
    layout="annotation: videomme/test-00000-of-00001.parquet; video_root: the folder holding "
           "data/<videoID>.mp4 (or the data/ folder itself)",
    load=load_videomme, template=VIDEOMME_TEMPLATE,
    notes="Without subtitles (the 'w/o subs' setting)."))


# --------------------------------------------------------------------------- MVBench

# task (json file stem) -> video folders: the original release's, then lmms-eval's mirror.
MVBENCH_FOLDERS: dict[str, tuple[str, ...]] = {
    "action_sequence": ("star/Charades_v1_480", "star/Charades_segment"),
    "action_prediction": ("star/Charades_v1_480", "star/Charades_segment"),
    "action_antonym": ("ssv2_video", "ssv2_video_mp4"),
    "fine_grained_action": ("Moments_in_Time_Raw/videos",),
    "unexpected_action": ("FunQA_test/test",),
    "object_existence": ("clevrer/video_validation",),
    "object_interaction": ("star/Charades_v1_480", "star/Charades_segment"),
    "object_shuffle": ("perception/videos",),
    "moving_direction": ("clevrer/video_validation",),
    "action_localization": ("sta/sta_video", "sta/sta_video_segment"),
    "scene_transition": ("scene_qa/video",),
    "action_count": ("perception/videos",),
    "moving_count": ("clevrer/video_validation",),
    "moving_attribute": ("clevrer/video_validation",),
    "state_change": ("perception/videos",),
    "fine_grained_pose": ("nturgbd", "nturgbd_convert"),
    "character_order": ("perception/videos",),
    "egocentric_navigation": ("vlnqa",),
    "episodic_reasoning": ("tvqa/frames_fps3_hq", "tvqa/video_fps3_hq_segment"),
    "counterfactual_inference": ("clevrer/video_validation",),
}

MVBENCH_TEMPLATE = Template(
    pre=("Carefully watch the video and pay attention to the cause and sequence of events, the "
         "detail and movement of objects, and the action and pose of persons. Based on your "
         "observations, select the best option that accurately addresses the question.\n"
         "Question: "),
    options_header="Options:", option_style="paren", post_choice="Only give the best option.")


def load_mvbench(ctx: LoadContext) -> Iterator[Sample]:
    for rec in records(ctx, (".json",)):
        task = str(rec.raw.get("task") or file_stem(rec))
        if is_converted(rec.raw):
            yield converted_sample(ctx, rec)
            continue
        video = rec.text("video")
        folders = MVBENCH_FOLDERS.get(task, ())
        path = ctx.media.find(*under((*folders, "video", ""), [video]),
                              *under(tuple(f"video/{f}" for f in folders), [video]))
        meta = {"task": task, "start": rec.get("start", default=None),
                "end": rec.get("end", default=None)}
        options = lettered([str(c) for c in rec.get("candidates")])
        yield ctx.choice(rec, f"{task}-{rec.raw['_row']}", rec.text("question"), options,
                         rec.get("answer"), path, meta)


register_benchmark(Benchmark(
    name="mvbench", title="MVBench", formats="JSON, one file per task (json/<task>.json)",
    problem_types=("multiple_choice",),
    metric=MetricSpec("category_mean", category="task", breakdowns=("task",)),
    precision="precise", source="huggingface.co/datasets/OpenGVLab/MVBench",
    layout="annotation: the json/ folder (or one task file); video_root: the video/ folder "
           "(holding star/, clevrer/, perception/, ...)",
    load=load_mvbench, template=MVBENCH_TEMPLATE,
    notes="Whole videos are used: the start/end bounds of the STAR/STA tasks are kept in meta "
          "but not applied (use lmms-eval's pre-cut *_segment folders for exact clips). "
          "episodic_reasoning ships frame folders, which the decoders do not read: those items "
          "are counted as failed media."))


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


register_benchmark(Benchmark(
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
          "question; the count is reported)."))


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


register_benchmark(Benchmark(
    name="motionbench", title="MotionBench", formats="JSONL (video_info.meta.jsonl layout)",
    problem_types=("multiple_choice",), metric=MetricSpec("accuracy", breakdowns=("task",)),
    precision="documented", source="huggingface.co/datasets/THUDM/MotionBench",
    layout="annotation: the dev-split JSONL; video_root: the folder of its video_path entries",
    load=load_motionbench,
    notes="Items without a public answer (the test split) are skipped and counted; categories "
          "(MR, LM, CM, MO, AO, RC) from question_type."))


# --------------------------------------------------------------------------- LVBench


def load_lvbench(ctx: LoadContext) -> Iterator[Sample]:
    for rec in records(ctx):
        if is_converted(rec.raw):
            yield converted_sample(ctx, rec)
            continue
        key = rec.text("key")
        path = ctx.media.find(*under(("", "videos", "all_videos", "video"), with_suffixes(key)))
        for n, qa in enumerate(rec.get("qa")):
            sub = Record({**qa, "_file": rec.raw["_file"], "_row": rec.raw["_row"]}, ctx.name)
            stem, options = split_inline_options(sub.text("question"))
            qtype = sub.get("question_type", default=[])
            meta = {"question_type": qtype if isinstance(qtype, list) else [qtype],
                    "time_reference": sub.text("time_reference", default=""), "video": key}
            yield ctx.choice(sub, sub.text("uid", default=f"{key}-{n}"), stem, options,
                             sub.get("answer"), path, meta)


register_benchmark(Benchmark(
    name="lvbench", title="LVBench", formats="JSONL (video_info.meta.jsonl)",
    problem_types=("multiple_choice",),
    metric=MetricSpec("accuracy", breakdowns=("question_type",)), precision="precise",
    source="huggingface.co/datasets/THUDM/LVBench (github.com/THUDM/LVBench)",
    layout="annotation: data/video_info.meta.jsonl; video_root: the folder of <key>.mp4",
    load=load_lvbench,
    notes="A question can have several question types; it counts in each."))


# --------------------------------------------------------------------------- LongVideoBench


def load_longvideobench(ctx: LoadContext) -> Iterator[Sample]:
    for rec in records(ctx):
        if is_converted(rec.raw):
            yield converted_sample(ctx, rec)
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


register_benchmark(Benchmark(
    name="longvideobench", title="LongVideoBench",
    formats="JSON (lvb_val.json, candidates) or parquet (option0..option4)",
    problem_types=("multiple_choice",),
    metric=MetricSpec("accuracy", breakdowns=("duration_group", "question_category")),
    precision="precise", source="huggingface.co/datasets/longvideobench/LongVideoBench",
    layout="annotation: lvb_val.json or validation-00000-of-00001.parquet; video_root: the "
           "folder holding videos/",
    load=load_longvideobench, notes="Without interleaved subtitles."))


# --------------------------------------------------------------------------- MLVU

MLVU_TEMPLATE = Template(post_choice="Only give the best option.\nBest option: (")


def load_mlvu(ctx: LoadContext) -> Iterator[Sample]:
    for rec in records(ctx):
        if is_converted(rec.raw):
            yield converted_sample(ctx, rec)
            continue
        stem = file_stem(rec)
        task = rec.text("question_type", "task_type", default=re.sub(r"^\d+_", "", stem))
        video = rec.text("video", "video_name")
        # Basenames repeat across the task folders (363 in the dev set): the task folder (the
        # JSON's stem, with or without its number) comes before a flat layout.
        bare = re.sub(r"^\d+_", "", stem)
        path = ctx.media.find(*under((stem, f"video/{stem}", bare, f"video/{bare}", ""), [video]))
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


register_benchmark(Benchmark(
    name="mlvu", title="MLVU (dev)", formats="JSON, one file per task (json/<n>_<task>.json)",
    problem_types=("multiple_choice", "open_ended"),
    metric=MetricSpec("category_mean", category="task", main_types=("multiple_choice",),
                      breakdowns=("task",)),
    precision="precise", source="huggingface.co/datasets/MLVU/MVLU",
    layout="annotation: MLVU/json/; video_root: MLVU/video/ (holding <n>_<task>/ folders)",
    load=load_mlvu, template=MLVU_TEMPLATE,
    notes="Main score is M-Avg (mean over the multiple-choice tasks); the generation tasks are "
          "open-ended (judge) and reported per task."))


# --------------------------------------------------------------------------- Video-Holmes


def load_video_holmes(ctx: LoadContext) -> Iterator[Sample]:
    for rec in records(ctx):
        if is_converted(rec.raw):
            yield converted_sample(ctx, rec)
            continue
        video = rec.text("video ID", "video_id")
        path = ctx.media.find(*under(("videos_cropped", "videos", ""), with_suffixes(video)))
        options = as_options(rec.get("Options", "options"))
        qid = rec.text("Question ID", "question_id", default=str(rec.raw["_row"]))
        meta = {"question_type": rec.text("Question Type", "question_type", default="")}
        yield ctx.choice(rec, f"{video}-{qid}", rec.text("Question", "question"), options,
                         rec.get("Answer", "answer"), path, meta)


register_benchmark(Benchmark(
    name="video_holmes", title="Video-Holmes", formats="JSON (test_Video-Holmes.json)",
    problem_types=("multiple_choice",),
    metric=MetricSpec("accuracy", breakdowns=("question_type",)), precision="precise",
    source="huggingface.co/datasets/TencentARC/Video-Holmes",
    layout="annotation: Benchmark/test_Video-Holmes.json; video_root: Benchmark/ (holding "
           "videos_cropped/)",
    load=load_video_holmes, notes="Question types SR, IMC, TCI, TA, MHR, PAR, CTI."))


# --------------------------------------------------------------------------- MINERVA


def load_minerva(ctx: LoadContext) -> Iterator[Sample]:
    for rec in records(ctx):
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


register_benchmark(Benchmark(
    name="minerva", title="MINERVA", formats="JSON (minerva.json)",
    problem_types=("multiple_choice",), metric=MetricSpec("accuracy", breakdowns=("category",)),
    precision="documented", source="github.com/google-deepmind/neptune (MINERVA release)",
    layout="annotation: minerva.json; video_root: the folder of <video_id>.mp4",
    load=load_minerva,
    notes="Fields key, video_id, question, answer_choice_0..4, answer_id; no ASR transcript."))


# --------------------------------------------------------------------------- generic layouts


def generic_choice_or_open(ctx: LoadContext, rec: Record, sid: Any, meta: dict[str, Any],
                           video_names: Sequence[str], folders: Sequence[str] = ("", "videos",
                                                                                 "video")
                           ) -> Sample:
    """A record with a question, an answer and, for multiple choice, options (list or map)."""
    video = rec.text(*video_names)
    path = ctx.media.find(*under(folders, with_suffixes(video)))
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
                    meta_key: str = "task") -> Loader:
    def load(ctx: LoadContext) -> Iterator[Sample]:
        for rec in records(ctx):
            if is_converted(rec.raw):
                yield converted_sample(ctx, rec, category_names)
                continue
            sid = rec.text(*id_names, default=str(rec.raw["_row"]))
            meta = {meta_key: rec.text(*category_names, default="")}
            yield generic_choice_or_open(ctx, rec, sid, meta, video_names)
    return load


register_benchmark(Benchmark(
    name="vcrbench", title="VCR-Bench", formats="JSON / JSONL",
    problem_types=("multiple_choice", "open_ended"),
    metric=MetricSpec("accuracy", breakdowns=("task",)), precision="documented",
    source="huggingface.co/datasets/VLM-Reasoning/VCR-Bench",
    layout="annotation: the question file; video_root: the folder its video paths start from",
    load=_generic_loader(("dimension", "category", "task"), ("video_path", "video", "path")),
    notes="Reports answer accuracy per dimension; the chain-of-thought score (recall/precision "
          "of reasoning steps by a judge) is not computed. Open-ended items need the judge."))

register_benchmark(Benchmark(
    name="videoreasonbench", title="VideoReasonBench", formats="JSON / JSONL",
    problem_types=("open_ended",), metric=MetricSpec("accuracy", breakdowns=("task",)),
    precision="documented", source="huggingface.co/datasets/lyx97/reasoning_videos",
    layout="annotation: the question file; video_root: the folder of its video files",
    load=_generic_loader(("dim", "dimension", "level", "task"), ("video", "video_path", "path")),
    notes="Open-ended: scored by the judge (as the benchmark does with an LLM), else unjudged."))

register_benchmark(Benchmark(
    name="longvideo_reason", title="LongVideo-Reason (eval set)", formats="JSON / JSONL",
    problem_types=("multiple_choice",), metric=MetricSpec("accuracy", breakdowns=("task",)),
    precision="documented", source="github.com/NVlabs/Long-RL (LongVideo-Reason)",
    layout="annotation: the evaluation question file; video_root: its video folder",
    load=_generic_loader(("category", "question_type", "type", "task"),
                         ("video", "video_path", "path", "video_id")),
    notes="Categories Temporal, Goal, Plot, Spatial when the file names them."))

register_benchmark(Benchmark(
    name="videomathqa", title="VideoMathQA", formats="JSON / JSONL / parquet",
    problem_types=("multiple_choice",), metric=MetricSpec("accuracy", breakdowns=("task",)),
    precision="documented", source="huggingface.co/datasets/MBZUAI/VideoMathQA",
    layout="annotation: the MCQ question file; video_root: the folder of <video_id>.mp4",
    load=_generic_loader(("category", "question_type", "task"),
                         ("video_id", "videoID", "video", "video_path")),
    notes="Multiple-choice setting; the multi-binary setting is not implemented."))

register_benchmark(Benchmark(
    name="odvbench", title="ODV-Bench", formats="JSON / JSONL",
    problem_types=("multiple_choice",), metric=MetricSpec("accuracy", breakdowns=("task",)),
    precision="documented", source="huggingface.co/datasets/MCG-NJU/ODV-Bench",
    layout="annotation: the question file; video_root: the folder of the (pre-cut) clips",
    load=_generic_loader(("task", "category", "type", "question_type"),
                         ("clip", "video_path", "video", "path")),
    notes="Questions refer to segments of long videos: cut the clips first (as EasyVideoR1's "
          "eval/preprocess does) and point video_root at them."))


# --------------------------------------------------------------------------- LiveSports-3K QA


def load_livesports(ctx: LoadContext) -> Iterator[Sample]:
    for rec in records(ctx):
        if is_converted(rec.raw):
            yield converted_sample(ctx, rec, ("q_type_livesports",))
            continue
        video = rec.text("video_id", "video")
        begin = rec.get("begin", "start", "start_time", default=None)
        end = rec.get("end", "end_time", default=None)
        names = [f"{video}_{begin}_{end}.mp4"] if begin is not None and end is not None else []
        names += [rec.text("video_path", default="")] + with_suffixes(video)
        path = ctx.media.find(*under(("", "clips", "videos"), [n for n in names if n]))
        sid = rec.text("question_id", "id", default=f"{video}-{rec.raw['_row']}")
        meta = {"task": rec.text("q_type", "question_type", "type", default=""),
                "ocr": rec.get("ocr", default=None)}
        options = as_options(rec.get("options", "choices"))
        yield ctx.choice(rec, sid, rec.text("question"), options, rec.get("answer"), path, meta)


register_benchmark(Benchmark(
    name="livesports3k_qa", title="LiveSports-3K QA", formats="JSON / JSONL / parquet",
    problem_types=("multiple_choice",), metric=MetricSpec("accuracy", breakdowns=("task",)),
    precision="documented", source="huggingface.co/datasets/stdKonjac/LiveSports-3K",
    layout="annotation: the QA file; video_root: the folder of clips "
           "<video_id>_<begin>_<end>.mp4",
    load=load_livesports,
    notes="Clips are cut from the long videos beforehand (question types who/when/what)."))


# --------------------------------------------------------------------------- MMVU


def _mmvu_video(value: str) -> list[str]:
    """The release gives hub URLs (.../resolve/main/videos/Art/0.mp4): keep the relative part."""
    if "/resolve/main/" in value:
        rel = value.split("/resolve/main/", 1)[1]
        return [rel, rel.split("/", 1)[1] if "/" in rel else rel, Path(rel).name]
    return [value]


def load_mmvu(ctx: LoadContext) -> Iterator[Sample]:
    for rec in records(ctx):
        if is_converted(rec.raw):
            yield converted_sample(ctx, rec)
            continue
        path = ctx.media.find(*_mmvu_video(rec.text("video")))
        metadata = rec.get("metadata", default={}) or {}
        meta = {"subject": metadata.get("subject", "") if isinstance(metadata, dict) else "",
                "question_type": rec.text("question_type", default="")}
        options = as_options(rec.get("choices", "options", default=None))
        sid = rec.text("id", default=str(rec.raw["_row"]))
        if options:
            yield ctx.choice(rec, sid, rec.text("question"), options, rec.get("answer"), path,
                             meta)
        else:
            yield ctx.sample(sid, rec.text("question"), "open_ended", rec.text("answer"), path,
                             meta=meta)


register_benchmark(Benchmark(
    name="mmvu", title="MMVU (validation)", formats="JSON (validation.json)",
    problem_types=("multiple_choice", "open_ended"),
    metric=MetricSpec("accuracy", breakdowns=("subject", "question_type")),
    precision="documented", source="huggingface.co/datasets/yale-nlp/MMVU",
    layout="annotation: validation.json; video_root: the dataset folder (holding videos/)",
    load=load_mmvu, notes="Open-ended questions need the judge (the benchmark uses GPT-4o)."))


# --------------------------------------------------------------------------- Video-MMMU


def load_videommmu(ctx: LoadContext) -> Iterator[Sample]:
    for rec in records(ctx):
        if is_converted(rec.raw):
            yield converted_sample(ctx, rec)
            continue
        track = rec.text("track", "config", default=file_stem(rec).split("-")[0])
        vid = rec.text("id")
        path = ctx.media.find(*under(("", track, track.lower(), track.capitalize(), "videos"),
                                     with_suffixes(vid)))
        meta = {"track": track}
        options = as_options(rec.get("options", default=None))
        answer = rec.get("answer")
        if options and str(rec.raw.get("question_type", "multiple-choice")).startswith("multi"):
            yield ctx.choice(rec, vid, rec.text("question"), options, answer, path, meta)
        elif last_number(str(answer)) is not None and len(str(answer)) < 24:
            yield ctx.sample(vid, rec.text("question"), "numerical", str(answer), path, meta=meta)
        else:
            yield ctx.sample(vid, rec.text("question"), "open_ended", str(answer), path,
                             meta=meta)


register_benchmark(Benchmark(
    name="videommmu", title="Video-MMMU", formats="parquet per track (Perception, "
    "Comprehension, Adaptation), JSON",
    problem_types=("multiple_choice", "numerical", "open_ended"),
    metric=MetricSpec("accuracy", breakdowns=("track",)), precision="documented",
    source="huggingface.co/datasets/lmms-lab/VideoMMMU",
    layout="annotation: the folder of track files (the file name gives the track); "
           "video_root: the folder of <id>.mp4 (or <track>/<id>.mp4)",
    load=load_videommmu,
    notes="The Adaptation track's extra image is not attached (a sample holds one medium); "
          "Δknowledge is not computed."))


# --------------------------------------------------------------------------- VSI-Bench

VSI_CHOICE_TYPES = ("object_rel_direction_easy", "object_rel_direction_medium",
                    "object_rel_direction_hard", "object_rel_distance", "route_planning",
                    "obj_appearance_order")
VSI_NUMBER_TYPES = ("object_abs_distance", "object_counting", "object_size_estimation",
                    "room_size_estimation")
VSI_TEMPLATE = Template(pre="These are frames of a video.\n", options_header="Options:",
                        post_other="Please answer the question using a single word or phrase.")
# VSI-Bench's thresholds: numpy.linspace(0.5, 0.95, 10), computed the same way so that answers
# on a threshold (12 for 10 at 0.8) fall on the same side as in the official code.
_VSI_CONFIDENCE = np.linspace(0.5, 0.95, 10)


def vsi_mean_relative_accuracy(answer: str, solution: Any, **_: Any) -> Verdict:
    """VSI-Bench MRA: mean over thresholds c of 1[|pred - gold| / gold <= 1 - c].

    Differs from the ``regression`` reward only on the thresholds themselves: ``<=`` and
    numpy's linspace floats as in the official evaluation, where the reward uses ``<`` (3 for
    2: 0.1 here, 0.0 as a reward). Small integer counts land on thresholds often.
    """
    gold = solution_number(solution, "vsibench_mra")
    found = last_number(answer)
    if found is None:
        return Verdict(0.0, parsed=False)
    pred, raw = found
    if gold == 0:
        return Verdict(float(pred == 0), parsed=True, extracted=raw)
    error = abs(pred - gold) / abs(gold)
    return Verdict(float((error <= 1 - _VSI_CONFIDENCE).mean()), parsed=True, extracted=raw)


register("vsibench_mra", vsi_mean_relative_accuracy, replace=True)


def load_vsibench(ctx: LoadContext) -> Iterator[Sample]:
    for rec in records(ctx):
        if is_converted(rec.raw):
            yield converted_sample(ctx, rec)
            continue
        qtype = rec.text("question_type")
        dataset, scene = rec.text("dataset"), rec.text("scene_name")
        path = ctx.media.find(*under((dataset, ""), with_suffixes(scene)))
        meta = {"question_type": qtype, "dataset": dataset}
        sid = rec.text("id", default=str(rec.raw["_row"]))
        if qtype in VSI_CHOICE_TYPES:
            yield ctx.choice(rec, sid, rec.text("question"), as_options(rec.get("options")),
                             rec.get("ground_truth"), path, meta)
        elif qtype in VSI_NUMBER_TYPES:
            # Worded like a regression question ("answer with a number").
            prompt = build_prompt(rec.text("question"), None, "regression", ctx.style,
                                  VSI_TEMPLATE)
            yield ctx.sample(sid, rec.text("question"), "vsibench_mra",
                             str(rec.get("ground_truth")), path, meta=meta, prompt=prompt)
        else:
            raise rec.fail(f"unknown VSI-Bench question_type {qtype!r}")


register_benchmark(Benchmark(
    name="vsibench", title="VSI-Bench", formats="parquet (test-*.parquet), JSON/JSONL",
    problem_types=("multiple_choice", "vsibench_mra"),
    metric=MetricSpec("category_mean", category="question_type",
                      merge={"object_rel_direction": ("object_rel_direction_easy",
                                                      "object_rel_direction_medium",
                                                      "object_rel_direction_hard")},
                      breakdowns=("question_type", "dataset")),
    precision="precise", source="huggingface.co/datasets/nyu-visionx/VSI-Bench",
    layout="annotation: test-00000-of-00001.parquet; video_root: the folder holding "
           "arkitscenes/, scannet/, scannetpp/",
    load=load_vsibench, template=VSI_TEMPLATE,
    notes="Multiple-choice types: exact letter; numeric types: MRA over thresholds "
          "0.50..0.95 (<= as in the official code); overall = mean over the question types "
          "with the three relative-direction levels averaged into one."))


# --------------------------------------------------------------------------- Charades-STA

CHARADES_TEMPLATE = Template(post_other=(
    "Please find the visual event described by the sentence in the video, determining its "
    "starting and ending times. Answer in the format: 'The event happens in the start time - "
    "end time seconds'."))


def _charades_txt(path: Path) -> Iterator[dict[str, Any]]:
    """``<video> <start> <end>##<sentence>`` per line (the official test file)."""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        head, sep, sentence = line.partition("##")
        parts = head.split()
        if not sep or len(parts) != 3:
            raise FormatError(f"{path}:{n + 1}: expected '<video> <start> <end>##<sentence>', "
                              f"got {line[:80]!r}")
        yield {"video": parts[0], "timestamp": [float(parts[1]), float(parts[2])],
               "sentence": sentence.strip(), "_file": str(path), "_row": n}


def _charades_json(rec: Record) -> Iterator[dict[str, Any]]:
    """{video: {duration, timestamps: [[s, e]...], sentences: [...]}} or one row per query."""
    raw = rec.raw
    if "sentences" in raw and "timestamps" in raw:
        for i, (span, sentence) in enumerate(zip(raw["timestamps"], raw["sentences"],
                                                 strict=True)):
            yield {"video": raw.get("_key") or raw.get("video"), "timestamp": span,
                   "sentence": sentence, "duration": raw.get("duration"), "_file": raw["_file"],
                   "_row": f"{raw['_row']}.{i}"}
    else:
        yield raw


def load_charades_sta(ctx: LoadContext) -> Iterator[Sample]:
    if ctx.annotation.suffix.lower() == ".txt":
        rows: Iterable[dict[str, Any]] = _charades_txt(ctx.annotation)
    else:
        rows = (row for rec in records(ctx) for row in _charades_json(rec))
    for row in rows:
        rec = Record(row, ctx.name)
        if is_converted(row):
            yield converted_sample(ctx, rec)
            continue
        video = rec.text("video", "vid", "video_id")
        span = rec.get("timestamp", "timestamps", "span")
        if isinstance(span, list) and span and isinstance(span[0], list):
            span = span[0]
        if not isinstance(span, list) or len(span) != 2:
            raise rec.fail(f"timestamp must be [start, end], got {span!r}")
        sentence = rec.text("sentence", "query", "caption", "description")
        path = ctx.media.find(*under(("", "videos", "Charades_v1_480"), with_suffixes(video)))
        question = (f'Find the start and end time of the event "{sentence.strip().rstrip(".")}"'
                    " in the video.")
        prompt = (build_prompt(f"Sentence: {sentence}", None, "temporal_grounding", "official",
                               CHARADES_TEMPLATE) if ctx.style == "official" else None)
        yield ctx.sample(f"{video}-{rec.raw['_row']}", question, "temporal_grounding",
                         [float(span[0]), float(span[1])], path,
                         meta={"video": video, "duration": rec.get("duration", default=None)},
                         prompt=prompt)


register_benchmark(Benchmark(
    name="charades_sta", title="Charades-STA (test)",
    formats="text (charades_sta_test.txt: '<vid> <start> <end>##<sentence>'), JSON",
    problem_types=("temporal_grounding",),
    metric=MetricSpec("grounding", thresholds=(0.3, 0.5, 0.7)), precision="precise",
    source="github.com/jiyanggao/TALL (charades_sta_test.txt); videos from Charades",
    layout="annotation: charades_sta_test.txt; video_root: Charades_v1_480/",
    load=load_charades_sta, template=CHARADES_TEMPLATE,
    notes="Main score mIoU; R@1 at IoU 0.3 / 0.5 / 0.7 as sub-scores."))


# --------------------------------------------------------------------------- STVG


def _hcstvg_tube(rec: Record) -> tuple[dict[str, Any], dict[str, Any]]:
    """HC-STVG-style record: per-frame [x, y, w, h] boxes from st_frame, times in seconds."""
    boxes = rec.get("bbox", "boxes")
    st_frame = int(rec.get("st_frame"))
    st_time, ed_time = float(rec.get("st_time")), float(rec.get("ed_time"))
    fps = rec.get("fps", default=None)
    if fps is None and st_time > 0:
        fps = st_frame / st_time
    if fps is None:
        frames, seconds = rec.get("frame_count", "img_num", default=None), rec.get(
            "duration", default=None)
        if frames is None or seconds is None:
            raise rec.fail("cannot tell the frame rate: give fps, or frame_count and duration")
        fps = float(frames) / float(seconds)
    by_second: dict[str, list[float]] = {}
    for i, box in enumerate(boxes):
        second = int(round((st_frame + i) / float(fps)))
        if str(second) not in by_second and len(box) == 4:
            x, y, w, h = (float(v) for v in box)
            by_second[str(second)] = [x, y, x + w, y + h]
    kwargs: dict[str, Any] = {"box_format": "pixel"}
    hw = rec.get("img_hw", default=None)
    if isinstance(hw, list) and len(hw) == 2:
        kwargs["image_size"] = [int(hw[1]), int(hw[0])]
    return {"span": [st_time, ed_time], "boxes": by_second}, kwargs


def load_stvg(ctx: LoadContext) -> Iterator[Sample]:
    for rec in records(ctx):
        if is_converted(rec.raw):
            yield converted_sample(ctx, rec)
            continue
        video = rec.text("_key", "video", "vid", "video_name")
        path = ctx.media.find(*under(("", "videos", "video"), with_suffixes(video)))
        sentence = rec.text("English", "caption", "sentence", "query")
        solution, kwargs = _hcstvg_tube(rec)
        question = (f'Find when and where this happens in the video: "{sentence.strip()}". '
                    "Give the time span and the box of the described person in each second.")
        yield ctx.sample(f"{Path(video).stem}-{rec.raw['_row']}", question,
                         "spatial_temporal_grounding", solution, path,
                         meta={"video": video}, reward_kwargs=kwargs)


register_benchmark(Benchmark(
    name="stvg", title="Spatio-temporal video grounding (HC-STVG style)",
    formats="JSON (HC-STVG: {video: {English, st_time, ed_time, st_frame, bbox, img_hw}}), or "
            "converted records with a {time, boxes} solution",
    problem_types=("spatial_temporal_grounding",), metric=MetricSpec("stvg"),
    precision="documented", source="HC-STVG v1/v2 (github.com/tzhhhh123/HC-STVG); "
                                   "EasyVideoR1's ST-Align subset (converted layout)",
    layout="annotation: the test annotation JSON; video_root: its video folder",
    load=load_stvg,
    notes="Boxes are compared per whole second (the official metrics are per frame): m_tIoU, "
          "m_vIoU and vIoU@0.3/0.5 with vIoU = sum of box IoU over shared seconds / seconds in "
          "either tube."))


# --------------------------------------------------------------------------- OVO-Bench

OVO_GROUPS = {"backward": ("EPM", "ASI", "HLD"),
              "realtime": ("STU", "OJR", "ATR", "ACR", "OCR", "FPD"),
              "forward": ("REC", "SSR", "CRR")}


def load_ovobench(ctx: LoadContext) -> Iterator[Sample]:
    for rec in records(ctx):
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


register_benchmark(Benchmark(
    name="ovobench", title="OVO-Bench (backward + real-time)",
    formats="JSON (ovo_bench_new.json)", problem_types=("multiple_choice",),
    metric=MetricSpec("group_mean", category="task", groups=OVO_GROUPS, breakdowns=("task",)),
    precision="documented", source="huggingface.co/datasets/JoeLeelyf/OVO-Bench",
    layout="annotation: ovo_bench_new.json; video_root: the folder holding chunked_videos/ "
           "(clips cut at each question's real-time stamp by the benchmark's script)",
    load=load_ovobench,
    notes="Backward and real-time tasks; forward active-responding tasks (REC, SSR, CRR) need "
          "streaming probes and are skipped (counted). Score = mean of the group means."))


# --------------------------------------------------------------------------- MMStar (images)


_IMAGE_MAGIC = ((b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"GIF8", ".gif"),
                (b"RIFF", ".webp"), (b"BM", ".bmp"))


def _image_bytes(value: Any) -> bytes | None:
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and len(value) > 64:
        try:
            return base64.b64decode(value, validate=False)
        except ValueError:
            return None
    return None


def _write_image(ctx: LoadContext, rec: Record, name: str) -> str:
    """The image embedded in the record, written once under ``ctx.media_out``; a record
    that names a file instead (``image_path`` or a short ``image``) is found under the root."""
    data = _image_bytes(rec.get("image", default=None))
    if data is None:
        return ctx.media.find(rec.text("image_path", "image"))
    if ctx.media_out is None:
        raise rec.fail("the image is embedded but no folder to write it to was given")
    suffix = next((s for magic, s in _IMAGE_MAGIC if data.startswith(magic)), ".png")
    ctx.media_out.mkdir(parents=True, exist_ok=True)
    target = ctx.media_out / f"{name}{suffix}"
    if not target.exists() or target.stat().st_size != len(data):
        target.write_bytes(data)
    return str(target)


_INLINE_OPTIONS = re.compile(r"\n?Options:\s*(.*)$", re.DOTALL)
_OPTION_ITEM = re.compile(r"([A-F]):\s*(.*?)(?=,\s*[A-F]:\s|$)", re.DOTALL)


def load_mmstar(ctx: LoadContext) -> Iterator[Sample]:
    for rec in records(ctx):
        index = rec.text("index", "id")
        question = rec.text("question")
        if "A" in rec.raw and "B" in rec.raw:  # VLMEvalKit TSV: options in columns A, B, ...
            options = [f"{k}. {rec.raw[k]}" for k in LETTERS[:6]
                       if rec.raw.get(k) not in (None, "")]
        else:  # HF parquet: "...\nOptions: A: x, B: y, C: z, D: w" inside the question
            m = _INLINE_OPTIONS.search(question)
            if not m:
                raise rec.fail("options are neither in columns A, B, ... nor in an 'Options:' "
                               "line of the question")
            options = [f"{k}. {v.strip()}" for k, v in _OPTION_ITEM.findall(m.group(1))]
            question = question[:m.start()].strip()
        question = re.sub(r"^Question:\s*", "", question)
        path = _write_image(ctx, rec, f"{ctx.alias}-{index}")
        meta = {"category": rec.text("category", default=""),
                "l2_category": rec.text("l2_category", "l2-category", default="")}
        yield ctx.choice(rec, index, question, options, rec.get("answer"), path, meta,
                         data_type="image")


register_benchmark(Benchmark(
    name="mmstar", title="MMStar (image benchmark for joint image-video models)",
    formats="TSV (VLMEvalKit MMStar.tsv, base64 images) or parquet (Lin-Chen/MMStar)",
    problem_types=("multiple_choice",),
    metric=MetricSpec("accuracy", breakdowns=("category", "l2_category")), precision="precise",
    source="huggingface.co/datasets/Lin-Chen/MMStar; VLMEvalKit MMStar.tsv",
    layout="annotation: MMStar.tsv or mmstar.parquet; images are embedded (written to "
           "<eval.out_dir>/prepared/media/ by --prepare)",
    load=load_mmstar,
    notes="Images use the data.image budget; the same loader reads other VLMEvalKit "
          "multiple-choice TSVs (MMBench, SEED-Bench, AI2D) with the same columns."))


# --------------------------------------------------------------------------- loading


def load_benchmark(bench: Benchmark, ctx: LoadContext, limit: int = 0) -> list[Sample]:
    """The benchmark's samples with unique ids; the first ``limit`` only when limit > 0."""
    ctx.template = bench.template
    out: list[Sample] = []
    seen: Counter = Counter()
    for sample in bench.load(ctx):
        seen[sample.id] += 1
        if seen[sample.id] > 1:  # official ids are not always unique (MVBench reuses videos)
            sample.id = f"{sample.id}-{seen[sample.id]}"
        out.append(sample)
        if limit and len(out) >= limit:
            break
    if not out:
        raise FormatError(f"{ctx.annotation}: {bench.name}: no questions found"
                          + (f" ({dict(ctx.skipped)} skipped)" if ctx.skipped else ""))
    return out
