"""Collect: merge the eval shards, judge open-ended answers, score, report.

    python launchers/collect.py --config C
    python launchers/collect.py --leaderboard RUN_DIR

Writes <eval.out_dir>/results.json, results.md (benchmark x model, with the officially reported
score beside ours where the config gives one) and results.png, prints the table, and exits
non-zero while any shard is missing (each missing shard is named with its array task index).
With eval.judge.backend set, open-ended answers are judged first (see docs/eval_benchmarks.md).

``--leaderboard RUN_DIR``: every checkpoint a training run evaluated while it trained
(train.async_eval) as a checkpoint x benchmark table with the best checkpoint per benchmark and
on average, and score vs step per benchmark: <eval.out_dir>/steps/leaderboard.{md,json,png}.
Exits non-zero when the run has no checkpoint evaluation yet.
"""

from __future__ import annotations

import sys
from pathlib import Path

from evr1.cli.launcher import base_parser, load_from_args, setup_logging
from evr1.config import ConfigError
from evr1.pipeline import stages


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--leaderboard", metavar="RUN_DIR",
                        help="the checkpoint leaderboard of a training run (no --config needed)")
    args = parser.parse_args(argv)
    setup_logging()
    if args.leaderboard:
        return leaderboard(Path(args.leaderboard))
    cfg = load_from_args(args)
    try:
        return stages.collect_results(cfg)
    except ConfigError as exc:
        sys.exit(f"config error: {exc}")


def leaderboard(run_dir: Path) -> int:
    from evr1.eval.leaderboard import write_leaderboard

    steps = stages.checkpoint_evals_dir(run_dir)
    board, files = write_leaderboard(steps)
    print(Path(files["markdown"]).read_text().rstrip())
    print(f"\nleaderboard: {files['markdown']}, {files['json']}, {files['png']}")
    return 0 if board["quick"]["rows"] or board["full"]["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
