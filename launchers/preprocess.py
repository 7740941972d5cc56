"""Preprocess: decode every video/image once into HDF5 shards, as a Slurm job array.

    python launchers/preprocess.py --config configs/demo_cpu.yaml --array
    python launchers/preprocess.py --config C --array --no-wait      # print job ids, return
    python launchers/preprocess.py --config C --task 3               # one task, in this process
    python launchers/preprocess.py --config C --merge                # merge finished manifests
    python launchers/preprocess.py --config C                        # all tasks, in this process

With Slurm present (``sbatch`` on PATH, or launch.cluster=slurm) ``--array`` submits one array
job through submitit; otherwise the same tasks run through submitit's local executor.
"""

from __future__ import annotations

import argparse
import sys

from evr1.cli.launcher import run_launcher
from evr1.config import Config, dump_config
from evr1.pipeline import stages
from evr1.video.preprocess import preprocess_shard


def main(argv: list[str] | None = None) -> int:
    return run_launcher(__doc__.splitlines()[0], add_arguments, run, argv)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--array", action="store_true", help="submit all tasks as one job array")
    mode.add_argument("--task", type=int, help="run one task index in this process")
    mode.add_argument("--merge", action="store_true", help="merge the task manifests")
    parser.add_argument("--no-wait", action="store_true",
                        help="with --array on Slurm: print the job ids and return")


def run(cfg: Config, args: argparse.Namespace) -> int:
    if not args.merge:
        stages.check_data(cfg, "preprocess")  # every input file, before any work
    cfg.shard_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, cfg.shard_dir / "preprocess_config.yaml")

    if args.merge:
        return stages.merge_or_report(cfg.shard_dir, cfg.preprocess.num_tasks)
    if args.task is not None:
        stages.print_preprocess_summary([preprocess_shard(cfg, args.task)])
        return 0
    if args.array:
        return stages.preprocess_array(cfg, wait=not args.no_wait)
    return stages.preprocess_sequential(cfg)


if __name__ == "__main__":
    sys.exit(main())
