"""Numbers in free text, and the ``numerical``, ``regression`` and ``vsibench_mra`` problem types.

Reading numbers is shared with the grounding types. Every pattern below is linear: no nested
quantifiers, each optional part anchored by a literal, whitespace runs collapsed first.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from .base import InvalidSolution, RewardInputError, Verdict

# How much text a number search looks at; enough for a long reasoning tail.
MAX_NUMBER_TEXT = 20_000

_LATEX_FRAC = re.compile(r"\\[dt]?frac\{([^{}]{1,40})\}\{([^{}]{1,40})\}")
# "1.5 x 10^3", "1.5 \times 10^{-3}", "2·10^5" -> "1.5e3" ... (after whitespace collapsing)
_TIMES_TEN = re.compile(r"(\d) ?(?:\\times|\\cdot|×|·|\*|x) ?10 ?\^ ?\{? ?([-+]?\d{1,4}) ?\}?")
_NUMBER = re.compile(
    r"(?<![\w.])"  # not the tail of a word ("v2") or of another number
    r"(?P<num>[-+]?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d{1,4})?)"
    r"(?: ?/ ?(?P<den>\d+(?:\.\d+)?)(?!\d))?"  # a fraction 3/4
)
_WORD = re.compile(r"[a-z]+")
_NUMBER_WORDS = {
    w: i for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split())
} | {"thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
     "ninety": 90, "hundred": 100, "none": 0}


def _normalise(text: str) -> str:
    text = " ".join(text[-MAX_NUMBER_TEXT:].split())  # collapse whitespace runs
    text = text.replace("\u2212", "-").replace("\\!", "").replace("\\,", "").replace("{,}", "")
    text = _LATEX_FRAC.sub(r"\1/\2", text)
    return _TIMES_TEN.sub(r"\1e\2", text)


def numbers_in(text: str) -> list[tuple[float, str]]:
    """Every finite number in ``text`` with the text it came from, in order.

    Thousands separators ("1,234"), signs, decimals, exponents ("1.5e-3", "1.5 x 10^3"),
    fractions ("3/4", "\\frac{3}{4}") are understood; units and "%" are ignored. Number words
    up to "twenty" (and tens) are used only when the text holds no digits.
    """
    found = []
    for m in _NUMBER.finditer(_normalise(text)):
        value = _to_float(m.group("num"), m.group("den"))
        if value is not None:
            found.append((value, m.group(0)))
    if not found and not any(c.isdigit() for c in text[-MAX_NUMBER_TEXT:]):
        found = [(float(_NUMBER_WORDS[w]), w) for w in _WORD.findall(text[-2000:].lower())
                 if w in _NUMBER_WORDS and w != "none"]
    return found


def _to_float(num: str, den: str | None) -> float | None:
    try:
        value = float(num.replace(",", ""))
        if den is not None:
            value /= float(den)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return value if math.isfinite(value) else None


def last_number(text: str) -> tuple[float, str] | None:
    """The final number of an answer: reasoning ends with its result ("... = 42")."""
    found = numbers_in(text)
    return found[-1] if found else None


def solution_number(solution: Any, type_name: str) -> float:
    """A reference answer as one float, or ``InvalidSolution``."""
    if isinstance(solution, (int, float)) and not isinstance(solution, bool):
        if math.isfinite(solution):
            return float(solution)
    elif isinstance(solution, str):
        found = numbers_in(solution)
        if len(found) == 1:
            return found[0][0]
    raise InvalidSolution(f"{type_name}: solution {solution!r} is not a single finite number")


def _tolerance(name: str, value: Any) -> float | None:
    if value is None:
        return None
    try:
        tol = float(value)
    except (TypeError, ValueError):
        raise RewardInputError(f"{name} must be a number, got {value!r}") from None
    if not tol >= 0:
        raise RewardInputError(f"{name} must be >= 0, got {value!r}")
    return tol


def numbers_match(pred: float, gold: float, abs_tol: float | None, rel_tol: float | None) -> bool:
    """Within tolerance when one is given, else equal after rounding to 2 decimals."""
    if abs_tol is None and rel_tol is None:
        return abs(round(pred, 2) - round(gold, 2)) < 1e-9 * max(1.0, abs(gold))
    allowed = max(abs_tol or 0.0, (rel_tol or 0.0) * abs(gold))
    # A hair of slack so that 0.1 + 0.2 style float noise does not decide a reward.
    return abs(pred - gold) <= allowed + 1e-12 * max(1.0, abs(gold))


def check_numerical(solution: Any, *, abs_tol: Any = None, rel_tol: Any = None,
                    **_: Any) -> None:
    """Raise unless ``solution`` is one finite number and the tolerances are numbers >= 0."""
    solution_number(solution, "numerical")
    _tolerance("abs_tol", abs_tol)
    _tolerance("rel_tol", rel_tol)


def score_numerical(answer: str, solution: Any, *, abs_tol: Any = None, rel_tol: Any = None,
                    **_: Any) -> Verdict:
    gold = solution_number(solution, "numerical")
    found = last_number(answer)
    if found is None:
        return Verdict(0.0, parsed=False)
    pred, raw = found
    ok = numbers_match(pred, gold, _tolerance("abs_tol", abs_tol), _tolerance("rel_tol", rel_tol))
    return Verdict(1.0 if ok else 0.0, parsed=True, extracted=raw)


# VSI-Bench mean relative accuracy: thresholds 0.50, 0.55, ..., 0.95.
MRA_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
_MRA_MAX_ERRORS = tuple(round(1 - t, 2) for t in MRA_THRESHOLDS)  # 0.5, 0.45, ..., 0.05


def mean_relative_accuracy(pred: float, gold: float) -> float:
    """Mean over thresholds t of 1[|pred - gold| / |gold| < 1 - t].

    A zero ground truth has no relative error: only an exact 0 scores there.
    """
    if gold == 0:
        return 1.0 if pred == 0 else 0.0
    rel_err = abs(pred - gold) / abs(gold)
    return sum(rel_err < e for e in _MRA_MAX_ERRORS) / len(_MRA_MAX_ERRORS)


def check_regression(solution: Any, **_: Any) -> None:
    """Raise ``InvalidSolution`` unless ``solution`` is one finite number."""
    solution_number(solution, "regression")


def score_regression(answer: str, solution: Any, **_: Any) -> Verdict:
    gold = solution_number(solution, "regression")
    found = last_number(answer)
    if found is None:
        return Verdict(0.0, parsed=False)
    pred, raw = found
    return Verdict(mean_relative_accuracy(pred, gold), parsed=True, extracted=raw)


# VSI-Bench's thresholds: numpy.linspace(0.5, 0.95, 10), computed the same way so that answers
# on a threshold (12 for 10 at 0.8) fall on the same side as in the official code.
_VSI_CONFIDENCE = np.linspace(0.5, 0.95, 10)


def check_vsibench_mra(solution: Any, **_: Any) -> None:
    """Raise ``InvalidSolution`` unless ``solution`` is one finite number."""
    solution_number(solution, "vsibench_mra")


def score_vsibench_mra(answer: str, solution: Any, **_: Any) -> Verdict:
    """VSI-Bench MRA: mean over thresholds c of 1[|pred - gold| / gold <= 1 - c].

    Differs from the ``regression`` reward only on the thresholds themselves: ``<=`` and
    numpy's linspace floats as in the official evaluation, where the reward uses ``<`` (15 for
    10: 0.1 here, 0.0 as a reward). Small integer counts land on thresholds often.
    """
    gold = solution_number(solution, "vsibench_mra")
    found = last_number(answer)
    if found is None:
        return Verdict(0.0, parsed=False)
    pred, raw = found
    if gold == 0:
        return Verdict(float(pred == 0), parsed=True, extracted=raw)
    error = abs(pred - gold) / abs(gold)
    return Verdict(float((error <= 1 - _VSI_CONFIDENCE).mean()), parsed=True, extracted=raw)
