"""The benchmark registry (being split into one module per benchmark family)."""

from evr1.eval.benchmarks.registry import (
    BENCHMARKS,
    Benchmark,
    LoadContext,
    MetricSpec,
    get_benchmark,
    load_benchmark,
    register_benchmark,
    vsi_mean_relative_accuracy,
)

__all__ = ["BENCHMARKS", "Benchmark", "LoadContext", "MetricSpec", "get_benchmark",
           "load_benchmark", "register_benchmark", "vsi_mean_relative_accuracy"]
