"""Collect: merge the eval shards, judge open-ended answers, score, report.

    python launchers/collect.py --config C

Writes <eval.out_dir>/results.json, results.md (benchmark x model, with the officially reported
score beside ours where the config gives one) and results.png, prints the table, and exits
non-zero while any shard is missing (each missing shard is named with its array task index).
With eval.judge.backend set, open-ended answers are judged first (see docs/benchmarks.md).
"""

from __future__ import annotations

import sys

from evr1.config import ConfigError
from evr1.launch import stages
from evr1.launch.cli import base_parser, load_from_args, setup_logging


def main(argv: list[str] | None = None) -> int:
    args = base_parser(__doc__.splitlines()[0]).parse_args(argv)
    setup_logging()
    cfg = load_from_args(args)
    try:
        return stages.collect_results(cfg)
    except ConfigError as exc:
        sys.exit(f"config error: {exc}")


if __name__ == "__main__":
    sys.exit(main())
