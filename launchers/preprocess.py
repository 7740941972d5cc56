"""Preprocess: decode every video/image once into HDF5 shards, as a Slurm job array.

    python launchers/preprocess.py --config configs/demo_cpu.yaml --array
    python launchers/preprocess.py --config C --array --no-wait      # print job ids, return
    python launchers/preprocess.py --config C --task 3               # one task, in this process
    python launchers/preprocess.py --config C --merge                # merge finished manifests

With Slurm present (``sbatch`` on PATH, or launch.cluster=slurm) ``--array`` submits one array
job through submitit; otherwise the same tasks run through submitit's local executor.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from evr1.config import Config, dump_config
from evr1.launch.cli import base_parser, load_from_args, setup_logging
from evr1.launch.executor import run_array
from evr1.video.preprocess import TaskSummary, run_task
from evr1.video.shards import ShardError, merge_manifests


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--array", action="store_true", help="submit all tasks as one job array")
    mode.add_argument("--task", type=int, help="run one task index in this process")
    mode.add_argument("--merge", action="store_true", help="merge the task manifests")
    parser.add_argument("--no-wait", action="store_true",
                        help="with --array on Slurm: print the job ids and return")
    args = parser.parse_args(argv)
    setup_logging()
    cfg = load_from_args(args)
    out_dir = cfg.shard_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out_dir / "preprocess_config.yaml")

    if args.merge:
        return merge_or_report(out_dir, cfg.preprocess.num_tasks)
    if args.task is not None:
        print_summary([run_task(cfg, args.task)])
        return 0
    return run_all(cfg, wait=not args.no_wait) if args.array else run_sequential(cfg)


def run_all(cfg: Config, wait: bool) -> int:
    tasks = list(range(cfg.preprocess.num_tasks))
    outcome = run_array(functools.partial(run_task, cfg), tasks, cfg.launch,
                        cfg.submitit_dir / "preprocess", name="evr1-preprocess", wait=wait)
    print(f"preprocess: {outcome.cluster} array, job ids {' '.join(outcome.job_ids)}")
    if not wait:
        print("tasks merge the manifest themselves when the last one finishes; re-run this "
              "command to redo any failed task (finished tasks are skipped)")
        return 0
    print_summary(list(outcome.results.values()))
    for task, reason in sorted(outcome.failed.items()):
        print(f"task {task} failed after {cfg.launch.max_retries} retries: {reason}")
    if outcome.failed:
        return 1
    return merge_or_report(cfg.shard_dir, cfg.preprocess.num_tasks)


def run_sequential(cfg: Config) -> int:
    print_summary([run_task(cfg, t) for t in range(cfg.preprocess.num_tasks)])
    return merge_or_report(cfg.shard_dir, cfg.preprocess.num_tasks)


def merge_or_report(out_dir: Path, num_tasks: int) -> int:
    try:
        merged = merge_manifests(out_dir, num_tasks)
    except ShardError as exc:
        print(f"merge: {exc}")
        return 1
    print(f"manifest: {out_dir / 'manifest.json'} ({len(merged['samples'])} samples, "
          f"{len(merged['media'])} media files, {merged['num_failures']} failures in "
          f"{out_dir / 'failures.jsonl'})")
    return 0


def print_summary(summaries: list[TaskSummary]) -> None:
    done = [s for s in summaries if not s.skipped]
    skipped = len(summaries) - len(done)
    frames = sum(s.frames for s in done)
    seconds = max((s.seconds for s in done), default=0.0)  # tasks run in parallel
    busy = sum(s.seconds for s in done)
    backends: dict[str, int] = {}
    for s in done:
        for name, count in s.backends.items():
            backends[name] = backends.get(name, 0) + count
    print(f"preprocess summary: {len(done)} task(s) run, {skipped} skipped as complete; "
          f"{sum(s.media for s in done)} media files, {sum(s.samples for s in done)} samples, "
          f"{sum(s.failures for s in done)} failures; {frames} frames in {seconds:.1f} s "
          f"({frames / busy if busy else 0:.0f} frames/s per task); "
          f"{sum(s.bytes_written for s in done) / 2**20:.1f} MiB written; backends {backends}")


if __name__ == "__main__":
    sys.exit(main())
