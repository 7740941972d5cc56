"""Table-driven tests of every reward type, the format reward and the router API.

Expected values are worked out by hand in the comments; they are exact unless noted.
"""

from __future__ import annotations

import pytest

import evr1.rewards as rewards
from evr1.config import ConfigError, RewardConfig
from evr1.rewards import (
    InvalidSolution,
    RewardInputError,
    RewardResult,
    UnknownProblemType,
    Verdict,
    score,
)
from evr1.rewards.format import AnswerSpan, as_text, find_answer, format_score

OPTS = ["red", "green", "blue", "yellow"]


def tag(answer: str, think: str = "reasoning") -> str:
    return f"<think>{think}</think><answer>{answer}</answer>"


def acc(problem_type: str, answer: str, solution, **kwargs) -> float:
    return score(problem_type, tag(answer), solution, **kwargs).accuracy


# --------------------------------------------------------------------------- format


@pytest.mark.parametrize("response, text, tagged, clean", [
    ("<answer>B</answer>", "B", True, True),
    ("<think>x</think>\n<answer> B </answer>\n", " B ", True, True),
    ("  <think>a</think>  <answer>B</answer>  ", "B", True, True),
    ("prose <answer>B</answer>", "B", True, False),  # text outside the tags
    ("<answer>B</answer> trailing", "B", True, False),
    ("<answer>A</answer><answer>B</answer>", "B", True, False),  # two answers: the last
    ("<answer><answer>x</answer></answer>", "x", True, False),  # nested: innermost
    ("<think>a</think><think>b</think><answer>B</answer>", "B", True, False),
    ("<think>a<answer>B</answer>", "B", True, False),  # unclosed think
    ("<answer>B</answer><think>late</think>", "B", True, False),
    ("</think>x<think><answer>B</answer>", "B", True, False),  # think tags out of order
    ("<think>a</think> so the answer is B", " so the answer is B", False, False),
    ("reasoning <answer> B", " B", False, False),  # unclosed answer: its tail
    ("the answer is B", "the answer is B", False, False),
    ("</answer>B<answer>", "", False, False),  # reversed pair: the tail of the open
])
def test_find_answer(response, text, tagged, clean):
    span = find_answer(response)
    assert (span.text, span.tagged, span.clean) == (text, tagged, clean)


@pytest.mark.parametrize("tagged, clean, parsed, expected", [
    (True, True, True, 1.0),
    (True, True, False, 0.5),
    (True, False, True, 0.5),
    (False, False, True, 0.0),
])
def test_format_score(tagged, clean, parsed, expected):
    assert format_score(AnswerSpan("x", tagged, clean), parsed) == expected


def test_format_reward_end_to_end():
    assert score("mcq", tag("B"), "B", options=OPTS).format == 1.0
    assert score("mcq", tag("I am not sure"), "B", options=OPTS).format == 0.5
    assert score("mcq", "The answer is B", "B", options=OPTS).format == 0.0
    assert score("numerical", tag("quite a few?"), 3).format == 0.5  # no number


def test_as_text_cuts_and_cleans():
    assert as_text(None) == ""
    assert as_text(b"\xffB") == "\ufffdB"
    assert as_text("\ud800x") == "?x"  # a lone surrogate is replaced
    long = "x" * 200_000 + "<answer>B</answer>"
    assert as_text(long).endswith("<answer>B</answer>") and len(as_text(long)) == 100_000


# --------------------------------------------------------------------------- multiple choice


@pytest.mark.parametrize("answer, expected", [
    ("B", 1.0), ("(B)", 1.0), ("B.", 1.0), ("b", 1.0), ("[B]", 1.0),
    ("the answer is B", 1.0), ("The answer is: **B**", 1.0), ("B) green", 1.0),
    ("B. green", 1.0), ("green", 1.0), ("Green.", 1.0), ("B, because it is green", 1.0),
    ("it must be (B).", 1.0), ("The car is green", 1.0), ("I think B", 1.0),
    ("A", 0.0), ("(C)", 0.0), ("red", 0.0), ("the answer is D", 0.0),
    ("E", 0.0),  # not among four options
    ("I am not sure", 0.0),
])
def test_multiple_choice(answer, expected):
    assert acc("multiple_choice", answer, "B", options=OPTS) == expected


def test_multiple_choice_solution_forms():
    assert acc("mcq", "B", "(B)", options=OPTS) == 1.0
    assert acc("mcq", "B", "green", options=OPTS) == 1.0  # solution given as option text
    assert acc("mcq", "green", "B. green", options=OPTS) == 1.0
    prefixed = ["A. red", "B. green", "C. blue"]  # options carrying their own letters
    assert acc("mcq", "green", "B", options=prefixed) == 1.0
    assert acc("mcq", "C", "B") == 0.0  # no options: letters A-Z
    assert acc("mcq", "the answer is Paris", "Paris") == 0.0  # text solution, no options
    assert acc("mcq", "paris.", "Paris") == 1.0  # ... is an exact normalised match
    with pytest.raises(InvalidSolution):
        score("mcq", tag("B"), "E", options=OPTS)


def test_multiple_choice_extracted_and_format():
    r = score("multiple choice", tag("(C) blue"), "C", options=OPTS)
    assert r == RewardResult(1.0, 1.0, 1.0, "C")
    r = score("multiple choice", tag("none of these"), "C", options=OPTS)
    assert (r.accuracy, r.format, r.extracted) == (0.0, 0.5, None)


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("answer, solution, kwargs, expected", [
    ("42", 42, {}, 1.0),
    ("42.004", 42, {}, 1.0),  # rounds to 42.00
    ("42.006", 42, {}, 0.0),  # rounds to 42.01
    ("1,234,567 people", "1234567", {}, 1.0),
    ("3/4", 0.75, {}, 1.0),
    ("\\frac{3}{4}", "0.75", {}, 1.0),
    ("1.5e3", 1500, {}, 1.0),
    ("1.5 x 10^3 m", 1500, {}, 1.0),
    ("-2.5", "-2.5", {}, 1.0),
    ("12.5%", 12.5, {}, 1.0),
    ("five", 5, {}, 1.0),
    ("x = 2^10 = 1024", 1024, {}, 1.0),  # the last number
    ("10.4", 10, {"abs_tol": 0.5}, 1.0),
    ("10.6", 10, {"abs_tol": 0.5}, 0.0),
    ("104", 100, {"rel_tol": 0.05}, 1.0),
    ("106", 100, {"rel_tol": 0.05}, 0.0),
    ("106", 100, {"rel_tol": 0.05, "abs_tol": 10}, 1.0),  # the looser one wins
    ("0.30000000000000004", 0.3, {"abs_tol": 0}, 1.0),  # float noise is not an error
    ("no idea", 3, {}, 0.0),
])
def test_numerical(answer, solution, kwargs, expected):
    assert acc("numerical", answer, solution, **kwargs) == expected


def test_numerical_bad_inputs():
    with pytest.raises(InvalidSolution):
        score("numeric", tag("3"), "three or four")
    with pytest.raises(RewardInputError):
        score("numeric", tag("3"), 3, abs_tol="wide")
    with pytest.raises(RewardInputError):
        score("numeric", tag("3"), 3, rel_tol=-1)


@pytest.mark.parametrize("answer, solution, expected", [
    ("10", 10, 1.0),
    ("9", 10, 0.8),  # rel err 0.1: below 0.5..0.15 (8 of 10), not below 0.10 or 0.05
    ("10.5", 10, 0.9),  # rel err 0.05: all but the 0.05 threshold
    ("12", 10, 0.6),  # rel err 0.2: below 0.5, 0.45, 0.4, 0.35, 0.3, 0.25 (6 of 10)
    ("5", 10, 0.0),  # rel err 0.5 is not < 0.5
    ("7.6", 10, 0.6),  # rel err 0.24: still below 0.25
    ("0", 0, 1.0),
    ("0.1", 0, 0.0),
    ("three meters", 3, 1.0),
])
def test_regression_mra(answer, solution, expected):
    assert acc("regression", answer, solution) == pytest.approx(expected)


# --------------------------------------------------------------------------- grounding


@pytest.mark.parametrize("answer, solution, expected, fmt", [
    ("[2, 6]", [2, 6], 1.0, 1.0),
    ("[0, 4]", [2, 6], 2 / 6, 1.0),  # intersection 2, union 6
    ("From 2.0 to 6.0 seconds", [2, 6], 1.0, 1.0),
    ("0:02 - 0:06", "2-6", 1.0, 1.0),  # clock times
    ("1:00:00 to 1:00:10", [3600, 3610], 1.0, 1.0),
    ("[6, 2]", [2, 6], 1.0, 0.5),  # reversed: IoU of the sorted span, not well formed
    ("[10, 12]", [2, 6], 0.0, 1.0),
    ("[3, 3]", [3, 3], 1.0, 1.0),  # two equal instants
    ("at 3", [2, 6], 0.0, 0.5),
])
def test_temporal_grounding(answer, solution, expected, fmt):
    r = score("temporal grounding", tag(answer), solution)
    assert r.accuracy == pytest.approx(expected) and r.format == fmt


def test_temporal_solution_forms():
    assert acc("tg", "[2, 6]", {"start": 2, "end": 6}) == 1.0
    assert acc("tg", "[2, 6]", {"span": [2, 6]}) == 1.0
    with pytest.raises(InvalidSolution):
        score("tg", tag("[1, 2]"), [6, 2])


@pytest.mark.parametrize("answer, kwargs, expected, fmt", [
    ("[0.1, 0.1, 0.5, 0.5]", {}, 1.0, 1.0),
    ('{"bbox_2d": [0.1, 0.1, 0.5, 0.5], "label": "cat"}', {}, 1.0, 1.0),
    ("(0.1, 0.1), (0.5, 0.5)", {}, 1.0, 1.0),
    ("[0.3, 0.1, 0.7, 0.5]", {}, 0.08 / 0.24, 1.0),  # overlap 0.2x0.4, union 0.16+0.16-0.08
    ("[0.5, 0.5, 0.1, 0.1]", {}, 1.0, 0.5),  # reversed corners
    ("[0.1, 0.1, 5, 5]", {}, 0.16 / 0.81, 0.5),  # pixels in a normalised frame: clipped
    ("[0.6, 0.6, 0.9, 0.9]", {}, 0.0, 1.0),
    ("the cat", {}, 0.0, 0.5),
])
def test_spatial_grounding(answer, kwargs, expected, fmt):
    r = score("spatial_grounding", tag(answer), [0.1, 0.1, 0.5, 0.5], **kwargs)
    assert r.accuracy == pytest.approx(expected) and r.format == fmt


def test_spatial_grounding_pixels():
    gold = [10, 10, 50, 50]
    kw = {"box_format": "pixel", "image_size": (100, 80)}
    assert acc("bbox", "[10, 10, 50, 50]", gold, **kw) == 1.0
    assert acc("bbox", "[30, 10, 70, 50]", gold, **kw) == pytest.approx(800 / 2400)
    r = score("bbox", tag("[10, 10, 50, 200]"), gold, **kw)  # outside the 100x80 image
    assert r.format == 0.5 and r.accuracy == pytest.approx(1600 / 2800)  # clipped to y2=80
    with pytest.raises(InvalidSolution):
        score("bbox", tag("[1, 1, 2, 2]"), gold)  # pixel solution in the normalised frame
    with pytest.raises(RewardInputError):
        score("bbox", tag("[1, 1, 2, 2]"), gold, box_format="xyxy")


STG_GOLD = {"span": [2, 6], "boxes": {"2": [0.1, 0.1, 0.5, 0.5], "3": [0.2, 0.2, 0.6, 0.6]}}


@pytest.mark.parametrize("answer, expected, fmt", [
    ('{"span": [2, 6], "boxes": {"2": [0.1, 0.1, 0.5, 0.5], "3": [0.2, 0.2, 0.6, 0.6]}}',
     1.0, 1.0),
    # tIoU 2/6; second 2 exact, second 3 missing: box mean over shared {2} = 1
    ('```json\n{"span": [0, 4], "boxes": {"2s": [0.1, 0.1, 0.5, 0.5]}}\n```', 0.5 / 3 + 0.5,
     1.0),
    # span exact; second 3 offset to IoU 0.08/0.24 as in the spatial table
    ('{"span": [2, 6], "boxes": {"3": [0.4, 0.2, 0.8, 0.6]}}', 0.5 + 0.5 * (1 / 3), 1.0),
    ('{"span": [2, 6], "boxes": {"9": [0.1, 0.1, 0.5, 0.5]}}', 0.5, 1.0),  # no shared second
    ('{"span": [2, 6]}', 0.5, 0.5),  # no boxes: not well formed
    ("[2, 6]", 0.0, 0.5),  # not a JSON object
    ('{"span": [2, 6], "boxes": {"2": [0.1, 0.1]}}', 0.5, 0.5),
])
def test_spatial_temporal_grounding(answer, expected, fmt):
    r = score("spatial-temporal grounding", tag(answer), STG_GOLD)
    assert r.accuracy == pytest.approx(expected) and r.format == fmt


def test_spatial_temporal_solution_must_be_a_tube():
    with pytest.raises(InvalidSolution):
        score("stg", tag("{}"), {"span": [2, 6]})
    assert acc("stg", '{"span": [2, 6], "boxes": {"2": [0.1, 0.1, 0.5, 0.5]}}',
               '{"span": [2, 6], "boxes": {"2": [0.1, 0.1, 0.5, 0.5]}}') == 1.0


# --------------------------------------------------------------------------- text


@pytest.mark.parametrize("answer, solution, expected", [
    ("The Eiffel Tower", "Eiffel tower", 1.0),  # short: exact after normalisation
    ("Eiffel Tower, Paris", "Eiffel tower", 0.0),
    ("a dog", "dog.", 1.0),
    ("", "dog", 0.0),
    ("the quick brown fox jumps", "the quick brown fox jumps", 1.0),
    # long: mean ROUGE F1. Tokens (articles kept): p = [a cat sat on mat] vs
    # r = [a cat sat on the mat]: R1 = 2*5/(5+6); R2 = 3 shared bigrams of 4 and 5 -> 2*3/9;
    # RL = LCS 5 -> same as R1.
    ("a cat sat on mat", "a cat sat on the mat", (10 / 11 + 6 / 9 + 10 / 11) / 3),
    ("猫坐在垫子上", "猫坐在垫子上了", None),  # CJK tokens are characters: a high score
])
def test_open_ended(answer, solution, expected):
    got = acc("open_ended", answer, solution)
    if expected is None:
        assert 0.8 < got < 1.0
    else:
        assert got == pytest.approx(expected)


@pytest.mark.parametrize("answer, solution, expected", [
    ("STOP", "STOP", 1.0),  # short: exact, case-sensitive
    ("stop", "STOP", 0.0),
    ("EXIT 12", "EXIT 12", 1.0),
    ("the quick brown fox", "the quick brown fox", 1.0),
    ("the quick brown dog", "the quick brown fox", 0.75),  # 1 substitution of 4
    ("the quick fox", "the quick brown fox", 0.75),  # 1 deletion
    ("a b c d e f g h", "the quick brown fox", 0.0),  # twice as long: WER >= 1
    ("  the   quick\nbrown fox ", "the quick brown fox", 1.0),
])
def test_ocr(answer, solution, expected):
    assert acc("OCR", answer, solution) == pytest.approx(expected)


@pytest.mark.parametrize("answer, solution, expected", [
    ("Yes", "yes", 1.0), ("yes.", True, 1.0), ("True", "Yes", 1.0), ("No, it is not", "no", 1.0),
    ("no", "yes", 0.0), ("false", 0, 1.0), ("Looking closely, the answer is yes", "yes", 1.0),
    ("maybe", "yes", 0.0),
])
def test_boolean(answer, solution, expected):
    assert acc("yes/no", answer, solution) == expected


def test_boolean_solution():
    with pytest.raises(InvalidSolution):
        score("boolean", tag("yes"), "perhaps")


# --------------------------------------------------------------------------- math


@pytest.fixture
def math_ready():
    # Start-up is not under test here; on a loaded machine it can exceed timeout_s.
    from evr1.rewards.math import math_worker

    assert math_worker().check("1", "2", 120.0) is not None


@pytest.mark.usefixtures("math_ready")
@pytest.mark.parametrize("answer, solution, expected", [
    ("\\frac{1}{2}", "0.5", 1.0),
    ("(x+1)^2", "x^2+2x+1", 1.0),
    ("2\\sqrt{3}", "\\sqrt{12}", 1.0),
    ("The answer is \\boxed{4}", "4", 1.0),
    ("$x = 3$", "3", 1.0),
    ("5", "4", 0.0),
    ("\\{1, 2\\}", "\\{2, 1\\}", 1.0),
])
def test_math(answer, solution, expected):
    assert acc("math", answer, solution) == expected


def test_math_fast_paths_need_no_worker(monkeypatch):
    from evr1.rewards.math import math_worker

    calls = []
    monkeypatch.setattr(math_worker(), "check", lambda *args: calls.append(args))
    assert acc("math", "\\boxed{ 7 }", "7") == 1.0  # same text
    assert acc("math", "0.75", "\\frac{3}{4}") == 1.0  # same plain number
    assert acc("math", "-6/8", "-0.75") == 1.0
    assert calls == []
    acc("math", "0.7", "\\frac{3}{4}")  # unequal numbers: math-verify decides
    assert len(calls) == 1


# --------------------------------------------------------------------------- code


REF_PY = "def add(a, b):\n    return a + b\n"


def test_code_similarity_orders_answers():
    same = acc("code", REF_PY, REF_PY)
    renamed = acc("code", "def plus(x, y):\n    return x + y\n", REF_PY)
    other = acc("code", "print('hello')", REF_PY)
    assert same == 1.0 and 0.4 < renamed < 1.0 and other < 0.25 and renamed > other
    fenced = score("code", tag(f"```python\n{REF_PY}```"), REF_PY)
    assert fenced.accuracy == 1.0 and fenced.format == 1.0
    broken = score("code", tag("def add(a, b) return"), REF_PY)
    assert broken.format == 0.5 and broken.accuracy < 0.5


def test_code_svg_html():
    svg = '<svg width="10" height="10"><circle cx="5" cy="5" r="4" fill="red"/></svg>'
    assert acc("svg", svg, svg) == 1.0
    recoloured = acc("svg", svg.replace("red", "blue"), svg)
    assert 0.8 < recoloured < 1.0
    assert score("code", tag("a red circle"), svg).format == 0.5
    html = "<html><body><h1>Hi</h1><p>text</p></body></html>"
    assert acc("html", html, html) == 1.0
    assert acc("html", "<html><body><h1>Hi</h1></body></html>", html) < 1.0


def test_code_execution_counts_passing_tests():
    tests = ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(-1, 1) == 0",
             "assert add(2, 2) == 4"]
    wrong = "def add(a, b):\n    return a * b\n"  # passes only add(0, 0) and add(2, 2)
    assert acc("code", wrong, REF_PY, tests=tests, code_execution=True) == 0.5
    assert acc("code", REF_PY, REF_PY, tests="\n".join(tests), code_execution=True) == 1.0
    # without code_execution the tests are ignored and similarity is used
    assert acc("code", wrong, REF_PY, tests=tests) not in (0.5, 1.0)


# --------------------------------------------------------------------------- preference


@pytest.mark.parametrize("answer, solution, expected", [
    ("1", "1", 1.0), ("Response 2", "2", 1.0), ("[[A]]", "1", 1.0), ("[[C]]", "tie", 1.0),
    ("Response 2 is better than response 1", 2, 1.0), ("I prefer response 1", "2", 0.0),
    ("Both are equally good", "tie", 1.0), ("second", "Response 2", 1.0), ("no idea", "1", 0.0),
])
def test_preference(answer, solution, expected):
    assert acc("preference", answer, solution) == expected


def length_judge(answer, solution, **kwargs):
    return len(answer) / 10  # clipped to [0, 1] by the router


@pytest.mark.usefixtures("clean_registry")
def test_preference_judge_hook():
    rewards.register_judge("length", length_judge)
    assert acc("preference", "abcde", "1", judge="length") == 0.5
    assert acc("preference", "a" * 50, "1", judge="length") == 1.0
    with pytest.raises(RewardInputError, match="length"):
        score("preference", tag("1"), "1", judge="nope")


# --------------------------------------------------------------------------- router API


@pytest.mark.parametrize("alias, canonical", [
    ("multiple choice", "multiple_choice"), ("MCQ", "multiple_choice"), ("numeric", "numerical"),
    ("regression", "regression"), ("OCR", "ocr"), ("free-form", "open_ended"),
    ("yes/no", "boolean"), ("Spatial-Temporal Grounding", "spatial_temporal_grounding"),
])
def test_aliases(alias, canonical):
    assert rewards.canonical_type(alias) == canonical


def test_problem_types_lists_the_built_ins():
    assert rewards.PROBLEM_TYPES[:12] == (
        "multiple_choice", "numerical", "regression", "temporal_grounding",
        "spatial_grounding", "spatial_temporal_grounding", "open_ended", "math", "ocr",
        "boolean", "code", "preference")


def test_unknown_type_names_known_types_and_fallback_is_explicit():
    with pytest.raises(UnknownProblemType, match="multiple_choice.*numerical"):
        score("astrology", tag("B"), "B")
    assert isinstance(UnknownProblemType("x"), ValueError)
    r = score("astrology", tag("Paris"), "paris", fallback_type="open_ended")
    assert r.accuracy == 1.0
    r = score("astrology", tag("Paris"), "paris", cfg=RewardConfig(fallback_type="free-form"))
    assert r.accuracy == 1.0
    with pytest.raises(UnknownProblemType):
        score("astrology", tag("B"), "B", fallback_type="tarot")


def test_weights():
    r = score("numeric", tag("3"), 4)  # wrong but well formed: 0.9 * 0 + 0.1 * 1
    assert r.overall == pytest.approx(0.1)
    r = score("numeric", "3", 3, accuracy_weight=0.5, format_weight=0.5)  # untagged
    assert r.overall == pytest.approx(0.5)
    r = score("numeric", tag("3"), 4, cfg=RewardConfig(accuracy_weight=0.7, format_weight=0.3))
    assert r.overall == pytest.approx(0.3)
    with pytest.raises(ConfigError):
        score("numeric", tag("3"), 3, accuracy_weight=0.9, format_weight=0.2)


def test_unknown_kwargs_are_ignored():
    meta = {"video_id": "v1", "source": "x", "abs_tol": 0.5, "options": None}
    assert score("numeric", tag("3.4"), 3, **meta).accuracy == 1.0
    assert score("mcq", tag("B"), "B", **meta).accuracy == 1.0


def scaled_match(answer, solution, scale=1.0):  # no **kwargs: extra keywords are filtered
    return scale if answer.strip() == solution else Verdict(0.0, parsed=False)


@pytest.mark.usefixtures("clean_registry")
def test_register_a_new_type():
    rewards.register("exact_test_type", scaled_match, aliases=("exact-test",), replace=True)
    assert "exact_test_type" in rewards.PROBLEM_TYPES
    r = score("Exact-Test", tag("abc"), "abc", scale=0.5, unrelated=1)
    assert (r.accuracy, r.format) == (0.5, 1.0)
    r = score("exact_test_type", tag("xyz"), "abc")
    assert (r.accuracy, r.format) == (0.0, 0.5)
    with pytest.raises(ValueError, match="already"):
        rewards.register("exact_test_type", scaled_match)
    with pytest.raises(ValueError, match="already used"):
        rewards.register("another_type", scaled_match, aliases=("mcq",))


def broken_scorer(answer, solution, **kwargs):
    raise ZeroDivisionError("bug")


@pytest.mark.usefixtures("clean_registry")
def test_a_scorer_bug_scores_zero_instead_of_raising():
    rewards.register("broken_test_type", broken_scorer, replace=True)
    r = score("broken_test_type", tag("x"), "x")
    assert (r.overall, r.accuracy, r.format) == (0.05, 0.0, 0.5)


def test_result_is_frozen():
    r = score("numeric", tag("3"), 3)
    with pytest.raises(AttributeError):
        r.overall = 0.0  # type: ignore[misc]
