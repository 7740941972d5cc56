"""``preference``: which of two responses is better ("1", "2" or "tie").

Labels: "1" / "one" / "first" / "A", "2" / "two" / "second" / "B", and "tie" (also "equal",
"same", "both", "neither", "draw", "C"). An answer is read as, in order: an MT-Bench style
verdict "[[A]]"; only a label ("2", "Response 2", "B."); a stated winner ("Response 1 is
better", "I prefer response 2"); a tie word; the first "response N" mentioned.

Instead of label matching, a registered judge (an LLM call, a reward model...) can score the
answer: ``register_judge("my-judge", fn)`` then ``score("preference", ..., judge="my-judge")``.
``fn(answer, solution, **kwargs)`` returns a float in [0, 1]. It must be a module-level function
so that batch-scoring worker processes can import it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .base import InvalidSolution, RewardInputError, Verdict, clamp01

Judge = Callable[..., float]
_JUDGES: dict[str, Judge] = {}

_LABEL_WORDS = {
    "1": "1", "one": "1", "first": "1", "a": "1",
    "2": "2", "two": "2", "second": "2", "b": "2",
    "tie": "tie", "equal": "tie", "same": "tie", "both": "tie", "neither": "tie", "draw": "tie",
    "c": "tie", "equally": "tie",
}
_BRACKETED = re.compile(r"\[\[([ABC12])\]\]")
_WINNER = re.compile(r"(?i:(?:response|output|answer|assistant|option)) ?#?([12AB])\b"
                     r"(?i: (?:is|was) (?:better|preferred|superior|the better))")
_PREFER = re.compile(r"(?i:prefer(?:red)?:? (?:the )?(?:response|output|assistant|option)? ?#?)"
                     r"([12AB])\b")
_MENTION = re.compile(r"(?i:(?:response|output|assistant|option)) ?#?([12AB])\b")
_PREFIX = re.compile(r"(?i:(?:response|output|assistant|option)) ?#?")
_TIE = re.compile(r"(?i)\b(?:tie|equally good|equally bad|both (?:are )?equal|same quality)\b")
MAX_PREFERENCE_TEXT = 2000


def register_judge(name: str, fn: Judge) -> None:
    """Make ``fn`` available as ``score("preference", ..., judge=name)``."""
    if not callable(fn):
        raise TypeError(f"judge {name!r} must be callable")
    _JUDGES[name] = fn


def judges() -> dict[str, Judge]:
    return dict(_JUDGES)


def read_label(text: str) -> str | None:
    text = " ".join(text[-MAX_PREFERENCE_TEXT:].split())
    m = _BRACKETED.search(text)
    if m:
        return _LABEL_WORDS[m.group(1).lower()]
    bare = _PREFIX.sub("", text).strip(" .!()[]*\"'").lower()
    if bare in _LABEL_WORDS:
        return _LABEL_WORDS[bare]
    for pattern in (_WINNER, _PREFER):
        m = pattern.search(text)
        if m:
            return _LABEL_WORDS[m.group(1).lower()]
    if _TIE.search(text):
        return "tie"
    m = _MENTION.search(text)
    return _LABEL_WORDS[m.group(1).lower()] if m else None


def solution_label(solution: Any) -> str:
    if isinstance(solution, int) and not isinstance(solution, bool) and solution in (1, 2):
        return str(solution)
    if isinstance(solution, str):
        bare = _PREFIX.sub("", solution).strip(" .!()[]*\"'").lower()
        if bare in _LABEL_WORDS:
            return _LABEL_WORDS[bare]
    raise InvalidSolution(f"preference: solution {solution!r:.200} is not 1, 2 or tie")


def check_preference(solution: Any, *, judge: str | None = None, **_: Any) -> None:
    """Raise ``InvalidSolution`` unless ``solution`` is 1, 2 or tie. With a ``judge`` the
    solution is whatever that judge reads (and judges are registered by the process that
    scores, so a data check cannot see them): nothing is checked."""
    if judge is None:
        solution_label(solution)


def score_preference(answer: str, solution: Any, *, judge: str | None = None,
                     **kwargs: Any) -> Verdict:
    if judge is not None:
        if judge not in _JUDGES:
            raise RewardInputError(f"unknown preference judge {judge!r}; registered: "
                             f"{', '.join(sorted(_JUDGES)) or 'none'}")
        value = _JUDGES[judge](answer, solution, **kwargs)
        return Verdict(clamp01(value), parsed=bool(answer.strip()), extracted=answer[:200])
    gold = solution_label(solution)
    label = read_label(answer)
    if label is None:
        return Verdict(0.0, parsed=False)
    return Verdict(float(label == gold), parsed=True, extracted=label)
