"""Benchmark metrics from prediction rows, as each benchmark defines its reported numbers.

Every item counts. Unextracted answers, media that failed to decode and items whose
generation failed score 0 and stay in every denominator; only open-ended items still waiting
for a judge (score ``None``) are left out of the scores, and their number is reported next to
them. All scores are percentages (0-100), like the published ones.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from evr1.eval.benchmarks import MetricSpec
from evr1.eval.scoring import ERROR, MEDIA_FAILED, UNEXTRACTED, UNJUDGED


def _mean(values: Sequence[float]) -> float | None:
    return 100.0 * sum(values) / len(values) if values else None


def _scored(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in rows if r.get("score") is not None]


def _values(row: Mapping[str, Any], key: str) -> list[str]:
    """The category values of a row (a list means several categories: LVBench)."""
    if key == "problem_type":
        value: Any = row.get("problem_type")
    else:
        value = (row.get("meta") or {}).get(key)
    if value is None or value == "":
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def accuracy_by(rows: Sequence[Mapping[str, Any]], key: str) -> dict[str, float]:
    """Mean score per category value (items without a score are left out)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for row in _scored(rows):
        for value in _values(row, key):
            groups[value].append(float(row["score"]))
    return {k: round(_mean(v), 4) for k, v in sorted(groups.items())}  # type: ignore[arg-type]


def counts(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    status = Counter(str(r.get("status")) for r in rows)
    return {"n": len(rows), "n_scored": len(_scored(rows)),
            "n_unextracted": status[UNEXTRACTED], "n_media_failed": status[MEDIA_FAILED],
            "n_error": status[ERROR], "n_unjudged": status[UNJUDGED]}


# --------------------------------------------------------------------------- metric kinds


def _category_means(rows: Sequence[Mapping[str, Any]], spec: MetricSpec) -> dict[str, float]:
    per = accuracy_by(rows, spec.category)
    for merged, parts in spec.merge.items():
        present = [per.pop(p) for p in parts if p in per]
        if present:
            per[merged] = round(sum(present) / len(present), 4)
    return per


def _main_rows(rows: Sequence[Mapping[str, Any]], spec: MetricSpec) -> list[Mapping[str, Any]]:
    if not spec.main_types:
        return list(rows)
    return [r for r in rows if r.get("problem_type") in spec.main_types]


def accuracy_metric(rows, spec: MetricSpec) -> tuple[float | None, dict[str, Any]]:
    scored = _scored(_main_rows(rows, spec))
    return _mean([float(r["score"]) for r in scored]), {}


def category_mean_metric(rows, spec: MetricSpec) -> tuple[float | None, dict[str, Any]]:
    per = _category_means(_main_rows(rows, spec), spec)
    main = sum(per.values()) / len(per) if per else None
    return main, {f"{spec.category} (mean over {len(per)})": per}


def group_mean_metric(rows, spec: MetricSpec) -> tuple[float | None, dict[str, Any]]:
    per = _category_means(_main_rows(rows, spec), spec)
    groups = {}
    for group, members in spec.groups.items():
        present = [per[m] for m in members if m in per]
        if present:
            groups[group] = round(sum(present) / len(present), 4)
    main = sum(groups.values()) / len(groups) if groups else None
    return main, {"groups": groups, spec.category: per}


def grounding_metric(rows, spec: MetricSpec) -> tuple[float | None, dict[str, Any]]:
    ious = [float((r.get("details") or {}).get("iou", 0.0)) for r in rows]
    if not ious:
        return None, {}
    extra = {f"R@{t:g}": round(_mean([float(i >= t) for i in ious]), 4)  # type: ignore[arg-type]
             for t in spec.thresholds}
    extra["mIoU"] = round(_mean(ious), 4)  # type: ignore[arg-type]
    return extra["mIoU"], {"grounding": extra}


def stvg_metric(rows, spec: MetricSpec) -> tuple[float | None, dict[str, Any]]:
    details = [r.get("details") or {} for r in rows]
    if not details:
        return None, {}
    tiou = [float(d.get("tiou", 0.0)) for d in details]
    viou = [float(d.get("viou", 0.0)) for d in details]
    extra = {"m_tIoU": round(_mean(tiou), 4), "m_vIoU": round(_mean(viou), 4)}  # type: ignore
    for t in spec.thresholds[:2]:
        extra[f"vIoU@{t:g}"] = round(_mean([float(v >= t) for v in viou]), 4)  # type: ignore
    return extra["m_vIoU"], {"stvg": extra}


METRICS = {"accuracy": accuracy_metric, "category_mean": category_mean_metric,
           "group_mean": group_mean_metric, "grounding": grounding_metric, "stvg": stvg_metric}
METRIC_NAMES = {"accuracy": "accuracy", "category_mean": "mean over categories",
                "group_mean": "mean over groups", "grounding": "mIoU", "stvg": "m_vIoU"}


def summarize(rows: Sequence[Mapping[str, Any]], spec: MetricSpec) -> dict[str, Any]:
    """The benchmark's main score, its sub-scores and the item counts."""
    main, extra = METRICS[spec.kind](rows, spec)
    sub_scores: dict[str, Any] = dict(extra)
    for key in spec.breakdowns:
        by = accuracy_by(rows, key)
        if by:
            sub_scores.setdefault(key, by)
    types = {r.get("problem_type") for r in rows}
    if len(types) > 1:
        sub_scores["problem_type"] = accuracy_by(rows, "problem_type")
    methods = Counter(str(r.get("method")) for r in rows if r.get("method"))
    return {"metric": METRIC_NAMES[spec.kind],
            "score": None if main is None else round(main, 4),
            "sub_scores": sub_scores, "extraction": dict(sorted(methods.items())),
            **counts(rows)}
