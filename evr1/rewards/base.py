"""Types shared by every reward module: the result, a scorer's verdict, and the errors."""

from __future__ import annotations

import math
from dataclasses import dataclass


class UnknownProblemType(ValueError):
    """A sample names a problem type that no scorer is registered for."""


class RewardInputError(ValueError):
    """A sample's reference data or options are unusable (a dataset error, not a model one)."""


class InvalidSolution(RewardInputError):
    """A reference solution cannot be read as its problem type expects.

    This is a dataset error, never a model error: it is raised so that a bad sample is found
    (and can be fixed) instead of silently scoring zero for the whole run.
    """


@dataclass(frozen=True)
class RewardResult:
    """The reward of one response. All three scores lie in [0, 1]."""

    overall: float
    accuracy: float
    format: float
    # What was read from the response (a letter, a number, a box...), for logs and predictions.
    extracted: str | None = None


@dataclass(frozen=True)
class Verdict:
    """What a problem-type scorer returns about one answer.

    ``parsed`` says whether the answer text has the shape the type expects (a letter, a number,
    a box...). It drives the format reward: a well-tagged answer of the wrong shape earns 0.5.
    """

    accuracy: float
    parsed: bool
    extracted: str | None = None


def clamp01(value: object) -> float:
    """Any number-like value as a float in [0, 1]; NaN and junk become 0."""
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return 0.0
    if math.isnan(x):
        return 0.0
    return min(1.0, max(0.0, x))


def short(text: str | None, limit: int = 200) -> str | None:
    """Cut an extracted string for logs and prediction files."""
    if text is None:
        return None
    return text if len(text) <= limit else text[:limit] + "..."
