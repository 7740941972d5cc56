"""What a benchmark entry is: its metric, its loader's context, and how its samples are loaded.

Every entry says which annotation formats it reads, which problem types its questions become,
the prompt template of its own evaluation, the metric and the sub-scores it reports, and how
well evr1 knows its format: ``precise`` (checked against the published files and the reference
evaluation code) or ``documented`` (the fields its paper / README / release describe; a file
that differs fails with a message naming the fields found). docs/eval_benchmarks.md has the table.

A loader turns the official annotation files into evr1 ``Sample``s whose ``meta`` carries what
the sub-scores group by (category, duration, ...) and whose ``path`` is the media file under the
user's video root. ``evr1.eval.prepare`` writes them as an evr1 JSONL, so the preprocess stage
caches their frames exactly as it does for training data.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evr1.data.schema import Sample
from evr1.eval.formats import FormatError, MediaResolver, Record, letter_of, strip_tags
from evr1.eval.prompts import GENERIC, Template, build_prompt

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
    files: str  # what annotation / video_root point at (a downloaded folder, a file)
    load: Loader
    template: Template = GENERIC
    notes: str = ""


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
