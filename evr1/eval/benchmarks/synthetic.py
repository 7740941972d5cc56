"""evr1's own sample JSONL (the synthetic held-out set) as a benchmark."""

from __future__ import annotations

from collections.abc import Iterator

from evr1.data.schema import Sample, load_samples
from evr1.eval.benchmarks.base import Benchmark, LoadContext, MetricSpec

# --------------------------------------------------------------------------- synthetic / evr1


def load_synthetic(ctx: LoadContext) -> Iterator[Sample]:
    """An evr1 sample JSONL (the synthetic held-out set): ids and prompts kept as they are,
    so frames already cached for training are found under the same ids."""
    root = ctx.media.root if str(ctx.media.root) not in ("", ".") else None
    for sample in load_samples(ctx.annotation, media_root=root, check_media=False):
        sample.meta.setdefault("task", str(sample.meta.get("task") or sample.problem_type))
        yield sample


SYNTHETIC = Benchmark(
    name="synthetic", title="evr1 synthetic held-out set (any evr1 JSONL)",
    formats="evr1 sample JSONL", problem_types=("multiple_choice", "numerical", "boolean",
                                                "temporal_grounding", "spatial_grounding"),
    metric=MetricSpec("accuracy", breakdowns=("task",)), precision="precise",
    source="tools/make_synthetic.py (heldout.jsonl)",
    files="annotation: the JSONL (default data.eval_jsonl); video_root: data.media_root",
    load=load_synthetic)


ENTRIES = (SYNTHETIC,)
