"""Reward scoring throughput per problem type, in-process vs a pool of worker processes.

A deterministic mixed batch of ``--n`` responses (default 10,000) spread evenly over the twelve
built-in types: right, wrong, untagged and garbage answers, most after a <think> block of
50-400 words, as a rollout would produce. Code answers are scored by similarity; the sandbox is
timed separately (``--exec`` responses), as are math-verify's costs of isolation.

Columns (wall clock, best of ``--repeats`` runs, the two modes taking turns):
  in-process   samples/s of ``score_batch(items, RewardConfig(num_workers=0))``: each type's
               items as a batch of their own, then the whole mixed batch;
  workers=N    the same with ``num_workers=N`` (a warm pool of spawned processes);
  ratio        workers / in-process.

    python benchmarks/rewards.py [--n 10000] [--workers 2] [--repeats 3] [--exec 40]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evr1.config import RewardConfig  # noqa: E402
from evr1.rewards import BUILTIN_TYPES, score, score_batch, shutdown_pool  # noqa: E402
from evr1.rewards.math import math_worker  # noqa: E402

WORDS = ("the video shows a person walking toward a red car then frame second object moves "
         "left right camera pans so we count answer because first next finally").split()
OPTIONS = ["red", "green", "blue", "yellow"]
REF_CODE = ("def moving_average(xs, k):\n    out = []\n    for i in range(len(xs) - k + 1):\n"
            "        out.append(sum(xs[i:i + k]) / k)\n    return out\n")
SVG = ('<svg width="64" height="64"><rect x="4" y="4" width="20" height="20" fill="red"/>'
       '<circle cx="40" cy="40" r="12" fill="blue"/></svg>')
LONG_REF = "a man in a red jacket rides a bicycle along the river and stops near a bridge"


def _answers(t: str, rng: random.Random) -> tuple[Any, list[str], dict[str, Any]]:
    """(solution, [right, wrong, other] answer texts, options) for one sample of type ``t``."""
    if t == "multiple_choice":
        gold = rng.choice("ABCD")
        wrong = rng.choice([c for c in "ABCD" if c != gold])
        return gold, [f"({gold})", f"The answer is {wrong}", OPTIONS["ABCD".index(gold)]], \
            {"options": OPTIONS}
    if t in ("numerical", "regression"):
        gold = round(rng.uniform(1, 500), 1)
        return gold, [f"{gold}", f"{gold * rng.uniform(0.5, 1.5):.1f} meters",
                      f"about {int(gold):,}"], {}
    if t == "temporal_grounding":
        s = round(rng.uniform(0, 60), 1)
        e = round(s + rng.uniform(1, 20), 1)
        return [s, e], [f"[{s}, {e}]", f"[{s + 3:.1f}, {e + 5:.1f}]",
                        f"from {s} to {e} seconds"], {}
    if t == "spatial_grounding":
        x, y = rng.uniform(0, 0.5), rng.uniform(0, 0.5)
        box = [round(v, 3) for v in (x, y, x + 0.3, y + 0.3)]
        moved = [round(v + 0.1, 3) for v in box]
        return box, [str(box), str(moved), f'{{"bbox_2d": {box}, "label": "car"}}'], {}
    if t == "spatial_temporal_grounding":
        boxes = {str(s): [0.1, 0.1, 0.4 + 0.01 * s, 0.5] for s in range(2, 8)}
        gold = {"span": [2, 8], "boxes": boxes}
        half = {"span": [4, 9], "boxes": dict(list(boxes.items())[2:])}
        return gold, [json.dumps(gold), json.dumps(half), "[2, 8]"], {}
    if t == "open_ended":
        if rng.random() < 0.5:
            return "bicycle", ["a bicycle", "a car", "the bike"], {}
        return LONG_REF, [LONG_REF, "a person in a jacket walks by the river near a car",
                          "a man rides a bike"], {}
    if t == "math":
        a, b = rng.randint(1, 9), rng.randint(2, 9)
        return f"\\frac{{{a}}}{{{b}}}", [f"{a}/{b}", f"\\frac{{{a + 1}}}{{{b}}}",
                                        f"(x+{a})^2 - x^2 - {2 * a}x"], {}
    if t == "ocr":
        ref = " ".join(rng.choice(WORDS) for _ in range(8))
        noisy = ref.replace("the", "teh")
        return ref, [ref, noisy, ref.upper()], {}
    if t == "boolean":
        gold = rng.choice(["yes", "no"])
        return gold, [gold.capitalize(), "no" if gold == "yes" else "yes", f"I think {gold}."], {}
    if t == "code":
        if rng.random() < 0.5:
            return SVG, [SVG, SVG.replace("circle", "ellipse"), "<svg></svg>"], {}
        renamed = REF_CODE.replace("xs", "values").replace("out", "result")
        return REF_CODE, [f"```python\n{REF_CODE}```", renamed, "print('hi')"], {}
    if t == "preference":
        gold = rng.choice(["1", "2", "tie"])
        return gold, [f"Response {gold}" if gold != "tie" else "tie", "[[A]]",
                      "Response 2 is better"], {}
    raise ValueError(t)


def make_batch(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    items = []
    for i in range(n):
        t = BUILTIN_TYPES[i % len(BUILTIN_TYPES)]
        solution, answers, extra = _answers(t, rng)
        answer = rng.choice(answers)
        think = " ".join(rng.choice(WORDS) for _ in range(rng.randint(50, 400)))
        shape = rng.random()
        if shape < 0.7:
            response = f"<think>{think}</think>\n<answer>{answer}</answer>"
        elif shape < 0.85:
            response = f"{think} So the answer is {answer}"
        elif shape < 0.95:
            response = f"<think>{think}</think><answer>{think[:80]}</answer>"
        else:
            response = "".join(rng.choice("<>()[]{}/\\$0123456789ab ") for _ in range(500))
        items.append({"problem_type": t, "response": response, "solution": solution, **extra})
    return items


def best_wall(items: list[dict[str, Any]], modes: list[int], repeats: int
              ) -> tuple[dict[int, float], dict[int, Any]]:
    """Best wall seconds per mode, modes taking turns so that load changes hit both alike."""
    best: dict[int, float] = {m: float("inf") for m in modes}
    last: dict[int, Any] = {}
    for _ in range(repeats):
        for m in modes:
            t0 = time.perf_counter()
            last[m] = score_batch(items, RewardConfig(num_workers=m))
            best[m] = min(best[m], time.perf_counter() - t0)
    return best, last


def math_isolation_costs(rounds: int = 200) -> list[str]:
    """What the worker process costs next to calling math-verify in this process."""
    from evr1.rewards._math_worker import check

    worker = math_worker()

    def per_call(fn: Any, pairs: list[tuple[str, str]]) -> float:
        t0 = time.perf_counter()
        for gold, pred in pairs:
            fn(gold, pred, 5)
        return (time.perf_counter() - t0) / len(pairs) * 1e3

    check("1", "1", 5)  # imports in this process, outside the timing
    trivial = [("1", "1")] * rounds  # cached by math-verify: almost only the round trip
    direct_rt, worker_rt = per_call(check, trivial), per_call(worker.check, trivial)
    # Fresh expressions for each side, so neither profits from the other's caches.
    direct = per_call(check, [(f"\\frac{{{i}}}{{7}}", f"{i}/7 + 0") for i in range(rounds)])
    isolated = per_call(worker.check, [(f"\\frac{{{i}}}{{9}}", f"{i}/9 + 0")
                                       for i in range(rounds)])
    hang = "<answer>9^{9^{9^{9}}}</answer>"
    t0 = time.perf_counter()
    score("math", hang, "1", timeout_s=1.0)
    cut = time.perf_counter() - t0
    t0 = time.perf_counter()
    score("math", "<answer>(x+1)^2</answer>", "x^2+2x+1")  # needs the worker
    after = time.perf_counter() - t0
    return [
        f"math check of a cached pair: {direct_rt:.2f} ms in this process, {worker_rt:.2f} ms "
        f"through the worker (round trip {worker_rt - direct_rt:+.2f} ms)",
        f"math check of fresh fractions: {direct:.2f} ms in this process, {isolated:.2f} ms "
        f"through the worker",
        f"a hanging check with timeout_s=1 returned after {cut:.2f} s; the next check waited "
        f"{after:.2f} s for the restarted worker",
    ]


def exec_cost(n: int) -> str:
    tests = ["assert moving_average([1, 2, 3], 1) == [1, 2, 3]",
             "assert moving_average([1, 2, 3, 4], 2) == [1.5, 2.5, 3.5]",
             "assert moving_average([], 2) == []"]
    t0 = time.perf_counter()
    for _ in range(n):
        score("code", f"<answer>{REF_CODE}</answer>", REF_CODE, tests=tests, code_execution=True)
    return f"code with code_execution=True (sandboxed run, 3 tests): " \
           f"{n / (time.perf_counter() - t0):.1f} samples/s in-process"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--exec", type=int, default=40, help="sandboxed code runs to time")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs per mode")
    args = ap.parse_args()

    items = make_batch(args.n, args.seed)
    print(f"# {args.n} mixed responses, {len(BUILTIN_TYPES)} types; python "
          f"{platform.python_version()}, {os.cpu_count()} CPUs visible, load average "
          f"{os.getloadavg()[0]:.1f} at start; best of {args.repeats} alternating runs")
    score_batch(items[:len(BUILTIN_TYPES) * 2])  # imports, math worker start-up
    t0 = time.perf_counter()
    score_batch(items[:len(BUILTIN_TYPES) * 4], RewardConfig(num_workers=args.workers))
    pool_start = time.perf_counter() - t0

    modes = [0, args.workers]
    mixed, last = best_wall(items, modes, args.repeats)
    differ = sum(a != b for a, b in zip(last[0].results, last[args.workers].results,
                                        strict=True))
    by_type = {}
    for t in BUILTIN_TYPES:
        subset = [it for it in items if it["problem_type"] == t]
        walls, _ = best_wall(subset, modes, args.repeats)
        by_type[t] = (len(subset), len(subset) / walls[0], len(subset) / walls[args.workers])
    shutdown_pool()

    w = f"workers={args.workers}"
    print(f"\n| type | count | in-process samples/s | {w} samples/s | ratio |")
    print("|---|---:|---:|---:|---:|")
    for t, (count, a, b) in by_type.items():
        print(f"| {t} | {count} | {a:,.0f} | {b:,.0f} | {b / a:.2f}x |")
    a, b = args.n / mixed[0], args.n / mixed[args.workers]
    print(f"| **mixed batch** | {args.n} | {a:,.0f} | {b:,.0f} | {b / a:.2f}x |")
    print(f"\nresults that differ between in-process and workers: {differ}")
    print(f"pool start-up (first call, {args.workers} spawned workers): {pool_start:.2f} s")
    for line in math_isolation_costs():
        print(line)
    print(exec_cost(args.exec))


if __name__ == "__main__":
    main()
