"""Preprocess: decode every video/image once into HDF5 shards, as a Slurm job array.

    python launchers/preprocess.py --config configs/demo_cpu.yaml --array
    python launchers/preprocess.py --config C --array --no-wait      # print job ids, return
    python launchers/preprocess.py --config C --task 3               # one task, in this process
    python launchers/preprocess.py --config C --merge                # merge finished manifests
    python launchers/preprocess.py --config C                        # all tasks, in this process
    python launchers/preprocess.py --config C --array --force        # redo tasks of other settings

Finished tasks are skipped on a re-run. A task finished with other settings (say another
data.video.fps) is refused, naming each setting that changed; ``--force`` redoes such tasks
(their files and the merged manifest are deleted first), or use another preprocess.out_dir.
With Slurm present (``sbatch`` on PATH, or launch.cluster=slurm) ``--array`` submits one array
job through submitit; otherwise the same tasks run through submitit's local executor.
"""

from __future__ import annotations

import argparse
import sys

from evr1.cli.launcher import run_launcher
from evr1.config import Config, dump_config
from evr1.data.preprocess import check_tasks, preprocess_shard
from evr1.pipeline import stages


def main(argv: list[str] | None = None) -> int:
    return run_launcher(__doc__.splitlines()[0], add_arguments, run, argv)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--array", action="store_true", help="submit all tasks as one job array")
    mode.add_argument("--task", type=int, help="run one task index in this process")
    mode.add_argument("--merge", action="store_true", help="merge the task manifests")
    parser.add_argument("--no-wait", action="store_true",
                        help="with --array on Slurm: print the job ids and return")
    parser.add_argument("--force", action="store_true",
                        help="redo the tasks finished with other settings (deletes their files)")


def run(cfg: Config, args: argparse.Namespace) -> int:
    if not args.merge:
        stages.check_data(cfg, "preprocess")  # every input file, before any work
        # Tasks finished with other settings: refused (or cleared) before anything is written.
        check_tasks(cfg, args.force, only=None if args.task is None else [args.task])
    cfg.shard_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, cfg.shard_dir / "preprocess_config.yaml")

    if args.merge:
        return stages.merge_or_report(cfg.shard_dir, cfg.preprocess.num_tasks)
    if args.task is not None:
        stages.print_preprocess_summary([preprocess_shard(cfg, args.task, force=args.force)])
        return 0
    if args.array:
        return stages.preprocess_array(cfg, wait=not args.no_wait, force=args.force)
    return stages.preprocess_sequential(cfg, force=args.force)


if __name__ == "__main__":
    sys.exit(main())
