"""The math-verify process: one JSON request per stdin line, one JSON reply per stdout line.

It runs as ``python -m evr1.rewards._math_worker`` (see ``evr1.rewards.math``), so a
verification that hangs can be killed without touching the caller. In this process
math-verify's own signal timeouts work (we are the main thread) and act as a soft inner limit;
the caller's kill is the hard one.

Request: ``{"gold": str, "pred": str, "inner_s": int}``.
Reply: ``{"equal": bool, "parsed": bool, "gold_parsed": bool, "extracted": str | null}``.
The first line written is ``{"ready": true}``, once math-verify is imported and warmed up.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any

_DELIMITERS = ("$", "\\boxed", "\\(", "\\[")
# Words that may appear in a bare expression; any other word of 3+ letters means prose.
_MATH_WORDS = frozenset(
    "sqrt sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh log ln exp pi inf infty "
    "frac dfrac tfrac cdot times div pm mp le ge leq geq neq in cup cap emptyset lim sum prod "
    "int text mathrm left right circ deg degree degrees mod max min and or".split())
_WORD = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{3,}")


def _looks_like_expression(text: str) -> bool:
    return len(text) <= 300 and all(w.lower() in _MATH_WORDS for w in _WORD.findall(text))


def _parse(text: str, inner_s: int) -> list[Any]:
    # heavy import (sympy), only in the math worker process
    from math_verify import parse

    # math-verify finds LaTeX between delimiters, so a bare "2\sqrt{3}" needs them added
    # (without, it reads "2"). Prose must not be wrapped: "$So the answer is 5$" parses as a
    # product of letters, slowly. Prose goes in as is; math-verify finds "answer is 5" there.
    if not any(d in text for d in _DELIMITERS) and _looks_like_expression(text):
        found = parse(f"${text}$", parsing_timeout=inner_s)
        if found:
            return found
    return parse(text, parsing_timeout=inner_s)


def check(gold: str, pred: str, inner_s: int) -> dict[str, Any]:
    # heavy import (sympy), only in the math worker process
    from math_verify import verify

    gold_parsed, pred_parsed = _parse(gold, inner_s), _parse(pred, inner_s)
    # math-verify appends the raw matched string as a fallback; only a sympy object means the
    # answer really parsed as mathematics.
    reply: dict[str, Any] = {"equal": False,
                             "parsed": any(not isinstance(x, str) for x in pred_parsed),
                             "gold_parsed": bool(gold_parsed), "extracted": None}
    if pred_parsed:
        reply["extracted"] = str(pred_parsed[-1])[:200]
    if gold_parsed and pred_parsed:
        reply["equal"] = bool(verify(gold_parsed, pred_parsed, timeout_seconds=inner_s))
    return reply


def main() -> None:
    logging.disable(logging.CRITICAL)  # math-verify logs every timeout as a warning
    # Import and warm up (LaTeX grammar, answer-phrase regexes) before saying ready.
    check("1", "1", 5)
    check("\\frac{1}{2}", "So the answer is 1/2.", 5)
    out = sys.stdout
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:  # ends when the caller closes the pipe or dies
        try:
            req = json.loads(line)
            reply = check(str(req["gold"]), str(req["pred"]), max(1, int(req["inner_s"])))
        except Exception as exc:  # a bad expression must not end the worker
            reply = {"equal": False, "parsed": False, "gold_parsed": True,
                     "extracted": None, "error": repr(exc)[:200]}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
