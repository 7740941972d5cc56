"""Helpers every loader shares: reading records from a download folder's published layout,
and the "converted" layout.

Loaders also accept the "converted" layout that EasyVideoR1 ships for these benchmarks (records
with ``problem``, ``problem_type``, ``options``, ``solution``, ``path``), since many users have
those files already.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from evr1.data.schema import Sample
from evr1.eval.benchmarks.base import LoadContext
from evr1.eval.formats import (
    TABLES_HERE,
    Layouts,
    Record,
    as_options,
    config_name,
    find_annotation_files,
    read_records,
    strip_tags,
)

# Where a benchmark without a layout of its own keeps its files: the folder itself, else the
# Hugging Face default config (data/<split>-*.parquet).
DEFAULT_LAYOUTS: Layouts = (TABLES_HERE, ("data/test-*.parquet", "data/validation-*.parquet"))


def records(ctx: LoadContext, layouts: Layouts = DEFAULT_LAYOUTS) -> Iterator[Record]:
    """Every record of the annotation file, or of the files of the folder's published layout."""
    for file in find_annotation_files(ctx.annotation, layouts):
        for raw in read_records(file):
            yield Record(raw, ctx.name)


def file_stem(rec: Record) -> str:
    return Path(str(rec.raw.get("_file", ""))).stem


def file_config(rec: Record) -> str:
    """The task / track a record's file stands for (its HF config folder, else its stem)."""
    return config_name(Path(str(rec.raw.get("_file", ""))))


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


