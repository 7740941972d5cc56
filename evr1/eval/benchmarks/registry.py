"""The benchmark registry: every built-in benchmark by name, and ``get_benchmark``.

Each family module (videomme.py, long_video.py, grounding.py, ...) defines its ``Benchmark``
entries and lists them in ``ENTRIES``; the registry is assembled from those lists here, in the
order docs/eval_benchmarks.md shows them. Importing a family module registers nothing: neither a
benchmark nor a reward type (the one benchmark-specific reward, ``vsibench_mra``, is a
built-in of ``evr1.rewards``). ``register_benchmark`` adds a user's own entry.
"""

from __future__ import annotations

from evr1.eval.benchmarks import (
    generic,
    grounding,
    images,
    long_video,
    motionbench,
    mvbench,
    reasoning,
    streaming,
    synthetic,
    tempcompass,
    videomme,
    vsibench,
)
from evr1.eval.benchmarks.base import Benchmark

FAMILIES = (videomme, mvbench, tempcompass, motionbench, long_video, reasoning, generic,
            vsibench, grounding, streaming, images, synthetic)

BENCHMARKS: dict[str, Benchmark] = {}


def register_benchmark(bench: Benchmark) -> Benchmark:
    """Add ``bench`` under its name (a user's benchmark, or a replacement of a built-in)."""
    BENCHMARKS[bench.name] = bench
    return bench


for _family in FAMILIES:
    for _bench in _family.ENTRIES:
        if _bench.name in BENCHMARKS:
            raise ValueError(f"two built-in benchmarks are named {_bench.name!r}")
        register_benchmark(_bench)


def get_benchmark(name: str) -> Benchmark:
    key = name.strip().lower().replace("-", "_")
    if key not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}")
    return BENCHMARKS[key]
