"""Finding the answer in a model response, the same way for every benchmark.

The order is fixed and reported with each answer (``Extraction.method``):

1. ``tag``: the content of the last complete ``<answer>...</answer>`` pair;
2. ``phrase``: the usual answer phrasings after the reasoning ("the answer is B",
   "Final answer: 12", "Best option: (C", ``\\boxed{...}``), the last one in the text;
3. ``letter``: for multiple choice, the last option letter standing on its own ("(C)",
   "C.", "so C"), never an article "A" or a pronoun "I" inside a sentence;
4. ``text``: the whole text after the reasoning, read by the problem type's own parser
   (the last number, the first span, the option whose text it quotes...).

A candidate counts only when it reads as the problem type expects (a valid option letter, a
number, a span...); otherwise the next step is tried. When no step finds anything the answer is
*unextracted*: it scores 0 and is counted, never dropped from the denominator (dropping it is
how some toolkits inflate scores).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from evr1.rewards import canonical_type
from evr1.rewards.choice import option_texts, read_boolean, read_choice
from evr1.rewards.format import THINK_CLOSE, as_text, find_answer
from evr1.rewards.grounding import read_box, read_span
from evr1.rewards.numeric import last_number

MAX_PHRASE_CHARS = 300
MAX_TEXT_CHARS = 4000


@dataclass(frozen=True)
class Extraction:
    answer: str | None  # the answer as the scorer reads it (a letter, a number, "[s, e]"...)
    method: str  # tag | phrase | letter | text | none

    @property
    def found(self) -> bool:
        return self.answer is not None


# Phrasings that introduce a final answer; the captured text runs to the end of the line.
_PHRASES = (
    re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}"),
    re.compile(r"(?i)\b(?:the\s+)?(?:final|correct|best|right)\s+(?:answer|option|choice)"
               r"(?:\s+is)?\s*[:=]?\s*(?:option\s+)?(?:\*\*)?([^\n]+)"),
    re.compile(r"(?i)\b(?:the\s+)?answer\s+(?:is|would\s+be|should\s+be)\s*:?\s*(?:option\s+)?"
               r"(?:\*\*)?([^\n]+)"),
    re.compile(r"(?im)^\s*(?:\*\*)?answer(?:\*\*)?\s*[:=]\s*(?:\*\*)?([^\n]+)"),
)
# A lone capital letter; "A" / "I" followed by a lower-case word are an article / a pronoun.
_LETTER = re.compile(r"(?<![A-Za-z0-9'’])\(?([A-Z])\)?(?![A-Za-z0-9'’])")
_ARTICLE_AFTER = re.compile(r"\s+[a-z]")


def body(text: str) -> str:
    """The text after the reasoning (after the last ``</think>``), else all of it."""
    cut = text.rfind(THINK_CLOSE)
    return text[cut + len(THINK_CLOSE):] if cut >= 0 else text


def phrase_candidate(text: str) -> str | None:
    """The answer text of the last answer phrasing in ``text``."""
    best: tuple[int, str] | None = None
    for pattern in _PHRASES:
        for m in pattern.finditer(text):
            if best is None or m.start() >= best[0]:
                best = (m.start(), m.group(1))
    if best is None:
        return None
    found = best[1].strip().strip("*").strip()
    found = re.sub(r"[.\s]+$", "", found)
    return found[:MAX_PHRASE_CHARS] or None


def last_letter(text: str, valid: str) -> str | None:
    """The last option letter standing on its own in ``text``."""
    found = None
    for m in _LETTER.finditer(text):
        letter = m.group(1)
        if letter not in valid:
            continue
        bare = m.group(0) == letter
        if bare and letter in "AI" and _ARTICLE_AFTER.match(text, m.end()):
            continue  # "A man walks", "I think"
        found = letter
    return found


# --------------------------------------------------------------------------- per type readers


def _read_choice(options: Sequence[str] | None) -> Callable[[str], str | None]:
    opts = option_texts(options) if options else []
    return lambda text: read_choice(text, opts)


def _read_boolean(text: str) -> str | None:
    value = read_boolean(text)
    return None if value is None else ("yes" if value else "no")


def _read_number(text: str) -> str | None:
    found = last_number(text)
    return None if found is None else found[1].strip()


def _read_span(text: str) -> str | None:
    span = read_span(text)
    return None if span is None else f"[{span[0]:g}, {span[1]:g}]"


def _read_box(text: str) -> str | None:
    box = read_box(text)
    return None if box is None else "[" + ", ".join(f"{v:g}" for v in box) + "]"


def read_tube(text: str) -> str | None:
    """A ``{"span", "boxes"}`` JSON object; ``time`` is accepted for ``span`` (a common
    training format) and rewritten so the reward reads it."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        obj = json.loads(text[start:end + 1])
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or "boxes" not in obj:
        return None
    span = obj.get("span", obj.get("time"))
    if span is None:
        return None
    return json.dumps({"span": span, "boxes": obj["boxes"]})


def _read_text(text: str) -> str | None:
    text = text.strip()
    return text[:MAX_TEXT_CHARS] or None


READERS: dict[str, Callable[[str], str | None]] = {
    "boolean": _read_boolean,
    "numerical": _read_number,
    "regression": _read_number,
    "vsibench_mra": _read_number,
    "temporal_grounding": _read_span,
    "spatial_grounding": _read_box,
    "spatial_temporal_grounding": read_tube,
}


def reader_for(problem_type: str, options: Sequence[str] | None) -> Callable[[str], str | None]:
    ptype = canonical_type(problem_type)
    if ptype == "multiple_choice":
        return _read_choice(options)
    return READERS.get(ptype, _read_text)


# --------------------------------------------------------------------------- the cascade


def extract_answer(response: Any, problem_type: str,
                   options: Sequence[str] | None = None) -> Extraction:
    """The answer of ``response`` for a question of ``problem_type`` (see module docstring)."""
    text = as_text(response)
    read = reader_for(problem_type, options)
    is_choice = canonical_type(problem_type) == "multiple_choice"
    span = find_answer(text)
    if span.tagged:
        found = read(span.text)
        if found is not None:
            return Extraction(found, "tag")
    tail = body(text)
    phrase = phrase_candidate(tail)
    if phrase is not None:
        found = read(phrase)
        if found is not None:
            return Extraction(found, "phrase")
    if is_choice:
        valid = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:len(options)] if options else "ABCDE"
        letter = last_letter(tail, valid)
        if letter is not None:
            return Extraction(letter, "letter")
    found = read(tail)
    if found is not None:
        return Extraction(found, "text")
    return Extraction(None, "none")
