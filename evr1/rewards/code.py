"""``code``: Python, HTML and SVG answers.

The code is the first fenced block (```python ... ```) of the answer if it has one, else the
whole answer. Its language is that of the reference solution (``language=`` overrides):
SVG if it holds an ``<svg`` tag, HTML if it starts with a tag or holds ``<html`` or
``<!doctype``, else Python.

Structural similarity (default), in [0, 1]:
    0.5 * structure F1 + 0.5 * lexical F1
where each F1 is the mean over n = 1, 2, 3 of the F1 of n-gram multisets (precision: share of
the answer's n-grams found in the reference; recall: the reverse):
  * Python structure: the AST node types in pre-order ("FunctionDef arguments arg Return
    BinOp ..."): same program shape, any names. An answer that does not parse has structure 0.
  * HTML/SVG structure: the tag sequence, with attribute names ("<svg", "svg@width", "<circle",
    "circle@cx", "</svg"...), read with the tolerant ``html.parser``.
  * Lexical: word and symbol tokens of the code (identifiers, literals, attribute values).
N-gram multisets make it linear in the code length (no quadratic sequence alignment).

Execution (``code_execution=True`` and ``tests`` given, Python only): the code runs in a
bubblewrap box (``evr1.rewards.sandbox``) and the accuracy is the fraction of tests (one
``assert <expression>`` each) that hold. Only the parts of a test that call into the code run
in the box; the assert itself is checked here on the plain values that come back
(``evr1.rewards.asserts``), so the code cannot forge a pass.

Format: well formed when the code parses as its language (Python: ``ast.parse``; SVG: an
``<svg>`` element; HTML: at least one tag).
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from html.parser import HTMLParser
from typing import Any

from .asserts import plan_tests
from .base import InvalidSolution, RewardInputError, Verdict
from .sandbox import MAX_TESTS, SandboxLimits, require_sandbox, run_tests

MAX_CODE_CHARS = 20_000
MAX_UNITS = 5_000  # tokens or nodes per side fed to the n-gram counts
NGRAM_SIZES = (1, 2, 3)

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[ \t]*\n(.*?)```", re.DOTALL)
_LEX = re.compile(r"\w+|[^\w\s]")


def extract_code(answer: str) -> str:
    """The first fenced block's body, else the whole text."""
    m = _FENCE.search(answer[:MAX_CODE_CHARS])
    return (m.group(2) if m else answer[:MAX_CODE_CHARS]).strip()


def detect_language(reference: str) -> str:
    low = reference.lower()
    if "<svg" in low:
        return "svg"
    # "a<b" is Python; markup starts with a tag or declares itself.
    if low.lstrip().startswith("<") or "<html" in low or "<!doctype" in low:
        return "html"
    return "python"


# --------------------------------------------------------------------------- units


def python_nodes(code: str) -> list[str] | None:
    """AST node type names in pre-order, or None if the code does not parse."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    names: list[str] = []
    stack: list[ast.AST] = [tree]
    while stack and len(names) < MAX_UNITS:  # explicit stack: deep trees cannot overflow
        node = stack.pop()
        names.append(type(node).__name__)
        stack.extend(reversed(list(ast.iter_child_nodes(node))))
    return names


class _TagCollector(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.units: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if len(self.units) < MAX_UNITS:
            self.units.append("<" + tag)
            self.units.extend(f"{tag}@{name}" for name, _ in attrs)
            self.text.extend(value for _, value in attrs if value)

    def handle_endtag(self, tag: str) -> None:
        if len(self.units) < MAX_UNITS:
            self.units.append("</" + tag)

    def handle_data(self, data: str) -> None:
        if len(self.text) < MAX_UNITS:
            self.text.append(data)


def markup_units(code: str) -> tuple[list[str], str]:
    """Tag units and the text/attribute-value content of HTML or SVG."""
    parser = _TagCollector()
    try:
        parser.feed(code)
        parser.close()
    except Exception:  # html.parser is tolerant, but stay safe on any input
        pass
    return parser.units, " ".join(parser.text)


def lexical_units(code: str) -> list[str]:
    return _LEX.findall(code)[:MAX_UNITS]


# --------------------------------------------------------------------------- similarity


def ngram_f1(pred: Sequence[str], ref: Sequence[str]) -> float:
    """Mean over NGRAM_SIZES of the F1 between n-gram multisets."""
    if not pred or not ref:
        return 0.0
    scores = []
    for n in NGRAM_SIZES:
        p = Counter(tuple(pred[i:i + n]) for i in range(len(pred) - n + 1))
        r = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
        if not p or not r:  # sequences shorter than n: compare what exists
            scores.append(1.0 if tuple(pred) == tuple(ref) else 0.0)
            continue
        overlap = sum((p & r).values())
        precision, recall = overlap / sum(p.values()), overlap / sum(r.values())
        scores.append(0.0 if overlap == 0 else 2 * precision * recall / (precision + recall))
    return sum(scores) / len(scores)


def similarity(code: str, reference: str, language: str) -> tuple[float, bool]:
    """Structural similarity in [0, 1] and whether ``code`` parses as ``language``."""
    if language == "python":
        pred_nodes, ref_nodes = python_nodes(code), python_nodes(reference) or []
        structure = ngram_f1(pred_nodes, ref_nodes) if pred_nodes is not None else 0.0
        lexical = ngram_f1(lexical_units(code), lexical_units(reference))
        return 0.5 * structure + 0.5 * lexical, pred_nodes is not None and bool(code.strip())
    pred_units, pred_text = markup_units(code)
    ref_units, ref_text = markup_units(reference)
    structure = ngram_f1(pred_units, ref_units)
    lexical = ngram_f1(lexical_units(pred_text), lexical_units(ref_text))
    if not ref_text.strip() and not pred_text.strip():
        lexical = structure  # pure markup on both sides: nothing lexical to compare
    parsed = "<svg" in pred_units and "</svg" in pred_units if language == "svg" \
        else bool(pred_units)
    return 0.5 * structure + 0.5 * lexical, parsed


def _test_lines(tests: Any) -> list[str]:
    if isinstance(tests, str):
        return [line for line in tests.splitlines() if line.strip()]
    if isinstance(tests, Sequence):
        return [str(t) for t in tests if str(t).strip()]
    return []


def _limits(sandbox: Any, timeout_s: Any) -> SandboxLimits:
    """The configured box limits (``RewardConfig``'s, passed by the router) at this timeout."""
    base = sandbox if isinstance(sandbox, SandboxLimits) else SandboxLimits()
    return replace(base, wall_s=float(timeout_s))


def _executes(reference: str, tests: Any, code_execution: bool, language: str | None
              ) -> list[str]:
    """The tests to run in the sandbox, or [] when this sample is scored by similarity."""
    lines = _test_lines(tests)
    lang = language or detect_language(reference)
    return lines if code_execution and lines and lang == "python" else []


def _reference(solution: Any, tests: Any, code_execution: bool,
               language: str | None) -> tuple[str, str, list[str]]:
    """The reference code, its language and the test lines that will run in the sandbox."""
    if not isinstance(solution, str) or not solution.strip():
        raise InvalidSolution(f"code: solution {solution!r:.200} is not reference code")
    reference = extract_code(solution)
    lang = language or detect_language(reference)
    if lang not in ("python", "html", "svg"):
        raise RewardInputError(f"code: language must be python, html or svg, got {lang!r}")
    return reference, lang, _executes(reference, tests, code_execution, lang)


def check_code(solution: Any, *, tests: Any = None, code_execution: bool = False,
               language: str | None = None, **_: Any) -> list[str]:
    """The sample's own check (the reward registry's, so ``python -m evr1.data.schema`` runs
    it): reference code in a language the scorer knows, and tests it can check (each a single
    assert). Returns the test lines that will run in the sandbox (none: similarity only)."""
    lines = _reference(solution, tests, code_execution, language)[2]
    if lines:
        plan_tests(lines[:MAX_TESTS])
    return lines


def check_code_sample(solution: Any, *, timeout_s: Any = 5.0, sandbox: Any = None,
                      **kwargs: Any) -> None:
    """Before training: raise if this sample cannot be scored here.

    ``InvalidSolution`` for a reference or a test the scorer cannot use (:func:`check_code`),
    ``SandboxUnavailable`` when its tests need a sandbox this machine cannot start (no bwrap,
    no user namespaces, no cgroups in "cgroup" mode).
    """
    if check_code(solution, **kwargs):
        require_sandbox(_limits(sandbox, timeout_s))


def score_code(answer: str, solution: Any, *, tests: Any = None, code_execution: bool = False,
               timeout_s: Any = 5.0, language: str | None = None, sandbox: Any = None,
               **_: Any) -> Verdict:
    reference, lang, lines = _reference(solution, tests, code_execution, language)
    code = extract_code(answer)
    if not code:
        return Verdict(0.0, parsed=False)
    score, parsed = similarity(code, reference, lang)
    if lines:
        score = run_tests(code, lines, _limits(sandbox, timeout_s)).fraction
    return Verdict(score, parsed=parsed, extracted=code[:200])
