"""Eval: benchmark questions -> predictions, one Slurm array task per (model, benchmark, shard).

    python launchers/eval.py --config C --prepare       # official files -> evr1 JSONL per benchmark
    python launchers/eval.py --config C --preprocess    # cache their frames (preprocess arrays)
    python launchers/eval.py --config C --array         # prepare, then submit the eval array
    python launchers/eval.py --config C --array --no-wait   # on Slurm: print job ids, return
    python launchers/eval.py --config C --task 3        # one task, in this process
    python launchers/eval.py --config C --list          # the task list
    python launchers/eval.py --config C                 # every task, in this process

Then ``python launchers/collect.py --config C``. With Slurm present (``sbatch`` on PATH, or
launch.cluster=slurm) ``--array`` submits through submitit; otherwise the same tasks run through
submitit's local executor. Finished shards are skipped on a re-run.
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
    mode.add_argument("--prepare", action="store_true", help="only write the prepared JSONLs")
    mode.add_argument("--preprocess", action="store_true",
                      help="prepare, then cache every benchmark's frames into shards")
    mode.add_argument("--array", action="store_true", help="submit all tasks as one job array")
    mode.add_argument("--task", type=int, help="run one task index in this process")
    mode.add_argument("--list", action="store_true", help="print the task list")
    parser.add_argument("--no-wait", action="store_true",
                        help="with --array / --preprocess on Slurm: print the job ids and return")


def run(cfg, args) -> int:
    from evr1.eval.plan import eval_tasks, pin_models
    from evr1.eval.runner import evaluate_shard

    if args.prepare:
        return stages.eval_prepare(cfg)
    if args.preprocess:
        return stages.eval_preprocess(cfg, wait=not args.no_wait)
    if args.list:
        for task in eval_tasks(pin_models(cfg)):
            print(f"{task.index}: {task.name} ({task.model.path})")
        return 0
    if args.task is not None:
        stages.print_eval_summary([evaluate_shard(pin_models(cfg), args.task)])
        return 0
    return stages.run_evaluation(cfg, submit=args.array, wait=not args.no_wait)


if __name__ == "__main__":
    sys.exit(main())
