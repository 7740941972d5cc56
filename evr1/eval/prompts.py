"""Prompt text for benchmark questions, in two styles.

``tags`` (default): the question, its options, and one sentence that asks for the answer inside
``<answer></answer>`` in the shape the problem type needs: the convention evr1 trains with
(the synthetic tasks use the same sentences), so a trained model is asked the way it learned.

``official``: the instruction each benchmark's own evaluation code uses ("Respond with only the
letter...", "Best option: ("), for comparing a base model with the published numbers. The
extractor reads answers in either style (tags first, then answer phrasings, then a letter).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

ANSWER_FORMAT: dict[str, str] = {
    "multiple_choice": "Answer with the option letter inside <answer></answer>.",
    "boolean": "Answer yes or no inside <answer></answer>.",
    "numerical": "Answer with a number inside <answer></answer>.",
    "regression": "Answer with a number inside <answer></answer>.",
    "temporal_grounding": ("Answer with the start and end time in seconds as [start, end] "
                           "inside <answer></answer>."),
    "spatial_temporal_grounding": (
        'Answer with a JSON object {"span": [start, end], "boxes": {"<second>": '
        '[x1, y1, x2, y2], ...}} inside <answer></answer>: the span in seconds and, for each '
        "whole second in it, the box of the target in pixels."),
    "spatial_grounding": ("Answer with its box as [x1, y1, x2, y2] in 0 to 1 coordinates "
                          "inside <answer></answer>."),
    "open_ended": "Answer briefly inside <answer></answer>.",
}
DEFAULT_FORMAT = "Answer inside <answer></answer>."

# Published evaluation instructions that several benchmarks share (lmms-eval defaults).
LETTER_DIRECTLY = "Answer with the option's letter from the given choices directly."
SHORT_ANSWER = "Answer the question using a single word or phrase."


@dataclass(frozen=True)
class Template:
    """How a benchmark words a question in its own (official) evaluation."""

    pre: str = ""  # text before the question
    options_header: str = ""  # e.g. "Options:" on its own line
    option_style: str = "dot"  # dot: "A. text"; paren: "(A) text"
    post_choice: str = LETTER_DIRECTLY  # after a multiple-choice question
    post_other: str = SHORT_ANSWER  # after any other question


GENERIC = Template(options_header="Options:")


def format_options(options: Sequence[str], style: str = "dot") -> list[str]:
    """``options`` are "A. text" strings; ``paren`` rewrites them as "(A) text"."""
    if style != "paren":
        return list(options)
    return [f"({o[0]}) {o[3:] if o[1:3] == '. ' else o[1:].lstrip('.:) ')}" for o in options]


def build_prompt(question: str, options: Sequence[str] | None, problem_type: str, style: str,
                 template: Template = GENERIC) -> str:
    """The full problem text of one sample."""
    question = question.strip()
    if style == "official":
        parts = [template.pre + question] if template.pre else [question]
        if options:
            if template.options_header:
                parts.append(template.options_header)
            parts.extend(format_options(options, template.option_style))
            post = template.post_choice
        else:
            post = template.post_other
        return "\n".join(parts + ([post] if post else []))
    parts = [question]
    if options:
        parts.append("Options:")
        parts.extend(options)
    parts.append(ANSWER_FORMAT.get(problem_type, DEFAULT_FORMAT))
    return "\n".join(parts)
