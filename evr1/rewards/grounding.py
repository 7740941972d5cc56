"""Grounding types: temporal spans, boxes, and boxes over time.

Answer formats (the same shapes are accepted for solutions):
  * temporal_grounding: ``[start, end]`` in seconds; also "12.5 - 20", "from 0:12 to 0:20"
    (m:ss and h:mm:ss times are converted). The first two numbers are the span.
  * spatial_grounding: ``[x1, y1, x2, y2]``; the first bracketed list of four numbers, else the
    first four numbers (so Qwen's ``{"bbox_2d": [...], "label": ...}`` works).
    ``box_format="normalized"`` (default): coordinates are fractions of the image in [0, 1];
    ``box_format="pixel"``: absolute pixels, clipped to ``image_size=(width, height)`` if given.
  * spatial_temporal_grounding: a JSON object
    ``{"span": [s, e], "boxes": {"1": [x1, y1, x2, y2], "2": [...]}}`` whose box keys are whole
    seconds ("3", "3.0", "3s" and 3 all mean second 3). Accuracy is
    0.5 * tIoU(span) + 0.5 * mean box IoU over the seconds present in both answer and solution
    (0 for the box part when they share none).

A reversed span or box (end before start) still gets the IoU of its sorted version, but is not
well formed (format 0.5): the model should learn the order.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .base import InvalidSolution, RewardInputError, Verdict
from .numeric import numbers_in

Box = tuple[float, float, float, float]

_CLOCK = re.compile(r"(?<![\d:.])(\d{1,2}):(\d{2})(?::(\d{2}))?(\.\d+)?(?![\d:])")
_BRACKETED = re.compile(r"[\[(]([^\[\]()]{1,200})[\])]")
_SECOND_KEY = re.compile(r"\s*(\d{1,6}(?:\.\d*)?)\s*s?\s*")
MAX_JSON_CHARS = 20_000


# --------------------------------------------------------------------------- intervals


def _clock_to_seconds(m: re.Match[str]) -> str:
    a, b, c, frac = m.group(1), m.group(2), m.group(3), m.group(4) or ""
    seconds = int(a) * 3600 + int(b) * 60 + int(c) if c else int(a) * 60 + int(b)
    return f"{seconds}{frac}"


def read_span(text: str) -> tuple[float, float] | None:
    """The first two numbers (clock times converted) as (start, end), unsorted."""
    nums = numbers_in(_CLOCK.sub(_clock_to_seconds, text[:2000]))
    if len(nums) < 2:
        return None
    return nums[0][0], nums[1][0]


def span_iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    (s1, e1), (s2, e2) = sorted(a), sorted(b)
    inter = max(0.0, min(e1, e2) - max(s1, s2))
    union = (e1 - s1) + (e2 - s2) - inter
    if union <= 0:  # two instants: right only when they coincide
        return 1.0 if (s1, e1) == (s2, e2) else 0.0
    return inter / union


def solution_span(solution: Any, type_name: str = "temporal_grounding") -> tuple[float, float]:
    if isinstance(solution, Mapping):
        for keys in (("start", "end"), ("span",), ("timestamps",), ("segment",)):
            if all(k in solution for k in keys):
                value = [solution[k] for k in keys] if len(keys) == 2 else solution[keys[0]]
                return solution_span(value, type_name)
    elif isinstance(solution, (list, tuple)) and len(solution) == 2:
        try:
            s, e = float(solution[0]), float(solution[1])
            if s <= e:
                return s, e
        except (TypeError, ValueError):
            pass
    elif isinstance(solution, str):
        span = read_span(solution)
        if span is not None and span[0] <= span[1]:
            return span
    raise InvalidSolution(f"{type_name}: solution {solution!r} is not a span [start, end]")


def check_temporal(solution: Any, **_: Any) -> None:
    """Raise ``InvalidSolution`` unless ``solution`` is a span ``[start, end]`` in order."""
    solution_span(solution)


def score_temporal(answer: str, solution: Any, **_: Any) -> Verdict:
    gold = solution_span(solution)
    span = read_span(answer)
    if span is None:
        return Verdict(0.0, parsed=False)
    return Verdict(span_iou(span, gold), parsed=span[0] <= span[1],
                   extracted=f"[{span[0]:g}, {span[1]:g}]")


# --------------------------------------------------------------------------- boxes


def read_box(text: str) -> Box | None:
    """The first bracketed group of exactly four numbers, else the first four numbers."""
    text = text[:4000]
    for m in _BRACKETED.finditer(text):
        nums = numbers_in(m.group(1))
        if len(nums) == 4:
            return _box(n for n, _ in nums)
    nums = numbers_in(text)
    return _box(n for n, _ in nums[:4]) if len(nums) >= 4 else None


def _box(values: Any) -> Box:
    x1, y1, x2, y2 = (float(v) for v in values)
    return x1, y1, x2, y2


class BoxFrame:
    """The coordinate frame boxes are given in: normalised [0, 1] or pixels."""

    def __init__(self, box_format: str = "normalized", image_size: Any = None) -> None:
        if box_format not in ("normalized", "pixel"):
            raise RewardInputError(
                f"box_format must be 'normalized' or 'pixel', got {box_format!r}")
        self.name = box_format
        self.limit: tuple[float, float] | None = (1.0, 1.0)
        if box_format == "pixel":
            self.limit = None
            if image_size is not None:
                try:
                    w, h = (float(v) for v in image_size)
                except (TypeError, ValueError):
                    raise RewardInputError(f"image_size must be (width, height), got {image_size!r}"
                                     ) from None
                self.limit = (w, h)

    def inside(self, box: Box) -> bool:
        x1, y1, x2, y2 = box
        if min(box) < 0:
            return False
        return self.limit is None or (max(x1, x2) <= self.limit[0]
                                      and max(y1, y2) <= self.limit[1])

    def clip(self, box: Box) -> Box:
        x1, x2 = sorted((box[0], box[2]))
        y1, y2 = sorted((box[1], box[3]))
        w, h = self.limit if self.limit is not None else (float("inf"), float("inf"))
        return (min(max(x1, 0.0), w), min(max(y1, 0.0), h),
                min(max(x2, 0.0), w), min(max(y2, 0.0), h))


def box_iou(a: Box, b: Box) -> float:
    """IoU of two boxes already sorted and clipped."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    if union <= 0:
        return 1.0 if a == b else 0.0
    return inter / union


def _well_ordered(box: Box) -> bool:
    return box[0] <= box[2] and box[1] <= box[3]


def solution_box(solution: Any, frame: BoxFrame, type_name: str = "spatial_grounding") -> Box:
    box: Box | None = None
    if isinstance(solution, Mapping):
        for key in ("bbox_2d", "bbox", "box"):
            if key in solution:
                return solution_box(solution[key], frame, type_name)
    elif isinstance(solution, Sequence) and not isinstance(solution, str) and len(solution) == 4:
        try:
            box = _box(solution)
        except (TypeError, ValueError):
            box = None
    elif isinstance(solution, str):
        box = read_box(solution)
    if box is None or not _well_ordered(box) or not frame.inside(box):
        raise InvalidSolution(f"{type_name}: solution {solution!r:.200} is not a box "
                              f"[x1, y1, x2, y2] in box_format={frame.name!r}")
    return frame.clip(box)


def check_spatial(solution: Any, *, box_format: str = "normalized", image_size: Any = None,
                  **_: Any) -> None:
    """Raise unless ``solution`` is a box inside the declared frame (and the frame is valid)."""
    solution_box(solution, BoxFrame(box_format, image_size))


def score_spatial(answer: str, solution: Any, *, box_format: str = "normalized",
                  image_size: Any = None, **_: Any) -> Verdict:
    frame = BoxFrame(box_format, image_size)
    gold = solution_box(solution, frame)
    box = read_box(answer)
    if box is None:
        return Verdict(0.0, parsed=False)
    return Verdict(box_iou(frame.clip(box), gold),
                   parsed=_well_ordered(box) and frame.inside(box),
                   extracted="[" + ", ".join(f"{v:g}" for v in box) + "]")


# --------------------------------------------------------------------------- boxes over time


def _json_object(text: str) -> Any:
    """The outermost {...} of ``text`` as JSON (code fences and prose around it ignored)."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start or end - start > MAX_JSON_CHARS:
        return None
    try:
        return json.loads(text[start:end + 1])
    except (ValueError, RecursionError):
        return None


def _second(key: Any) -> int | None:
    if isinstance(key, (int, float)) and not isinstance(key, bool):
        return round(key)
    m = _SECOND_KEY.fullmatch(str(key)[:20])
    return round(float(m.group(1))) if m else None


def _boxes_by_second(raw: Any, frame: BoxFrame) -> tuple[dict[int, Box], bool]:
    """Per-second boxes (clipped) and whether every entry was a proper box."""
    if not isinstance(raw, Mapping):
        return {}, False
    boxes, proper = {}, True
    for key, value in list(raw.items())[:10_000]:
        second = _second(key)
        box = None
        if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 4:
            try:
                box = _box(value)
            except (TypeError, ValueError):
                box = None
        if second is None or box is None:
            proper = False
            continue
        proper = proper and _well_ordered(box) and frame.inside(box)
        boxes[second] = frame.clip(box)
    return boxes, proper


def _span_of(raw: Any) -> tuple[float, float] | None:
    if isinstance(raw, Sequence) and not isinstance(raw, str) and len(raw) == 2:
        try:
            return float(raw[0]), float(raw[1])
        except (TypeError, ValueError):
            return None
    return None


def solution_tube(solution: Any, frame: BoxFrame) -> tuple[tuple[float, float], dict[int, Box]]:
    name = "spatial_temporal_grounding"
    if isinstance(solution, str):
        solution = _json_object(solution)
    if isinstance(solution, Mapping) and "span" in solution and "boxes" in solution:
        span = solution_span(solution["span"], name)
        boxes, proper = _boxes_by_second(solution["boxes"], frame)
        if proper and boxes:
            return span, boxes
    raise InvalidSolution(f"{name}: solution must be {{\"span\": [s, e], \"boxes\": "
                          f"{{\"<second>\": [x1, y1, x2, y2], ...}}}}, got {solution!r:.200}")


def check_spatial_temporal(solution: Any, *, box_format: str = "normalized",
                           image_size: Any = None, **_: Any) -> None:
    """Raise unless ``solution`` is ``{"span": [s, e], "boxes": {second: box}}`` in the frame."""
    solution_tube(solution, BoxFrame(box_format, image_size))


def score_spatial_temporal(answer: str, solution: Any, *, box_format: str = "normalized",
                           image_size: Any = None, **_: Any) -> Verdict:
    frame = BoxFrame(box_format, image_size)
    gold_span, gold_boxes = solution_tube(solution, frame)
    obj = _json_object(answer)
    if not isinstance(obj, Mapping):
        return Verdict(0.0, parsed=False)
    span = _span_of(obj.get("span"))
    boxes, proper = _boxes_by_second(obj.get("boxes"), frame)
    t_iou = span_iou(span, gold_span) if span is not None else 0.0
    shared = sorted(set(boxes) & set(gold_boxes))
    mean_iou = sum(box_iou(boxes[s], gold_boxes[s]) for s in shared) / len(shared) if shared else 0
    parsed = span is not None and span[0] <= span[1] and proper and bool(boxes)
    extracted = f"span={span} boxes={len(boxes)}" if span is not None else f"boxes={len(boxes)}"
    return Verdict(0.5 * t_iou + 0.5 * mean_iou, parsed=parsed, extracted=extracted)
