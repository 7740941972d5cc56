"""Assert tests split so that model-written code cannot forge their verdict.

A test is one ``assert <expression>`` (``assert add(1, 2) == 3``). Running the whole assert
next to the model's code lets that code decide the outcome (walk the frames into the harness,
return an object whose ``__eq__`` is always True, patch the harness...). So a test is split:

* **probes**: the smallest parts of the expression that need the model's code: every
  subexpression that refers to a name that is not a Python builtin (``add(1, 2)``,
  ``obj.size``, ``[f(i) for i in range(3)]``), or a known function of one such part alone
  (``len(x)``). Only these run in the sandbox, which sends back their values as plain data
  (JSON); the expected side (``3``) never enters the sandbox;
* **the check**: the rest of the expression with each probe replaced by its value
  (``__probe0 == 3``), evaluated here, in the trainer, by a small interpreter over plain
  Python values (comparisons, arithmetic with size guards, ``len``, ``sorted``, ``abs``,
  ``math.isclose``...), never by ``eval``.

So the code can only choose the values of expressions that it computes anyway: printing fake
results or an always-equal object earns nothing more than returning those values honestly,
and a value that is not plain data (a custom class, a generator) fails the test.

A part of the test that the check cannot evaluate and that does not refer to the model's
names (a comprehension over ``range`` on the expected side) is rejected as a sample error:
evaluating it in the sandbox would let the model's code choose the expected value.
"""

from __future__ import annotations

import ast
import builtins
import functools
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .base import InvalidSolution

PROBE_PREFIX = "__probe"
MAX_TEST_CHARS = 4_000
MAX_PROBES = 32
_MAX_SIZE = 1_000_000  # elements of a sequence, or bits of an int, that the check may build

# Functions and values a test may use outside the model's code (they mean the builtin).
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    f.__name__: f for f in (abs, all, any, bool, dict, float, frozenset, int, isinstance, len,
                            list, max, min, round, set, sorted, str, sum, tuple, type)}
_FUNCTIONS["NoneType"] = type(None)
_MATH = {name: getattr(math, name) for name in (
    "isclose", "isnan", "isinf", "isfinite", "fabs", "floor", "ceil", "sqrt", "pi", "e", "inf",
    "nan", "log", "exp", "trunc", "gcd")}
KNOWN_NAMES = frozenset(_FUNCTIONS) | {"math"}
# Other builtin names are not the answer's either: a part of a test that uses only builtins
# (``[x * x for x in range(3)]``) is the expected side, and must not be sent to the sandbox.
_BUILTINS = frozenset(dir(builtins))

_COMPARE: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not,
    ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b}
_UNARY: dict[type, Callable[[Any], Any]] = {
    ast.Not: operator.not_, ast.USub: operator.neg, ast.UAdd: operator.pos}
_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow, ast.BitAnd: operator.and_, ast.BitOr: operator.or_,
    ast.BitXor: operator.xor, ast.LShift: operator.lshift, ast.RShift: operator.rshift}
# Nodes the check evaluates itself; their children may be probes.
_CHECK_NODES = (ast.Compare, ast.BoolOp, ast.UnaryOp, ast.BinOp, ast.IfExp, ast.Constant,
                ast.List, ast.Tuple, ast.Set, ast.Dict, ast.Subscript, ast.Slice, ast.Call,
                ast.Name, ast.Attribute, ast.keyword)


@dataclass(frozen=True)
class TestPlan:
    """One assert test: what runs in the sandbox and what is checked here."""

    source: str
    probes: tuple[str, ...]  # expressions evaluated after the model's code, in order
    check: ast.expr  # the assert's condition, probes replaced by Name(__probe<i>)


class _Splitter(ast.NodeTransformer):
    def __init__(self, source: str) -> None:
        self.source = source
        self.probes: list[str] = []

    def visit(self, node: ast.AST) -> ast.AST:
        if not isinstance(node, (ast.expr, ast.keyword)):
            return node  # operators and load/store contexts
        if isinstance(node, ast.Attribute) and _is_check_node(node):
            return node  # math.<name>: nothing inside to split
        if _is_check_node(node) and not _wraps_one_probe(node):
            return self.generic_visit(node)
        if not _answer_names(node):
            raise InvalidSolution(
                f"code: test {self.source!r:.200} uses {type(node).__name__} "
                f"({ast.unparse(node)[:80]!r}) outside the answer's code; a test may use "
                "comparisons, arithmetic, literals, subscripts and " +
                ", ".join(sorted(KNOWN_NAMES)) + " around calls into the answer "
                "(see docs/rewards.md)")
        if not _is_answer_path(node):
            raise InvalidSolution(
                f"code: test {self.source!r:.200}: {ast.unparse(node)[:80]!r} mixes the "
                "answer's code with other operations, which would have to run next to the "
                "answer; keep the answer's calls apart and compare outside them, e.g. "
                "`f(x) == y`, `[f(i) for i in range(3)] == [...]` (see docs/rewards.md)")
        if len(self.probes) >= MAX_PROBES:
            raise InvalidSolution(f"code: test {self.source!r:.200} has more than "
                                  f"{MAX_PROBES} calls into the answer")
        self.probes.append(ast.unparse(node))
        return ast.copy_location(ast.Name(f"{PROBE_PREFIX}{len(self.probes) - 1}", ast.Load()),
                                 node)


def _is_check_node(node: ast.AST) -> bool:
    """Whether the check evaluates ``node`` itself (its operands may still be probes)."""
    if isinstance(node, ast.Name):
        return node.id in KNOWN_NAMES and node.id != "math"
    if isinstance(node, ast.Attribute):  # math.pi, math.isclose
        return isinstance(node.value, ast.Name) and node.value.id == "math" and \
            node.attr in _MATH
    if isinstance(node, ast.Call):  # len(...), math.isclose(...): a known function
        return _is_check_node(node.func)
    if isinstance(node, (ast.BinOp, ast.UnaryOp)):
        return type(node.op) in _BINARY or type(node.op) in _UNARY
    return isinstance(node, _CHECK_NODES) and not isinstance(node, ast.Starred)


def _answer_names(node: ast.AST) -> set[str]:
    """Names in ``node`` that can only come from the answer's code."""
    return _free_names(node) - KNOWN_NAMES - _BUILTINS


def _wraps_one_probe(node: ast.AST) -> bool:
    """``len(x)``, ``sorted(f(a))``: a known function of one probe and nothing else.

    Run whole in the sandbox, so that it also works on values that are not plain data (a
    bytearray, a generator, the answer's own class). It gives the code no more say than the
    probe alone (whose value it chooses anyway), and no test data enters the box with it.
    """
    return isinstance(node, ast.Call) and len(node.args) == 1 and not node.keywords and \
        not isinstance(node.args[0], ast.Starred) and \
        not _is_check_node(node.args[0]) and bool(_answer_names(node.args[0])) and \
        _is_answer_path(node.args[0])


def _is_answer_path(node: ast.AST, bound: frozenset[str] = frozenset()) -> bool:
    """Whether ``node`` may run in the sandbox: its value is the answer's alone.

    The answer's names, attributes, subscripts and calls (``Stack().push(1).items[0]``; the
    arguments are inputs and may hold anything), a builtin of one such value (``len(x)``,
    ``list(gen())``), and a comprehension without conditions whose elements are such values
    (``[f(i) for i in range(3)]``). Not a comparison, arithmetic, a condition or a lambda
    around the answer's values: test data could meet them there (``all(f(x) == y for x, y
    in pairs)``), and the code would only have to claim ``True``.
    """
    if isinstance(node, ast.Name):
        return node.id in bound or (node.id not in KNOWN_NAMES and node.id not in _BUILTINS)
    if isinstance(node, (ast.Attribute, ast.Subscript)):
        return _is_answer_path(node.value, bound)
    if isinstance(node, ast.Call):
        if _is_answer_path(node.func, bound):
            return True
        return isinstance(node.func, ast.Name) and node.func.id in _BUILTINS and \
            len(node.args) == 1 and not node.keywords and \
            not isinstance(node.args[0], ast.Starred) and _is_answer_path(node.args[0], bound)
    if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
        if any(g.ifs or g.is_async for g in node.generators):
            return False
        inner = bound | {n.id for g in node.generators for n in ast.walk(g.target)
                         if isinstance(n, ast.Name)}
        parts = [node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]
        return all(_is_answer_path(p, inner) for p in parts)
    return False


def _free_names(node: ast.AST) -> set[str]:
    """Names read in ``node`` that it does not bind itself (comprehension targets, lambdas)."""
    loaded, bound = set(), set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            (loaded if isinstance(sub.ctx, ast.Load) else bound).add(sub.id)
        elif isinstance(sub, ast.arg):
            bound.add(sub.arg)
    return loaded - bound


@functools.lru_cache(maxsize=4096)  # a group's n responses share their tests
def plan_test(source: str) -> TestPlan:
    """Split one test; raises ``InvalidSolution`` (a sample error) if it is not supported."""
    if len(source) > MAX_TEST_CHARS:
        raise InvalidSolution(f"code: test {source[:200]!r}... is over {MAX_TEST_CHARS} chars")
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError) as exc:
        raise InvalidSolution(f"code: test {source!r:.200} does not parse: {exc}") from None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
        raise InvalidSolution(
            f"code: test {source!r:.200} is not a single `assert <expression>`; only assert "
            "tests can be checked without trusting the answer's code (see docs/rewards.md)")
    splitter = _Splitter(source)
    check = splitter.visit(tree.body[0].test)
    return TestPlan(source, tuple(splitter.probes), check)


def plan_tests(sources: Sequence[str]) -> list[TestPlan]:
    return [plan_test(s) for s in sources]


# --------------------------------------------------------------------------- the check


class _Missing(Exception):
    """A probe raised or returned something that is not plain data."""


def passes(plan: TestPlan, values: Sequence[tuple[bool, Any]]) -> bool:
    """Whether the assert holds, given each probe's (ok, value) as sent back by the sandbox.

    A probe that failed makes the test fail only when the check needs its value (as Python
    would: ``x == 1 or f()`` does not call ``f`` when ``x == 1``).
    """
    if len(values) != len(plan.probes):
        return False
    try:
        return bool(_Eval(values).eval(plan.check))
    except Exception:  # the assert raised, or the check refused an operation: not passed
        return False


class _Eval:
    def __init__(self, values: Sequence[tuple[bool, Any]]) -> None:
        self.values = values

    def eval(self, node: ast.AST) -> Any:
        method = getattr(self, "_" + type(node).__name__, None)
        if method is None:  # plan_test only builds what is handled here
            raise TypeError(f"{type(node).__name__} is not evaluated by the check")
        return method(node)

    def _Constant(self, node: ast.Constant) -> Any:
        return node.value

    def _Name(self, node: ast.Name) -> Any:
        if node.id.startswith(PROBE_PREFIX):
            ok, value = self.values[int(node.id[len(PROBE_PREFIX):])]
            if not ok:
                raise _Missing(node.id)
            return value
        return _FUNCTIONS[node.id]

    def _Attribute(self, node: ast.Attribute) -> Any:
        return _MATH[node.attr]

    def _List(self, node: ast.List) -> list:
        return [self.eval(e) for e in node.elts]

    def _Tuple(self, node: ast.Tuple) -> tuple:
        return tuple(self.eval(e) for e in node.elts)

    def _Set(self, node: ast.Set) -> set:
        return {self.eval(e) for e in node.elts}

    def _Dict(self, node: ast.Dict) -> dict:
        if any(k is None for k in node.keys):
            raise TypeError("** in a dict display")
        return {self.eval(k): self.eval(v) for k, v in zip(node.keys, node.values, strict=True)}

    def _Subscript(self, node: ast.Subscript) -> Any:
        return self.eval(node.value)[self.eval(node.slice)]

    def _Slice(self, node: ast.Slice) -> slice:
        return slice(*(None if p is None else self.eval(p)
                       for p in (node.lower, node.upper, node.step)))

    def _IfExp(self, node: ast.IfExp) -> Any:
        return self.eval(node.body) if self.eval(node.test) else self.eval(node.orelse)

    def _BoolOp(self, node: ast.BoolOp) -> Any:
        value: Any = None
        for operand in node.values:
            value = self.eval(operand)
            if isinstance(node.op, ast.And) != bool(value):
                return value
        return value

    def _UnaryOp(self, node: ast.UnaryOp) -> Any:
        return _UNARY[type(node.op)](self.eval(node.operand))

    def _Compare(self, node: ast.Compare) -> bool:
        left = self.eval(node.left)
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = self.eval(right_node)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True

    def _BinOp(self, node: ast.BinOp) -> Any:
        a, b = self.eval(node.left), self.eval(node.right)
        _guard_size(type(node.op), a, b)
        return _BINARY[type(node.op)](a, b)

    def _Call(self, node: ast.Call) -> Any:
        fn = self.eval(node.func)
        args = []
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                raise TypeError("*args in a test")
            args.append(self.eval(arg))
        kwargs = {}
        for kw in node.keywords:
            if kw.arg is None:
                raise TypeError("**kwargs in a test")
            kwargs[kw.arg] = self.eval(kw.value)
        if fn is round and len(args) == 2 and isinstance(args[1], int) and \
                abs(args[1]) > 10_000:  # round(x, -10**9) computes 10**(10**9)
            raise OverflowError("round to too many digits")
        return fn(*args, **kwargs)


def _guard_size(op: type, a: Any, b: Any) -> None:
    """Refuse arithmetic whose result would be huge: values come from the model's code."""
    if op is ast.Mult:
        for seq, n in ((a, b), (b, a)):
            if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int) and \
                    len(seq) * n > _MAX_SIZE:
                raise OverflowError("sequence repetition too large")
    if op is ast.Pow and isinstance(a, int) and isinstance(b, int) and \
            abs(b) * max(1, abs(a).bit_length()) > _MAX_SIZE:
        raise OverflowError("power too large")
    if op is ast.LShift and isinstance(b, int) and b > _MAX_SIZE:
        raise OverflowError("shift too large")
    if op is ast.Mod and isinstance(a, (str, bytes)):  # '%0999999999d' % 1
        raise TypeError("printf-style formatting in a test")
