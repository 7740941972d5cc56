"""The parts that run other processes: the math worker, the code sandbox, batch scoring."""

from __future__ import annotations

import threading
import time

import pytest

import evr1.rewards as rewards
from evr1.config import RewardConfig
from evr1.rewards import InvalidSolution, UnknownProblemType, score, score_batch
from evr1.rewards.math import math_worker
from evr1.rewards.sandbox import run_tests

HANG = "<answer>9^{9^{9^{9}}}</answer>"  # sympy evaluates this for minutes


@pytest.fixture(autouse=True, scope="module")
def math_ready():
    # Start-up is not what these tests time; on a loaded machine it can exceed timeout_s.
    assert math_worker().check("1", "2", 120.0) is not None


# --------------------------------------------------------------------------- math worker


def test_math_hang_is_cut_at_the_time_limit_and_the_worker_recovers():
    assert score("math", "<answer>2</answer>", "1+1").accuracy == 1.0  # worker up and warm
    restarts = math_worker().restarts
    t0 = time.perf_counter()
    r = score("math", HANG, "1", timeout_s=1.0)
    elapsed = time.perf_counter() - t0
    assert (r.accuracy, r.format) == (0.0, 0.5)  # timed out: not credited, not parsed
    assert 0.9 < elapsed < 3.0
    assert math_worker().restarts == restarts + 1
    # The restarted worker imports sympy again first: on a loaded machine that alone can take
    # longer than the default timeout_s, which is not what this checks (recovery is).
    assert score("math", "<answer>(x+1)^2</answer>", "x^2+2x+1", timeout_s=120.0).accuracy == 1.0


def test_a_starting_worker_is_not_waited_for_beyond_the_time_limit():
    score("math", HANG, "1", timeout_s=1.0)  # the worker is killed and restarted
    restarts = math_worker().restarts
    t0 = time.perf_counter()
    r = score("math", "<answer>(x+1)^2</answer>", "x^2+2x+1", timeout_s=0.05)
    assert r.accuracy == 0.0 and time.perf_counter() - t0 < 0.5  # not ready yet: 0, at once
    assert math_worker().restarts == restarts  # ... and the starting worker is left alone
    assert score("math", "<answer>(x+1)^2</answer>", "x^2+2x+1", timeout_s=30).accuracy == 1.0


def test_math_works_off_the_main_thread():
    # math-verify's own signal-based timeout raises in threads; the worker process does not.
    results = []
    thread = threading.Thread(
        target=lambda: results.append(score("math", "<answer>\\sqrt{4}</answer>", "2")))
    thread.start()
    thread.join(timeout=60)
    assert results and results[0].accuracy == 1.0


def test_math_hang_in_a_thread_is_cut_too():
    results = []
    thread = threading.Thread(
        target=lambda: results.append(score("math", HANG, "1", timeout_s=1.0)))
    t0 = time.perf_counter()
    thread.start()
    thread.join(timeout=30)
    assert results and results[0].accuracy == 0.0 and time.perf_counter() - t0 < 5.0


def test_math_bad_solution_is_an_error():
    with pytest.raises(InvalidSolution):
        score("math", "<answer>1</answer>", None)


# --------------------------------------------------------------------------- sandbox
# The attacks on it are in test_sandbox_attacks.py; these are the ordinary cases.


def test_sandbox_counts_passing_tests():
    code = "def sq(x):\n    return x * x\n"
    tests = ["assert sq(2) == 4", "assert sq(3) == 10", "assert sq(-1) == 1"]
    r = run_tests(code, tests)
    assert (r.passed, r.total, r.timed_out) == (2, 3, False)


def test_sandbox_code_that_fails_passes_nothing():
    assert run_tests("raise SystemExit(0)", ["assert True"]).passed == 0
    assert run_tests("def f(:", ["assert True"]).passed == 0


def test_sandbox_limits_memory_and_files():
    # 2 GiB written (not just reserved) against the box's 1 GiB: the box's Python is killed.
    assert run_tests("x = b'x' * (2 << 30)", ["assert True"]).passed == 0
    assert run_tests("open('big', 'wb').write(b'0' * (64 << 20))", ["assert True"]).passed == 0
    assert run_tests("x = bytearray(64 << 20)", ["assert len(x) == 64 << 20"]).passed == 1


def test_sandbox_allows_processes_inside_the_box():
    # Processes are no longer refused one wrapper at a time: they run inside the box, under
    # its limits, and die with it.
    code = ("import subprocess\n"
            "out = subprocess.run(['/bin/sh', '-c', 'echo $((6 * 7))'], capture_output=True)\n")
    assert run_tests(code, ["assert out.stdout == b'42\\n'"]).passed == 1


def test_sandbox_has_no_network():
    code = ("import socket\n"
            "try:\n"
            "    socket.create_connection(('127.0.0.1', 22), timeout=1)\n"
            "    reached = True\n"
            "except Exception:\n"
            "    reached = False\n"
            "names = socket.if_nameindex()\n")
    assert run_tests(code, ["assert not reached", "assert [n for _, n in names] == ['lo']"]
                     ).passed == 2


def test_sandbox_runs_in_an_empty_private_tmp():
    r = run_tests("import os\ncwd = os.getcwd()\nfiles = os.listdir('.')\nuid = os.getuid()",
                  ["assert cwd == '/tmp'", "assert files == []", "assert uid == 65534"])
    assert r.passed == 3


def test_printed_result_lines_earn_nothing():
    code = ("import os, sys\n"
            "for i in range(5):\n"
            "    print('{\"t\": %d, \"v\": []}' % i)\n"
            "sys.__stdout__.write('{\"t\": 0, \"v\": []}\\n')\n")
    assert run_tests(code, ["assert False"]).passed == 0


# --------------------------------------------------------------------------- batch


def _items():
    return [
        {"problem_type": "mcq", "response": "<answer>B</answer>", "solution": "B",
         "options": ["a", "b", "c"]},
        {"problem_type": "numeric", "response": "<answer>10.4</answer>", "solution": 10,
         "meta": {"abs_tol": 0.5, "video": "v.mp4"}},
        {"problem_type": "regression", "response": "<answer>9</answer>", "solution": 10},
        {"problem_type": "OCR", "response": "<answer>the quick brown dog</answer>",
         "solution": "the quick brown fox"},
        {"problem_type": "math", "response": "<answer>\\frac{1}{2}</answer>", "solution": "0.5"},
        {"problem_type": "yes/no", "response": "no", "solution": "yes"},
    ] * 3


EXPECTED_ACCURACY = [1.0, 1.0, 0.8, 0.75, 1.0, 0.0] * 3


def test_score_batch_in_process_matches_score():
    batch = score_batch(_items(), RewardConfig())
    assert [r.accuracy for r in batch.results] == pytest.approx(EXPECTED_ACCURACY)
    single = score("numeric", "<answer>10.4</answer>", 10, abs_tol=0.5)
    assert batch.results[1] == single
    assert batch.count_by_type == {"multiple_choice": 3, "numerical": 3, "regression": 3,
                                   "ocr": 3, "math": 3, "boolean": 3}
    assert set(batch.seconds_by_type) == set(batch.count_by_type)
    assert all(v > 0 for v in batch.samples_per_s().values())


def local_only_type(answer, solution):
    return 1.0


@pytest.mark.usefixtures("clean_registry")
def test_score_batch_in_worker_processes():
    rewards.register("lambda_test_type", lambda answer, solution: 0.25, replace=True)
    rewards.register("module_test_type", local_only_type, replace=True)
    items = _items() + [
        {"problem_type": "lambda_test_type", "response": "<answer>x</answer>", "solution": 1},
        {"problem_type": "module_test_type", "response": "<answer>x</answer>", "solution": 1},
    ]
    try:
        batch = score_batch(items, RewardConfig(num_workers=2))
        again = score_batch(items, RewardConfig(num_workers=2))  # the pool is reused
    finally:
        rewards.shutdown_pool()
    assert [r.accuracy for r in batch.results] == pytest.approx(EXPECTED_ACCURACY + [0.25, 1.0])
    assert again.results == batch.results
    assert batch.results[:18] == score_batch(_items()).results


def test_score_batch_checks_every_type_first():
    items = _items() + [{"problem_type": "astrology", "response": "x", "solution": "y"}]
    with pytest.raises(UnknownProblemType, match="astrology"):
        score_batch(items, RewardConfig(num_workers=2))
    batch = score_batch(items, RewardConfig(fallback_type="open_ended"))
    assert batch.count_by_type["open_ended"] == 1
