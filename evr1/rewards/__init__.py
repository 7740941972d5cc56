"""Verifiable rewards for GRPO: one scorer per problem type, a router, the format reward.

    >>> from evr1.rewards import score
    >>> r = score("multiple choice", "<think>...</think><answer>(B)</answer>", "B")
    >>> (r.overall, r.accuracy, r.format)
    (1.0, 1.0, 1.0)

``score(problem_type, response, solution, **kwargs)`` never raises on a model output; an
unknown problem type raises ``UnknownProblemType`` (unless a ``fallback_type`` is given) and an
unusable solution raises ``InvalidSolution``. ``check_solution(problem_type, solution, **kwargs)``
raises the same errors without scoring anything (what ``evr1.data.schema`` runs on every sample
it loads). See docs/rewards.md for every type.
"""

from __future__ import annotations

from typing import Any

from .base import InvalidSolution, RewardInputError, RewardResult, UnknownProblemType, Verdict
from .preference import register_judge
from .router import (
    BUILTIN_TYPES,
    BatchResult,
    canonical_type,
    check_items,
    check_solution,
    problem_types,
    register,
    score,
    score_batch,
    shutdown_pool,
)
from .sandbox import SandboxUnavailable

__all__ = [
    "BUILTIN_TYPES",
    "PROBLEM_TYPES",
    "BatchResult",
    "InvalidSolution",
    "RewardInputError",
    "RewardResult",
    "SandboxUnavailable",
    "UnknownProblemType",
    "Verdict",
    "canonical_type",
    "check_items",
    "check_solution",
    "problem_types",
    "register",
    "register_judge",
    "score",
    "score_batch",
    "shutdown_pool",
]


def __getattr__(name: str) -> Any:
    # PROBLEM_TYPES is computed on access so that it includes types added by register().
    if name == "PROBLEM_TYPES":
        return problem_types()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
