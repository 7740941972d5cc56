"""VSI-Bench: spatial questions on indoor scans, multiple choice and numbers (MRA).

The numeric questions are scored by the ``vsibench_mra`` reward type, a built-in of
``evr1.rewards`` (registered there, not by importing this module).
"""

from __future__ import annotations

from collections.abc import Iterator

from evr1.data.schema import Sample
from evr1.eval.benchmarks.base import Benchmark, LoadContext, MetricSpec
from evr1.eval.benchmarks.common import converted_sample, is_converted, records
from evr1.eval.formats import as_options, under, with_suffixes
from evr1.eval.prompts import Template, build_prompt

# --------------------------------------------------------------------------- VSI-Bench

VSI_CHOICE_TYPES = ("object_rel_direction_easy", "object_rel_direction_medium",
                    "object_rel_direction_hard", "object_rel_distance", "route_planning",
                    "obj_appearance_order")
VSI_NUMBER_TYPES = ("object_abs_distance", "object_counting", "object_size_estimation",
                    "room_size_estimation")
VSI_TEMPLATE = Template(pre="These are frames of a video.\n", options_header="Options:",
                        post_other="Please answer the question using a single word or phrase.")


# The hub's release: test-00000-of-00001.parquet beside arkitscenes/, scannet/, scannetpp/
# (other splits there, such as a debiased subset, are not read from the folder).
VSIBENCH_LAYOUTS = (("test-*.parquet",), ("data/test-*.parquet",),
                    ("*.parquet", "*.json", "*.jsonl"))


def load_vsibench(ctx: LoadContext) -> Iterator[Sample]:
    for rec in records(ctx, VSIBENCH_LAYOUTS):
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


VSIBENCH = Benchmark(
    name="vsibench", title="VSI-Bench", formats="parquet (test-*.parquet), JSON/JSONL",
    problem_types=("multiple_choice", "vsibench_mra"),
    metric=MetricSpec("category_mean", category="question_type",
                      merge={"object_rel_direction": ("object_rel_direction_easy",
                                                      "object_rel_direction_medium",
                                                      "object_rel_direction_hard")},
                      breakdowns=("question_type", "dataset")),
    precision="precise", source="huggingface.co/datasets/nyu-visionx/VSI-Bench",
    files="annotation: the downloaded dataset folder or test-00000-of-00001.parquet; "
           "video_root: the folder holding arkitscenes/, scannet/, scannetpp/ (default: the "
           "annotation folder)",
    load=load_vsibench, template=VSI_TEMPLATE,
    notes="Multiple-choice types: exact letter; numeric types: MRA over thresholds "
          "0.50..0.95 (<= as in the official code); overall = mean over the question types "
          "with the three relative-direction levels averaged into one.")


ENTRIES = (VSIBENCH,)
