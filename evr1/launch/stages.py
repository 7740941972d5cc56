"""Each stage as an array job: what the launchers and the pipeline submit.

A stage function takes the run's Config, submits (or runs locally) its tasks through
``evr1.launch.executor.run_array``, prints a summary, and returns a process exit code.
"""

from __future__ import annotations

import functools
from pathlib import Path

from evr1.config import Config
from evr1.launch.executor import run_array
from evr1.video.preprocess import TaskSummary, run_task
from evr1.video.shards import ShardError, merge_manifests


def preprocess_array(cfg: Config, wait: bool = True) -> int:
    """Decode every media file once into shards: one array task per shard."""
    tasks = list(range(cfg.preprocess.num_tasks))
    outcome = run_array(functools.partial(run_task, cfg), tasks, cfg.launch,
                        cfg.submitit_dir / "preprocess", name="evr1-preprocess", wait=wait)
    print(f"preprocess: {outcome.cluster} array, job ids {' '.join(outcome.job_ids)}")
    if not wait:
        print("tasks merge the manifest themselves when the last one finishes; re-run this "
              "command to redo any failed task (finished tasks are skipped)")
        return 0
    print_preprocess_summary(list(outcome.results.values()))
    for task, reason in sorted(outcome.failed.items()):
        print(f"task {task} failed after {cfg.launch.max_retries} retries: {reason}")
    if outcome.failed:
        return 1
    return merge_or_report(cfg.shard_dir, cfg.preprocess.num_tasks)


def preprocess_sequential(cfg: Config) -> int:
    """All tasks one after another in this process (debugging, tiny inputs)."""
    print_preprocess_summary([run_task(cfg, t) for t in range(cfg.preprocess.num_tasks)])
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


def print_preprocess_summary(summaries: list[TaskSummary]) -> None:
    done = [s for s in summaries if not s.skipped]
    skipped = len(summaries) - len(done)
    frames = sum(s.frames for s in done)
    wall = max((s.seconds for s in done), default=0.0)  # tasks run side by side
    busy = sum(s.seconds for s in done)
    backends: dict[str, int] = {}
    for s in done:
        for name, count in s.backends.items():
            backends[name] = backends.get(name, 0) + count
    print(f"preprocess summary: {len(done)} task(s) run, {skipped} skipped as complete; "
          f"{sum(s.media for s in done)} media files, {sum(s.samples for s in done)} samples, "
          f"{sum(s.failures for s in done)} failures; {frames} frames in {wall:.1f} s "
          f"({frames / busy if busy else 0:.0f} frames/s per task); "
          f"{sum(s.bytes_written for s in done) / 2**20:.1f} MiB written; backends {backends}")


def run_training(cfg: Config) -> dict:
    """The training job body (runs inside the submitted job or in this process)."""
    from evr1.train.trainer import Trainer  # torch + transformers: only where training runs

    result = Trainer(cfg).run()
    return {"steps": result.steps, "before": result.before, "after": result.after,
            "checkpoint": result.checkpoint}


def train_job(cfg: Config, submit: bool = False) -> int:
    if submit:
        outcome = run_array(lambda _: run_training(cfg), [0], cfg.launch,
                            cfg.submitit_dir / "train", name="evr1-train")
        if outcome.failed:
            print(f"training failed: {outcome.failed[0]}")
            return 1
        result = outcome.results[0]
    else:
        result = run_training(cfg)
    print_training_summary(result)
    return 0


def print_training_summary(result: dict) -> None:
    before, after = result["before"], result["after"]
    print(f"training: {result['steps']} steps; checkpoint {result['checkpoint']}")
    for key in sorted(set(before) | set(after)):
        if key.startswith("accuracy"):
            print(f"  held-out {key:<28} before {before.get(key, float('nan')):.3f}  "
                  f"after {after.get(key, float('nan')):.3f}")
