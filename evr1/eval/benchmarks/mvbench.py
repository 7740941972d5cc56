"""MVBench: one JSON file per task, videos from a dozen source datasets."""

from __future__ import annotations

from collections.abc import Iterator

from evr1.data.schema import Sample
from evr1.eval.benchmarks.base import Benchmark, LoadContext, MetricSpec
from evr1.eval.benchmarks.common import converted_sample, file_stem, is_converted, records
from evr1.eval.formats import lettered, under
from evr1.eval.prompts import Template

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


# The hub's release: json/<task>.json beside video/ (the task files alone when pointed at json/).
MVBENCH_LAYOUTS = (("json/*.json",), ("*.json",))


def load_mvbench(ctx: LoadContext) -> Iterator[Sample]:
    for rec in records(ctx, MVBENCH_LAYOUTS):
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


MVBENCH = Benchmark(
    name="mvbench", title="MVBench", formats="JSON, one file per task (json/<task>.json)",
    problem_types=("multiple_choice",),
    metric=MetricSpec("category_mean", category="task", breakdowns=("task",)),
    precision="precise", source="huggingface.co/datasets/OpenGVLab/MVBench",
    files="annotation: the downloaded dataset folder (holding json/ and video/), the json/ "
           "folder or one task file; video_root: the dataset folder or its video/ folder "
           "(holding star/, clevrer/, perception/, ...)",
    load=load_mvbench, template=MVBENCH_TEMPLATE,
    notes="Whole videos are used: the start/end bounds of the STAR/STA tasks are kept in meta "
          "but not applied (use lmms-eval's pre-cut *_segment folders for exact clips). "
          "episodic_reasoning ships frame folders, which the decoders do not read: those items "
          "are counted as failed media.")


ENTRIES = (MVBENCH,)
