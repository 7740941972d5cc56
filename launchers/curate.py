"""Curate: keep the samples the starting model solves sometimes but not always (pass rate).

    python launchers/curate.py --config C --array         # one array task per shard, then collect
    python launchers/curate.py --config C --array --no-wait   # on Slurm: print job ids, return
    python launchers/curate.py --config C --task 3        # one task, in this process
    python launchers/curate.py --config C --collect       # merge, filter, report (re-filter)
    python launchers/curate.py --config C                 # every task in this process, collect

Each task samples curate.k responses per prompt from the starting model and writes the
pass rates of its shard; the collector writes the filtered JSONL (curate.output_jsonl), the
report and the histogram. With Slurm present (``sbatch`` on PATH, or launch.cluster=slurm)
``--array`` submits through submitit; otherwise the same tasks run through submitit's local
executor. Finished shards are skipped on a re-run; changing only the filter (range, caps,
offline threshold) needs ``--collect`` alone.
"""

from __future__ import annotations

import argparse
import sys

from evr1.cli.launcher import run_launcher
from evr1.pipeline import stages


def main(argv: list[str] | None = None) -> int:
    return run_launcher(__doc__.splitlines()[0], add_arguments, run, argv)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--array", action="store_true", help="submit all tasks as one job array")
    mode.add_argument("--task", type=int, help="run one task index in this process")
    mode.add_argument("--collect", action="store_true",
                      help="merge the shards' pass rates, filter, write the report")
    parser.add_argument("--no-wait", action="store_true",
                        help="with --array on Slurm: print the job ids and return")


def run(cfg, args) -> int:
    from evr1.data.curate import curate_shard

    if args.collect:
        return stages.collect_curation(cfg)
    if args.task is not None:
        stages.print_curate_summary([curate_shard(stages.prepare_curation(cfg), args.task)])
        return 0
    return stages.run_curation(cfg, submit=args.array, wait=not args.no_wait)


if __name__ == "__main__":
    sys.exit(main())
