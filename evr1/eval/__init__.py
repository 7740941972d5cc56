"""Benchmark evaluation: registry, answer extraction, metrics, shard runner, collector.

    python launchers/eval.py --config C --prepare      # official files -> evr1 JSONL per benchmark
    python launchers/eval.py --config C --preprocess   # cache their frames (preprocess stage)
    python launchers/eval.py --config C --array        # one task per (model, benchmark, shard)
    python launchers/collect.py --config C             # merge, judge, score: results.{json,md,png}

See docs/eval_benchmarks.md for every benchmark's format, metric and how to point the config at it.
"""

from evr1.eval.benchmarks import BENCHMARKS, Benchmark, MetricSpec, get_benchmark
from evr1.eval.extraction import Extraction, extract_answer
from evr1.eval.metrics import summarize
from evr1.eval.scoring import Scored, score_response

__all__ = ["BENCHMARKS", "Benchmark", "Extraction", "MetricSpec", "Scored", "extract_answer",
           "get_benchmark", "score_response", "summarize"]
