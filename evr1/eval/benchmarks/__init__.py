"""Benchmarks evr1 evaluates on: how to read each one's published files, and how it is scored.

    base.py       Benchmark, MetricSpec, LoadContext (what a loader gets), load_benchmark
    common.py     helpers loaders share (records, the converted layout, published layouts)
    registry.py   BENCHMARKS by name, get_benchmark, register_benchmark
    <family>.py   the loaders and entries of one benchmark family (videomme.py, mvbench.py,
                  tempcompass.py, motionbench.py, long_video.py, reasoning.py, generic.py,
                  vsibench.py, grounding.py, streaming.py, images.py, synthetic.py)

docs/eval_benchmarks.md has the table of formats, metrics and the published layouts each reads.
"""

from evr1.eval.benchmarks.base import Benchmark, LoadContext, MetricSpec, load_benchmark
from evr1.eval.benchmarks.registry import BENCHMARKS, get_benchmark, register_benchmark

__all__ = ["BENCHMARKS", "Benchmark", "LoadContext", "MetricSpec", "get_benchmark",
           "load_benchmark", "register_benchmark"]
