"""Where the answer is in a response, and the format reward.

A response is expected to look like::

    <think> reasoning </think> <answer> the answer </answer>

with the ``<think>`` block optional. Tag finding uses ``str.find`` only (no regular
expressions), so it is linear in the response length whatever the model wrote.

Format reward:
  * 1.0  the structure is clean (see ``AnswerSpan.clean``) and the answer parses as its type;
  * 0.5  an ``<answer>...</answer>`` pair is present but the structure is not clean or the
         answer does not parse as its type (a sentence where a letter was expected...);
  * 0.0  no complete ``<answer>...</answer>`` pair.

Accuracy is judged on the text inside the last answer pair. Without a pair, the fallback is:
the text after an unclosed ``<answer>``, else the text after the last ``</think>``, else the
whole response (its last ``MAX_ANSWER_CHARS`` characters, where final answers usually are).
Each problem type then searches that text leniently ("the answer is B", the last number...).
"""

from __future__ import annotations

from dataclasses import dataclass

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

# Longer responses are cut (keeping the end, where the answer is) before any search: this
# bounds the cost of every later step. 4,096 tokens are about 16-20k characters.
MAX_RESPONSE_CHARS = 100_000
# The most answer text a scorer ever sees; each type may cut further for costly metrics.
MAX_ANSWER_CHARS = 20_000


@dataclass(frozen=True)
class AnswerSpan:
    """The answer text found in a response and how it was found."""

    text: str
    tagged: bool  # it came from a complete <answer>...</answer> pair
    clean: bool  # the whole response is exactly [<think>...</think>] <answer>...</answer>


def as_text(response: object) -> str:
    """Any model output as a str that is safe to search and to encode as UTF-8."""
    if response is None:
        return ""
    if isinstance(response, bytes):
        text = response.decode("utf-8", "replace")
    elif isinstance(response, str):
        text = response
    else:
        try:
            text = str(response)
        except Exception:  # a hostile __str__ must not take the trainer down
            return ""
    if len(text) > MAX_RESPONSE_CHARS:
        text = text[-MAX_RESPONSE_CHARS:]
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates would break files, pipes and JSON later
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def find_answer(text: str) -> AnswerSpan:
    """Locate the answer in ``text`` (already passed through ``as_text``)."""
    close = text.rfind(ANSWER_CLOSE)
    open_ = text.rfind(ANSWER_OPEN, 0, close) if close >= 0 else -1
    if open_ >= 0:
        start = open_ + len(ANSWER_OPEN)
        # The first close after the chosen open, so "<answer><answer>x</answer></answer>" reads x.
        end = text.find(ANSWER_CLOSE, start)
        return AnswerSpan(text[start:end][:MAX_ANSWER_CHARS], tagged=True,
                          clean=_is_clean(text, open_, end))
    return AnswerSpan(_fallback_text(text), tagged=False, clean=False)


def _fallback_text(text: str) -> str:
    opened = text.rfind(ANSWER_OPEN)
    if opened >= 0:
        tail = text[opened + len(ANSWER_OPEN):]
    else:
        thought = text.rfind(THINK_CLOSE)
        tail = text[thought + len(THINK_CLOSE):] if thought >= 0 else text
    return tail[-MAX_ANSWER_CHARS:]


def _is_clean(text: str, open_: int, close: int) -> bool:
    """Exactly one answer pair, at most one think pair before it, only whitespace outside."""
    if text.count(ANSWER_OPEN) != 1 or text.count(ANSWER_CLOSE) != 1:
        return False
    if text[close + len(ANSWER_CLOSE):].strip():
        return False
    head = text[:open_]
    n_open, n_close = head.count(THINK_OPEN), head.count(THINK_CLOSE)
    if text.count(THINK_OPEN) != n_open or text.count(THINK_CLOSE) != n_close:
        return False  # a think tag inside or after the answer
    if n_open == 0 and n_close == 0:
        return not head.strip()
    if n_open != 1 or n_close != 1:
        return False
    t_open, t_close = head.find(THINK_OPEN), head.find(THINK_CLOSE)
    return (t_open < t_close and not head[:t_open].strip()
            and not head[t_close + len(THINK_CLOSE):].strip())


def format_score(span: AnswerSpan, parsed: bool) -> float:
    """1.0 clean and parsed, 0.5 tagged otherwise, 0.0 untagged."""
    if not span.tagged:
        return 0.0
    return 1.0 if span.clean and parsed else 0.5
