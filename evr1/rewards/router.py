"""The registry of problem types, ``score`` for one response and ``score_batch`` for many.

A problem type is a function ``fn(answer, solution, **kwargs) -> Verdict | float`` where
``answer`` is the text found by ``evr1.rewards.format.find_answer``. It may raise
``InvalidSolution`` / ``RewardInputError`` for a bad sample; any other exception is a bug in
the scorer, logged once and scored 0, because a model output must never stop training.

A type may also register ``check(solution, **kwargs)``, which raises the same errors for a
sample whose solution or options its scorer could not use, without any answer:
``check_solution`` runs it, so datasets are checked when they are loaded
(``evr1.data.schema``) instead of at the training step that first draws the bad sample.
Each built-in check lives beside its scorer, in the module that reads that solution.
"""

from __future__ import annotations

import atexit
import inspect
import logging
import math
import multiprocessing
import pickle
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from evr1.config import RewardConfig

from . import choice, code, grounding, numeric, preference, text
from . import math as math_type
from .base import RewardInputError, RewardResult, UnknownProblemType, Verdict, clamp01, short
from .format import as_text, find_answer, format_score
from .sandbox import SandboxLimits, SandboxUnavailable

logger = logging.getLogger(__name__)

ScoreFn = Callable[..., "Verdict | float"]
CheckFn = Callable[..., None]  # check(solution, **type options): raises for a bad sample


@dataclass(frozen=True)
class _Entry:
    name: str
    fn: ScoreFn
    aliases: tuple[str, ...]
    accepted: frozenset[str] | None  # keyword names fn takes; None when it takes **kwargs
    builtin: bool
    check: CheckFn | None = None  # None: the type's solutions are not checked before scoring


_TYPES: dict[str, _Entry] = {}
_ALIASES: dict[str, str] = {}  # normalised alias (and name) -> canonical name
_NORM = re.compile(r"[\s\-/]+")


def _normalise(name: str) -> str:
    return _NORM.sub("_", name.strip().lower())


def _accepted_keywords(fn: ScoreFn) -> frozenset[str] | None:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params
                     if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))


def register(name: str, fn: ScoreFn, aliases: Iterable[str] = (), *, replace: bool = False,
             check: CheckFn | None = None, _builtin: bool = False) -> None:
    """Add problem type ``name`` scored by ``fn(answer, solution, **kwargs)``.

    ``fn`` returns a ``Verdict`` (accuracy, whether the answer parsed as the type expects, what
    was extracted) or just an accuracy float (then "parsed" means "non-empty"). Keyword
    arguments ``fn`` does not declare are not passed to it. Use a module-level function if
    ``score_batch`` should run it in worker processes. ``check(solution, **kwargs)``, when
    given, raises ``InvalidSolution`` / ``RewardInputError`` for a sample ``fn`` could not
    score (see ``check_solution``).
    """
    if not callable(fn):
        raise TypeError(f"scorer for problem type {name!r} must be callable")
    if check is not None and not callable(check):
        raise TypeError(f"solution check for problem type {name!r} must be callable")
    canonical = _normalise(name)
    names = [canonical, *(_normalise(a) for a in aliases)]
    for n in names:
        owner = _ALIASES.get(n)
        if owner is not None and owner != canonical and not replace:
            raise ValueError(f"problem type name {n!r} is already used by {owner!r}")
    if canonical in _TYPES and not replace:
        raise ValueError(f"problem type {canonical!r} is already registered "
                         "(pass replace=True to override)")
    _TYPES[canonical] = _Entry(canonical, fn, tuple(names[1:]), _accepted_keywords(fn), _builtin,
                               check)
    for n in names:
        _ALIASES[n] = canonical


def problem_types() -> tuple[str, ...]:
    """Canonical names of every registered type, built-in ones first."""
    return tuple(_TYPES)


def canonical_type(problem_type: str, fallback_type: str | None = None) -> str:
    """The canonical name for ``problem_type`` (aliases, case, spaces, dashes, slashes folded).

    An unknown type maps to ``fallback_type`` when one is given, else raises
    ``UnknownProblemType`` naming the known types.
    """
    found = _ALIASES.get(_normalise(str(problem_type)))
    if found is not None:
        return found
    if fallback_type:
        fallback = _ALIASES.get(_normalise(fallback_type))
        if fallback is None:
            raise UnknownProblemType(f"fallback problem type {fallback_type!r} is unknown; "
                                     f"known types: {', '.join(_TYPES)}")
        return fallback
    raise UnknownProblemType(f"unknown problem type {problem_type!r}; known types: "
                             f"{', '.join(_TYPES)} (or set a fallback_type)")


def check_solution(problem_type: str, solution: Any, *, fallback_type: str = "",
                   **kwargs: Any) -> str:
    """Check that a sample can be scored: its type is known (or ``fallback_type`` names one)
    and its solution and type options (``options``, ``box_format``...) are what that type
    reads. Returns the canonical type name.

    Raises ``UnknownProblemType``, ``InvalidSolution`` (the solution) or ``RewardInputError``
    (an option). No answer is scored and nothing runs (no math worker, no sandbox). Types
    registered without a ``check`` have only their name checked. Keyword arguments are passed
    as ``score`` passes them: only those the check declares.
    """
    name = canonical_type(problem_type, fallback_type or None)
    check = _TYPES[name].check
    if check is not None:
        accepted = _accepted_keywords(check)
        if accepted is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        check(solution, **kwargs)
    return name


# --------------------------------------------------------------------------- one response


@dataclass(frozen=True)
class _Settings:
    """What ``score`` takes from a config or keywords, checked once."""

    accuracy_weight: float = 0.9
    format_weight: float = 0.1
    fallback_type: str = ""
    # timeout_s, code_execution and sandbox (the code box's limits)
    type_kwargs: Mapping[str, Any] = field(default_factory=dict)


def _settings(cfg: RewardConfig | None, accuracy_weight: float | None,
              format_weight: float | None, fallback_type: str | None) -> _Settings:
    base = cfg or RewardConfig()
    aw = base.accuracy_weight if accuracy_weight is None else accuracy_weight
    fw = base.format_weight if format_weight is None else format_weight
    # The same rule as RewardConfig.validate, also for weights passed as keywords.
    RewardConfig(accuracy_weight=aw, format_weight=fw).validate()
    if not (isinstance(base.timeout_s, (int, float)) and base.timeout_s > 0):
        raise RewardInputError(f"reward timeout_s must be > 0, got {base.timeout_s!r}")
    sandbox = SandboxLimits(wall_s=float(base.timeout_s), memory_mb=base.sandbox_memory_mb,
                            max_processes=base.sandbox_max_processes,
                            limits=base.sandbox_limits, python=base.sandbox_python)
    return _Settings(float(aw), float(fw), base.fallback_type if fallback_type is None
                     else fallback_type,
                     {"timeout_s": float(base.timeout_s), "code_execution": base.code_execution,
                      "sandbox": sandbox})


_DEFAULT_SETTINGS = _settings(None, None, None, None)
_REPORTED: set[tuple[str, str]] = set()


def score(problem_type: str, response: Any, solution: Any, *, cfg: RewardConfig | None = None,
          accuracy_weight: float | None = None, format_weight: float | None = None,
          fallback_type: str | None = None, **kwargs: Any) -> RewardResult:
    """Score one model response against a solution; see docs/rewards.md.

    ``kwargs`` carry type options (``options``, ``abs_tol``, ``box_format``, ``tests``...);
    unknown ones are ignored, so a sample's meta can be passed through as is. Weights and
    ``fallback_type`` come from the keywords, else ``cfg``, else the defaults (0.9 / 0.1).
    """
    if cfg is None and accuracy_weight is None and format_weight is None:
        settings = _DEFAULT_SETTINGS
        if fallback_type is not None:
            settings = _Settings(settings.accuracy_weight, settings.format_weight,
                                 fallback_type, settings.type_kwargs)
    else:
        settings = _settings(cfg, accuracy_weight, format_weight, fallback_type)
    name = canonical_type(problem_type, settings.fallback_type)
    return _score_resolved(name, response, solution, kwargs, settings)


def _score_resolved(name: str, response: Any, solution: Any, kwargs: Mapping[str, Any],
                    settings: _Settings) -> RewardResult:
    entry = _TYPES[name]
    call_kwargs = {**settings.type_kwargs, **kwargs}
    _check_timeout(call_kwargs)
    if entry.accepted is not None:
        call_kwargs = {k: v for k, v in call_kwargs.items() if k in entry.accepted}
    span = find_answer(as_text(response))
    try:
        verdict = _as_verdict(entry.fn(span.text, solution, **call_kwargs), span.text)
    except (RewardInputError, SandboxUnavailable):  # the sample's or the machine's fault
        raise
    except Exception as exc:  # a scorer bug must not stop training: log it, score 0
        key = (name, type(exc).__name__)
        if key not in _REPORTED:
            _REPORTED.add(key)
            logger.exception("reward scorer %r raised %s; such answers score 0", name, key[1])
        verdict = Verdict(0.0, parsed=False)
    fmt = format_score(span, verdict.parsed)
    overall = settings.accuracy_weight * verdict.accuracy + settings.format_weight * fmt
    return RewardResult(clamp01(overall), verdict.accuracy, fmt, short(verdict.extracted))


def check_items(items: Sequence[Mapping[str, Any]], cfg: RewardConfig | None = None,
                names: Sequence[str] | None = None) -> None:
    """Before training: raise now for what would otherwise stop the run at some step N.

    Items are ``score_batch`` items without a response (``problem_type``, ``solution``,
    options). Checks every type is known and, for ``code`` samples scored by execution, that
    their tests can be checked (``InvalidSolution`` names the item) and that the sandbox runs
    here (``SandboxUnavailable`` says what to install or configure). Errors name the item
    by ``names[i]`` (e.g. the sample id), else by its index.
    """
    cfg = cfg or RewardConfig()
    cfg.validate()
    settings = _settings(cfg, None, None, None)
    for i, item in enumerate(items):
        _, name, _, solution, kwargs = _job(i, item, settings.fallback_type)
        if name == "code":
            try:
                code.check_code_sample(solution, **{**settings.type_kwargs, **kwargs})
            except RewardInputError as exc:
                where = f"sample {names[i]}" if names else f"reward item {i}"
                raise type(exc)(f"{where}: {exc}") from exc


def _check_timeout(kwargs: dict[str, Any]) -> None:
    value = kwargs.get("timeout_s")
    try:
        ok = float(value) > 0 and math.isfinite(float(value))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise RewardInputError(f"timeout_s must be a positive number, got {value!r}")
    kwargs["timeout_s"] = float(value)


def _as_verdict(value: Any, answer: str) -> Verdict:
    if isinstance(value, Verdict):
        extracted = value.extracted if isinstance(value.extracted, str) or \
            value.extracted is None else str(value.extracted)
        return Verdict(clamp01(value.accuracy), bool(value.parsed), extracted)
    if isinstance(value, (int, float)):
        return Verdict(clamp01(value), parsed=bool(answer.strip()))
    raise TypeError(f"a scorer returned {type(value).__name__}, not a Verdict or float")


# --------------------------------------------------------------------------- many responses


@dataclass(frozen=True)
class BatchResult:
    """Results in input order, plus where the time went."""

    results: list[RewardResult]
    seconds_by_type: dict[str, float]  # scoring time summed over items, in whichever process
    count_by_type: dict[str, int]
    wall_s: float

    def samples_per_s(self) -> dict[str, float]:
        return {t: self.count_by_type[t] / s if s > 0 else math.inf
                for t, s in self.seconds_by_type.items()}


# One work item as it travels to a worker: index, type, response, solution, kwargs.
_Job = tuple[int, str, Any, Any, dict[str, Any]]
_RESERVED = frozenset({"problem_type", "response", "solution", "meta"})


def _job(index: int, item: Mapping[str, Any], fallback: str) -> _Job:
    if not isinstance(item, Mapping) or "problem_type" not in item:
        raise RewardInputError(f"batch item {index} must be a mapping with problem_type, "
                               "response and solution")
    meta = item.get("meta")
    kwargs = dict(meta) if isinstance(meta, Mapping) else {}
    kwargs.update((k, v) for k, v in item.items() if k not in _RESERVED)
    name = canonical_type(item["problem_type"], fallback)
    return index, name, item.get("response"), item.get("solution"), kwargs


def _score_jobs(jobs: Sequence[_Job], settings: _Settings
                ) -> tuple[list[tuple[int, float, float, float, str | None]], dict[str, float]]:
    """Score jobs here; plain tuples travel back from workers cheaper than dataclasses."""
    out, seconds = [], {}
    for index, name, response, solution, kwargs in jobs:
        t0 = time.perf_counter()
        r = _score_resolved(name, response, solution, kwargs, settings)
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
        out.append((index, r.overall, r.accuracy, r.format, r.extracted))
    return out, seconds


def score_batch(items: Sequence[Mapping[str, Any]], cfg: RewardConfig | None = None
                ) -> BatchResult:
    """Score a rollout batch; each item holds problem_type, response, solution, any options.

    A ``meta`` mapping in an item is merged into its options. Every item's type is checked
    before any work. With ``cfg.num_workers > 0`` chunks are scored in a pool of spawned
    processes (kept for later calls); types whose scorer cannot be pickled (a lambda) are
    scored in this process.
    """
    t0 = time.perf_counter()
    cfg = cfg or RewardConfig()
    cfg.validate()
    settings = _settings(cfg, None, None, None)
    jobs = [_job(i, item, settings.fallback_type) for i, item in enumerate(items)]
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job[1]] = counts.get(job[1], 0) + 1
    if cfg.num_workers > 0 and len(jobs) > 1:
        rows, seconds = _score_in_pool(jobs, settings, cfg.num_workers)
    else:
        rows, seconds = _score_jobs(jobs, settings)
    results: list[RewardResult | None] = [None] * len(jobs)
    for index, overall, accuracy, fmt, extracted in rows:
        results[index] = RewardResult(overall, accuracy, fmt, extracted)
    return BatchResult(results, seconds, counts, time.perf_counter() - t0)  # type: ignore[arg-type]


def _shippable(obj: Any) -> bool:
    try:
        pickle.dumps(obj)
        return True
    except Exception:
        return False


def _user_registrations() -> tuple[list[tuple[str, ScoreFn, tuple[str, ...]]],
                                   list[tuple[str, Any]], set[str]]:
    """User types and judges that can travel to workers, and the types that cannot."""
    types, local = [], set()
    for entry in _TYPES.values():
        if entry.builtin:
            continue
        if _shippable(entry.fn):
            types.append((entry.name, entry.fn, entry.aliases))
        else:
            local.add(entry.name)
    judges = [(n, fn) for n, fn in preference.judges().items() if _shippable(fn)]
    return types, judges, local


def _init_worker(types: list[tuple[str, ScoreFn, tuple[str, ...]]],
                 judges: list[tuple[str, Any]]) -> None:
    for name, fn, aliases in types:
        register(name, fn, aliases, replace=True)
    for name, fn in judges:
        preference.register_judge(name, fn)
    math_type.math_worker().prestart()  # its ~1 s start-up overlaps the pool's own


_pool: tuple[Any, ProcessPoolExecutor] | None = None


def _get_pool(num_workers: int) -> tuple[ProcessPoolExecutor, set[str]]:
    global _pool
    types, judges, local = _user_registrations()
    key = (num_workers, [(n, id(f)) for n, f, _ in types], [(n, id(f)) for n, f in judges])
    if _pool is None or _pool[0] != key:
        shutdown_pool()
        # spawn, not fork: the caller is often a trainer with threads and CUDA state.
        executor = ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context(
            "spawn"), initializer=_init_worker, initargs=(types, judges))
        _pool = (key, executor)
    return _pool[1], local


def shutdown_pool() -> None:
    """Stop the batch-scoring worker processes (they are otherwise kept between calls)."""
    global _pool
    if _pool is not None:
        _pool[1].shutdown(wait=True, cancel_futures=True)
        _pool = None


atexit.register(shutdown_pool)


def _score_in_pool(jobs: list[_Job], settings: _Settings, num_workers: int
                   ) -> tuple[list[tuple[int, float, float, float, str | None]],
                              dict[str, float]]:
    pool, local = _get_pool(num_workers)
    remote = [j for j in jobs if j[1] not in local]
    # A few chunks per worker: enough to balance slow types, few enough to keep IPC small.
    size = max(1, math.ceil(len(remote) / (num_workers * 4)))
    futures = [pool.submit(_score_jobs, remote[i:i + size], settings)
               for i in range(0, len(remote), size)]
    rows, seconds = _score_jobs([j for j in jobs if j[1] in local], settings)
    for future in futures:
        part_rows, part_seconds = future.result()
        rows.extend(part_rows)
        for name, s in part_seconds.items():
            seconds[name] = seconds.get(name, 0.0) + s
    return rows, seconds


# --------------------------------------------------------------------------- built-in types

# name, scorer, solution check, aliases
_BUILTINS: list[tuple[str, ScoreFn, CheckFn, tuple[str, ...]]] = [
    ("multiple_choice", choice.score_multiple_choice, choice.check_multiple_choice,
     ("multiple choice", "multiple-choice", "mcq", "mc", "choice", "multi_choice",
      "single_choice")),
    ("numerical", numeric.score_numerical, numeric.check_numerical,
     ("numeric", "number", "counting")),
    ("regression", numeric.score_regression, numeric.check_regression,
     ("mra", "mean_relative_accuracy")),
    ("temporal_grounding", grounding.score_temporal, grounding.check_temporal,
     ("temporal grounding", "tg", "temporal_localization", "tvg")),
    ("spatial_grounding", grounding.score_spatial, grounding.check_spatial,
     ("spatial grounding", "bbox", "box", "referring_grounding")),
    ("spatial_temporal_grounding", grounding.score_spatial_temporal,
     grounding.check_spatial_temporal,
     ("spatial-temporal grounding", "spatiotemporal_grounding", "spatio_temporal_grounding",
      "stg")),
    ("open_ended", text.score_open_ended, text.check_open_ended,
     ("open-ended", "free-form", "free_form", "freeform", "open", "short_answer")),
    ("math", math_type.score_math, math_type.check_math, ("mathematics", "symbolic")),
    ("ocr", text.score_ocr, text.check_ocr, ("OCR", "text_recognition")),
    ("boolean", choice.score_boolean, choice.check_boolean,
     ("yes/no", "yes_no", "yesno", "bool", "true/false", "true_false", "judgement")),
    ("code", code.score_code, code.check_code, ("coding", "program", "svg", "html", "python")),
    ("preference", preference.score_preference, preference.check_preference,
     ("pairwise", "critic", "pairwise_preference")),
    # VSI-Bench's own MRA (``<=`` on numpy's thresholds), for its numeric questions.
    ("vsibench_mra", numeric.score_vsibench_mra, numeric.check_vsibench_mra, ()),
]

for _name, _fn, _check, _aliases in _BUILTINS:
    register(_name, _fn, _aliases, check=_check, _builtin=True)

BUILTIN_TYPES: tuple[str, ...] = tuple(name for name, _, _, _ in _BUILTINS)
