"""Scoring one prediction: extraction (extraction.py), then the training reward's scorer.

The score is the ``accuracy`` of ``evr1.rewards.score`` applied to the extracted answer wrapped
in answer tags, so evaluation and training judge an answer by the same code; the format part of
the reward plays no role here. Open-ended answers have no verifiable score: they are left for
the judge (status ``unjudged``, score ``None``) with a ROUGE-based reference score in
``details`` that is never reported as the benchmark's number.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from evr1.eval.extraction import extract_answer
from evr1.rewards import canonical_type, score
from evr1.rewards.grounding import BoxFrame, box_iou, solution_tube, span_iou

# Problem types whose answers need a judge to be scored as their benchmarks score them.
JUDGED_TYPES = frozenset({"open_ended"})

# Item statuses in prediction files.
OK = "ok"  # extracted and scored
UNEXTRACTED = "unextracted"  # no answer found: score 0
UNJUDGED = "unjudged"  # open-ended, waiting for (or without) a judge: score None
JUDGED = "judged"  # open-ended, scored by the judge
MEDIA_FAILED = "media_failed"  # the video/image could not be decoded (or timed out): score 0
ERROR = "error"  # generation failed for this item: score 0


@dataclass
class Scored:
    extracted: str | None
    method: str
    score: float | None
    status: str
    details: dict[str, Any] = field(default_factory=dict)


def score_response(problem_type: str, response: str, solution: Any,
                   options: Sequence[str] | None = None,
                   reward_kwargs: Mapping[str, Any] | None = None) -> Scored:
    """Extract and score one response (never raises on the response)."""
    ptype = canonical_type(problem_type)
    kwargs = dict(reward_kwargs or {})
    found = extract_answer(response, ptype, options)
    if found.answer is None:
        return Scored(None, found.method, 0.0, UNEXTRACTED, _zero_details(ptype))
    tagged = f"<answer>{found.answer}</answer>"
    result = score(ptype, tagged, solution, options=list(options) if options else None,
                   **kwargs)
    if ptype in JUDGED_TYPES:
        return Scored(found.answer, found.method, None, UNJUDGED,
                      {"reference_score": result.accuracy})
    details: dict[str, Any] = {}
    if ptype == "temporal_grounding":
        details["iou"] = result.accuracy
    elif ptype == "spatial_temporal_grounding":
        details = tube_ious(found.answer, solution, kwargs)
    return Scored(found.answer, found.method, result.accuracy, OK, details)


def _zero_details(ptype: str) -> dict[str, Any]:
    if ptype == "temporal_grounding":
        return {"iou": 0.0}
    if ptype == "spatial_temporal_grounding":
        return {"tiou": 0.0, "viou": 0.0}
    return {}


def tube_ious(answer: str, solution: Any, kwargs: Mapping[str, Any]) -> dict[str, float]:
    """tIoU of the spans and vIoU of the tubes at one-second granularity.

    vIoU = sum over seconds in both tubes of the box IoU / number of seconds in either tube,
    where a predicted tube covers the seconds of its boxes inside its span (the per-frame
    definition of HC-STVG / VidSTG, with seconds as frames).
    """
    frame = BoxFrame(kwargs.get("box_format", "normalized"), kwargs.get("image_size"))
    gold_span, gold_boxes = solution_tube(solution, frame)
    try:
        obj = json.loads(answer)
        span = (float(obj["span"][0]), float(obj["span"][1]))
        pred = _boxes(obj.get("boxes"), frame, span)
    except (ValueError, TypeError, KeyError, IndexError):
        return {"tiou": 0.0, "viou": 0.0}
    t_iou = span_iou(span, gold_span)
    union = set(gold_boxes) | set(pred)
    shared = set(gold_boxes) & set(pred)
    v_iou = sum(box_iou(pred[s], gold_boxes[s]) for s in shared) / len(union) if union else 0.0
    return {"tiou": t_iou, "viou": v_iou}


def _boxes(raw: Any, frame: BoxFrame, span: tuple[float, float]) -> dict[int, Any]:
    lo, hi = sorted(span)
    out = {}
    for key, value in (raw or {}).items():
        second = round(float(str(key).rstrip("s")))
        if lo - 0.5 <= second <= hi + 0.5 and isinstance(value, list) and len(value) == 4:
            out[second] = frame.clip(tuple(float(v) for v in value))
    return out
