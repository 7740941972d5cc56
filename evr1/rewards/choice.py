"""Closed-set answers: ``multiple_choice`` and ``boolean``.

Multiple choice: the solution is an option letter ("B", "(B)", "B. red") or, when ``options``
are given, an option's text. Options may carry their own letter prefix ("B. red"); it is
removed before matching. An answer is read, in this order, as:
  1. only a letter: "B", "(B)", "[B]", "b.";
  2. exactly an option's text ("red") or a letter with it ("B) red", "B. red");
  3. a stated choice: "the answer is B", "Answer: (B)", "option B", "choice: B" (the last one);
  4. a leading letter with a delimiter: "B) because...", "B: ...", "B, since ...";
  5. one distinct parenthesised letter anywhere: "... so it must be (C).";
  6. the text of exactly one option as whole words: "the car is red";
  7. one distinct capital letter standing alone, other than "A" and "I" (English words).
With ``options``, only their letters count (4 options: A-D).

Boolean: yes/true/correct vs no/false/incorrect, from the first word, else the last
yes/no/true/false in the text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .base import InvalidSolution, Verdict

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MAX_CHOICE_TEXT = 2000

_ONLY_LETTER = re.compile(r"[(\[]?([A-Za-z])[)\]]?\.?")
_LETTER_PREFIX = re.compile(r"[(\[]?([A-Z])(?:[)\]]|[.:,])\s*")
_STATED = re.compile(r"(?i:answer|option|choice)\s?(?:is|:|=)?\s?(?i:option\s?)?[(\[]?([A-Z])\b")
_LEADING = re.compile(r"[(\[]?([A-Z])(?:[)\]]|[.:,](?!\w))")
_PARENTHESISED = re.compile(r"\(([A-Z])\)")
_STANDALONE = re.compile(r"(?<![\w'’-])([A-Z])(?![\w'’-])")
_WORDS = re.compile(r"\w+")


def _clean(text: str) -> str:
    """Collapse whitespace and drop markdown emphasis that wraps answers ("**B**")."""
    text = text[-MAX_CHOICE_TEXT:]
    return " ".join(text.replace("*", " ").replace("`", " ").replace("$", " ").split())


def _norm(text: str) -> str:
    return " ".join(_WORDS.findall(text.lower()))


def option_texts(options: Any) -> list[str]:
    """Option strings with any own letter prefix ("B. red" at position B) removed, normalised."""
    if not isinstance(options, Sequence) or isinstance(options, str):
        return []
    out = []
    for i, opt in enumerate(list(options)[:len(LETTERS)]):
        text = str(opt).strip()
        m = _LETTER_PREFIX.match(text)
        if m and m.group(1) == LETTERS[i]:
            text = text[m.end():]
        out.append(_norm(text))
    return out


def read_choice(text: str, options: Sequence[str]) -> str | None:
    """The option letter an answer picks (see module docstring for the order), or None."""
    valid = LETTERS[:len(options)] if options else LETTERS
    text = _clean(text)
    if not text:
        return None
    m = _ONLY_LETTER.fullmatch(text)
    if m:
        letter = m.group(1).upper()
        return letter if letter in valid else None
    norm = _norm(text)
    for i, opt in enumerate(options):
        if opt and norm == opt:
            return LETTERS[i]
    m = _LETTER_PREFIX.match(text)
    if m and m.group(1) in valid and options and _norm(text[m.end():]) == options[
            LETTERS.index(m.group(1))]:
        return m.group(1)
    for finder in (_stated, _leading, _parenthesised, _option_mention, _standalone):
        letter = finder(text, norm, options, valid)
        if letter is not None:
            return letter
    return None


def _stated(text: str, norm: str, options: Sequence[str], valid: str) -> str | None:
    found = [x for x in _STATED.findall(text) if x in valid]
    return found[-1] if found else None


def _leading(text: str, norm: str, options: Sequence[str], valid: str) -> str | None:
    m = _LEADING.match(text)
    return m.group(1) if m and m.group(1) in valid else None


def _unique(found: list[str], valid: str) -> str | None:
    distinct = {x for x in found if x in valid}
    return distinct.pop() if len(distinct) == 1 else None


def _parenthesised(text: str, norm: str, options: Sequence[str], valid: str) -> str | None:
    return _unique(_PARENTHESISED.findall(text), valid)


def _option_mention(text: str, norm: str, options: Sequence[str], valid: str) -> str | None:
    padded = f" {norm} "
    hits = [LETTERS[i] for i, opt in enumerate(options) if opt and f" {opt} " in padded]
    return hits[0] if len(hits) == 1 else None


def _standalone(text: str, norm: str, options: Sequence[str], valid: str) -> str | None:
    return _unique([x for x in _STANDALONE.findall(text) if x not in "AI"], valid)


def solution_letter(solution: Any, options: Sequence[str]) -> str | None:
    """The correct letter; None when there are no options and the solution is plain text."""
    if isinstance(solution, str):
        text = _clean(solution)
        m = _ONLY_LETTER.fullmatch(text) or _LETTER_PREFIX.match(text)
        valid = LETTERS[:len(options)] if options else LETTERS
        if m and m.group(1).upper() in valid:
            return m.group(1).upper()
        norm = _norm(text)
        if options and norm in options:
            return LETTERS[options.index(norm)]
        if not options and norm:
            return None
    raise InvalidSolution(f"multiple_choice: solution {solution!r:.200} is not an option letter"
                          + (f" or option text among {len(options)} options" if options else ""))


def check_multiple_choice(solution: Any, *, options: Any = None, **_: Any) -> None:
    """Raise ``InvalidSolution`` unless ``solution`` is a letter among the options (or an
    option's text; without options, any text): what ``score_multiple_choice`` can read."""
    solution_letter(solution, option_texts(options))


def score_multiple_choice(answer: str, solution: Any, *, options: Any = None,
                          **_: Any) -> Verdict:
    opts = option_texts(options)
    gold = solution_letter(solution, opts)
    if gold is None:  # no options and a text solution: exact match of normalised text
        norm = _norm(_clean(answer))
        return Verdict(float(bool(norm) and norm == _norm(str(solution))), parsed=bool(norm),
                       extracted=norm[:200] or None)
    letter = read_choice(answer, opts)
    if letter is None:
        return Verdict(0.0, parsed=False)
    return Verdict(float(letter == gold), parsed=True, extracted=letter)


# --------------------------------------------------------------------------- boolean

_YES = frozenset({"yes", "true", "correct", "y", "yeah", "yep"})
_NO = frozenset({"no", "false", "incorrect", "n", "nope"})
_PLAIN = {"yes": True, "true": True, "no": False, "false": False}


def read_boolean(text: str) -> bool | None:
    words = _WORDS.findall(text[-MAX_CHOICE_TEXT:].lower())
    if not words:
        return None
    if words[0] in _YES:
        return True
    if words[0] in _NO:
        return False
    for word in reversed(words):
        if word in _PLAIN:
            return _PLAIN[word]
    return None


def solution_boolean(solution: Any) -> bool:
    if isinstance(solution, bool):
        return solution
    if isinstance(solution, (int, float)) and solution in (0, 1):
        return bool(solution)
    if isinstance(solution, str):
        words = _WORDS.findall(solution.lower())
        if len(words) == 1 and (words[0] in _YES or words[0] in _NO):
            return words[0] in _YES
        if words in (["1"], ["0"]):
            return words == ["1"]
    raise InvalidSolution(f"boolean: solution {solution!r:.200} is not yes/no/true/false")


def check_boolean(solution: Any, **_: Any) -> None:
    """Raise ``InvalidSolution`` unless ``solution`` is yes/no, true/false or 1/0."""
    solution_boolean(solution)


def score_boolean(answer: str, solution: Any, **_: Any) -> Verdict:
    gold = solution_boolean(solution)
    value = read_boolean(answer)
    if value is None:
        return Verdict(0.0, parsed=False)
    return Verdict(float(value == gold), parsed=True, extracted="yes" if value else "no")
