"""``math``: symbolic equivalence with math-verify, under a hard time limit.

math-verify limits itself with ``signal.alarm``, which only works in a process's main thread,
and sympy can run for minutes on a hostile expression. So verification runs in a long-lived
worker process (``_math_worker``), one per scoring process, fed one JSON line per check. When a
check exceeds ``timeout_s`` the worker is killed and a new one started at once, so the next
check finds it warming up; the timed-out answer scores 0 and counts as unparsed. A check waits
at most ``timeout_s`` for a starting worker (then scores 0 and leaves it starting), so no call
takes much more than twice ``timeout_s``.

Cost (docs/performance.md): a round trip is a fraction of a millisecond next to sympy's own
work; a kill and restart costs about one second of the worker's start-up, off the caller's
thread except for the next check that has to wait for it. Answers that equal the reference
text after trivial normalisation, or that are plain numbers of the same value, are accepted
without a round trip.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

from .base import InvalidSolution, Verdict

logger = logging.getLogger(__name__)

# The last part of a long answer is where the final expression is.
MAX_MATH_CHARS = 4000
# A worker not ready after this long is broken, not slow (sympy imports in ~1 s when idle).
STARTUP_TIMEOUT_S = 120.0
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding evr1/


class MathWorker:
    """A math-verify process that is restarted whenever a check overruns or it dies."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._ready = False
        self._buffer = b""
        self._owner = os.getpid()
        self._lock = threading.Lock()
        self._warned = False
        self._spawned_at = 0.0
        self.restarts = 0

    def check(self, gold: str, pred: str, timeout_s: float) -> dict[str, Any] | None:
        """math-verify's verdict, or None when it took longer than ``timeout_s``.

        A call never takes much more than 2 x ``timeout_s``: at most ``timeout_s`` waiting for
        a (re)starting worker to be ready, then at most ``timeout_s`` for the check.
        """
        with self._lock:
            try:
                if not self._ensure_started(timeout_s):
                    return None  # still warming up: score 0 now, keep the worker coming up
                request = {"gold": gold, "pred": pred, "inner_s": max(1, int(timeout_s / 3))}
                self._send(request)
                line = self._read_line(time.monotonic() + timeout_s)
                if line is not None:
                    return json.loads(line)
            except (OSError, ValueError, TimeoutError) as exc:
                # Not a slow answer but a broken worker (math-verify missing, out of memory):
                # say so once, since every math answer will now score 0.
                if not self._warned:
                    self._warned = True
                    logger.warning("math worker failed (%s); math answers score 0 until it "
                                   "works", exc)
            self._restart()
            return None

    def prestart(self) -> None:
        """Start the process now (without waiting for it), so the first check waits less."""
        with self._lock:
            if self._owner != os.getpid() or self._proc is None or self._proc.poll() is not None:
                self._owner = os.getpid()
                self._spawn()

    def _ensure_started(self, wait_s: float) -> bool:
        """Start the worker if needed; whether it is ready within ``wait_s``."""
        if self._owner != os.getpid():  # we are a fork: the parent's worker is not ours
            self._proc, self._ready, self._buffer, self._owner = None, False, b"", os.getpid()
        if self._proc is None or self._proc.poll() is not None:
            self._spawn()
        if not self._ready:
            if self._read_line(time.monotonic() + wait_s) is None:
                if time.monotonic() - self._spawned_at > STARTUP_TIMEOUT_S:
                    raise TimeoutError("math worker did not start")
                return False
            self._ready = True
        return True

    def _spawn(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH"))
                                            if p)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "evr1.rewards._math_worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=env, cwd=_PACKAGE_ROOT)
        self._ready, self._buffer, self._spawned_at = False, b"", time.monotonic()

    def _send(self, request: dict[str, Any]) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(request).encode() + b"\n")
        self._proc.stdin.flush()

    def _read_line(self, deadline: float) -> bytes | None:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise OSError("the math worker exited")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _restart(self) -> None:
        self.close()
        self.restarts += 1
        self._spawn()  # warm up in the background; the next check waits for "ready"

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and self._owner == os.getpid():
            proc.kill()
            proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()


_worker = MathWorker()
atexit.register(_worker.close)


def math_worker() -> MathWorker:
    return _worker


_warned: set[str] = set()


def _warn_once(gold: str) -> None:
    if len(_warned) < 1000 and gold not in _warned:
        _warned.add(gold)
        logger.warning("math: math-verify could not parse solution %r; it scores 0", gold[:200])


def _canonical(text: str) -> str:
    """Drop what never changes a value: spaces, $ signs, a \\boxed{} wrapper, a final period."""
    text = "".join(text.split()).strip("$").rstrip(".")
    if text.startswith("\\boxed{") and text.endswith("}"):
        text = text[len("\\boxed{"):-1]
    return text


_PLAIN_NUMBER = re.compile(r"(-?)(\d{1,30}(?:\.\d{1,30})?)(?:/(\d{1,30}))?")
_PLAIN_FRAC = re.compile(r"(-?)\\[dt]?frac\{(\d{1,30})\}\{(\d{1,30})\}")


def _plain_number(text: str) -> Fraction | None:
    """The exact value of a text that is only a number ("-12", "0.5", "3/4", "\\frac{3}{4}")."""
    m = _PLAIN_NUMBER.fullmatch(text) or _PLAIN_FRAC.fullmatch(text)
    if m is None:
        return None
    sign, num, den = m.groups()
    if den is not None and int(den) == 0:
        return None
    value = Fraction(num) / (int(den) if den is not None else 1)
    return -value if sign else value


def solution_expression(solution: Any) -> str:
    """The reference as text: a non-empty string or a number, else ``InvalidSolution``.

    Whether math-verify can parse it is only known in the worker (and may take long), so a
    text that it cannot read is logged when scored, not refused here.
    """
    if isinstance(solution, bool) or not isinstance(solution, (str, int, float)) \
            or not str(solution).strip():
        raise InvalidSolution(f"math: solution {solution!r:.200} is not an expression")
    return str(solution)


def check_math(solution: Any, **_: Any) -> None:
    """Raise ``InvalidSolution`` unless ``solution`` is a non-empty text or a number."""
    solution_expression(solution)


def score_math(answer: str, solution: Any, *, timeout_s: Any = 5.0, **_: Any) -> Verdict:
    gold = solution_expression(solution)
    pred = answer.strip()[-MAX_MATH_CHARS:]
    if not pred:
        return Verdict(0.0, parsed=False)
    canonical_pred, canonical_gold = _canonical(pred), _canonical(gold)
    if canonical_pred == canonical_gold:
        return Verdict(1.0, parsed=True, extracted=pred[:200])
    # Two plain numbers of equal value need no sympy ("0.5" and "\frac{1}{2}"); unequal ones
    # still go to math-verify, which has its own notion of numeric closeness.
    value = _plain_number(canonical_pred)
    if value is not None and value == _plain_number(canonical_gold):
        return Verdict(1.0, parsed=True, extracted=pred[:200])
    reply = _worker.check(gold, pred, float(timeout_s))
    if reply is None:
        return Verdict(0.0, parsed=False)
    if not reply.get("gold_parsed", True):
        # Not raised: a parse that timed out inside the worker looks the same as a bad one.
        _warn_once(gold)
    return Verdict(float(bool(reply["equal"])), parsed=bool(reply["parsed"]),
                   extracted=reply.get("extracted"))
