"""Each stage as an array job: what the launchers and the pipeline submit.

A stage function takes the run's Config, submits (or runs locally) its tasks through
``run_stage_array`` (``evr1.pipeline.executor.run_array`` plus the reporting every array stage
shares), prints a summary, and returns a process exit code.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from evr1 import runs
from evr1.config import Config, ConfigError, load_config
from evr1.data import curate
from evr1.data.schema import check_files, load_samples
from evr1.eval.collect import collect
from evr1.eval.plan import eval_tasks, pin_models, pinned_file, resolve_benchmarks, task_count
from evr1.eval.preflight import preflight_eval
from evr1.eval.prepare import prepare_all
from evr1.eval.runner import evaluate_shard
from evr1.files import read_jsonl
from evr1.models.loading import ensure_model
from evr1.models.preflight import PreflightError
from evr1.pipeline.executor import run_array, submit_array, submit_job
from evr1.video.preprocess import TaskSummary, input_files, preprocess_shard
from evr1.video.shards import FAILURES, MANIFEST, ShardError, merge_manifests


def check_data(cfg: Config, stage: str) -> None:
    """Check every sample file ``stage`` ("preprocess" or "train") reads before it does any
    work; raises ``evr1.data.schema.DatasetError`` listing every problem (file, line, sample,
    field). Media files are not required to exist: preprocessing records a missing one as a
    failure, and training reads frames from the shards."""
    files = input_files(cfg) if stage == "preprocess" else \
        [p for p in (cfg.data.train_jsonl, cfg.data.eval_jsonl) if p]
    check_files(files, cfg.data.media_root, fallback_type=cfg.reward.fallback_type)


def run_stage_array(cfg: Config, stage: str, task_fn: Callable[[Config, int], Any],
                    tasks: list[int], *, wait: bool, summarize: Callable[[list], None],
                    no_wait_hint: str, finish: Callable[[], int] | None = None,
                    task_label: Callable[[int], str] | None = None) -> int:
    """Run ``task_fn(cfg, task)`` for every task as one array and report it: the job ids, the
    summary (``summarize`` of the task results), every task that failed all its retries.

    Returns 1 if a task failed, else ``finish()`` (the stage's merge or collect; 0 without).
    With ``wait=False`` (Slurm) nothing is there to summarize yet: prints the job ids and
    ``no_wait_hint`` (what to run next) and returns 0. ``task_label`` names a task in the
    failure lines (default ``<stage> task <i>``).
    """
    outcome = run_array(functools.partial(task_fn, cfg), tasks, cfg.launch,
                        cfg.submitit_dir / stage, name=f"evr1-{stage}", wait=wait)
    print(f"{stage}: {outcome.cluster} array, job ids {' '.join(outcome.job_ids)}")
    if not wait:
        print(no_wait_hint)
        return 0
    summarize(list(outcome.results.values()))
    label = task_label or (lambda task: f"{stage} task {task}")
    for task, reason in sorted(outcome.failed.items()):
        print(f"{label(task)} failed after {cfg.launch.max_retries} retries: {reason}")
    if outcome.failed:
        return 1
    return finish() if finish else 0


def preprocess_array(cfg: Config, wait: bool = True) -> int:
    """Decode every media file once into shards: one array task per shard."""
    return run_stage_array(
        cfg, "preprocess", preprocess_shard, list(range(cfg.preprocess.num_tasks)), wait=wait,
        summarize=print_preprocess_summary,
        no_wait_hint="tasks merge the manifest themselves when the last one finishes; re-run "
                     "this command to redo any failed task (finished tasks are skipped)",
        finish=lambda: merge_or_report(cfg.shard_dir, cfg.preprocess.num_tasks),
        task_label=lambda task: f"task {task}")  # as it always printed: "task N failed ..."


def submit_preprocess(cfg: Config, after: Sequence[str] = ()) -> list[str]:
    """Submit the preprocess array to Slurm and return its job ids without waiting.

    The last task to finish merges the manifest, so a job that depends on this array
    (``afterok``) finds ``manifest.json`` complete.
    """
    jobs = submit_array(functools.partial(preprocess_shard, cfg),
                        list(range(cfg.preprocess.num_tasks)), cfg.launch,
                        cfg.submitit_dir / "preprocess", name="evr1-preprocess", after=after)
    return [job.job_id for job in jobs]


def preprocess_sequential(cfg: Config) -> int:
    """All tasks one after another in this process (debugging, tiny inputs)."""
    print_preprocess_summary([preprocess_shard(cfg, t) for t in range(cfg.preprocess.num_tasks)])
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


# --------------------------------------------------------------------------- evaluation


def eval_prepare(cfg: Config) -> int:
    """Every configured benchmark's official annotation -> an evr1 JSONL (cheap, idempotent).

    A benchmark that fails is named and skipped; the others are prepared; the status is 1."""
    report = prepare_all(cfg)
    for summary in report.prepared:
        print(f"prepared {summary.line()}")
    if report.failed:
        print(f"prepare: {len(report.failed)} of {len(report.prepared) + len(report.failed)} "
              "benchmark(s) failed: " + ", ".join(f.alias for f in report.failed))
    for failure in report.failed:  # last: callers show the last line as the reason
        print(f"prepare FAILED: {failure.line()}")
    return 1 if report.failed else 0


def eval_preprocess(cfg: Config, wait: bool = True) -> int:
    """Cache every benchmark's frames with the preprocess stage (one array per benchmark)."""
    status = eval_prepare(cfg)
    if status:
        return status
    for run in resolve_benchmarks(cfg):
        if run.shard_dir == cfg.shard_dir:
            # The training shards: preprocessing them with only this file as input would mark
            # their tasks complete without the training samples.
            state = "present" if (run.shard_dir / "manifest.json").exists() else "MISSING"
            print(f"{run.alias}: frames come from the training shards in {run.shard_dir} "
                  f"({state}; made by python launchers/preprocess.py, which includes "
                  "data.eval_jsonl)")
            continue
        _drop_stale_shards(run.prepared, run.shard_dir)
        sub = dataclasses.replace(cfg, preprocess=dataclasses.replace(
            cfg.preprocess, inputs=[str(run.prepared)], out_dir=str(run.shard_dir)))
        print(f"== preprocess {run.alias} -> {run.shard_dir} ==")
        status = preprocess_array(sub, wait=wait)
        if status:
            return status
    return 0


def _drop_stale_shards(prepared: Path, shard_dir: Path) -> None:
    """Shards made from an older prepared file (more questions now) are redone: preprocess
    tasks only check their own completion, not whether their inputs changed."""
    manifest = shard_dir / MANIFEST
    if not manifest.exists():
        return
    covered = set(json.loads(manifest.read_text())["samples"])
    covered |= {r["id"] for r in read_jsonl(shard_dir / FAILURES)}
    wanted = {s.id for s in load_samples(prepared, check_media=False) if s.data_type != "text"}
    if wanted <= covered:
        return
    print(f"{shard_dir}: {len(wanted - covered)} questions of {prepared.name} are not in these "
          "shards (the benchmark changed): redoing them")
    for part in shard_dir.glob("manifest-*.json"):
        part.unlink()
    manifest.unlink()


def _check_frames(cfg: Config) -> list[str]:
    """Benchmarks whose frame cache is missing (when frames come from shards)."""
    if cfg.eval.frames != "shards":
        return []
    return [f"{run.alias}: no frame cache in {run.shard_dir} (run python launchers/eval.py "
            "--config C --preprocess first)"
            for run in resolve_benchmarks(cfg) if not (run.shard_dir / "manifest.json").exists()]


def run_evaluation(cfg: Config, submit: bool = True, wait: bool = True) -> int:
    """Prepare, then run every (model, benchmark, shard) task: as one array, or in-process."""
    cfg = pin_models(cfg, record=True)
    status = eval_prepare(cfg)
    if status:
        return status
    problems = _check_frames(cfg)
    for problem in problems:
        print(problem)
    if problems:
        return 1
    try:  # every question fits max_prompt_length and each model's context
        for budget in preflight_eval(cfg):
            print(budget.summary())
    except PreflightError as exc:
        print(exc)
        return 1
    tasks = eval_tasks(cfg)
    print(f"eval: {len(tasks)} task(s): " + ", ".join(t.name for t in tasks))
    if not submit:
        results = [evaluate_shard(cfg, t.index) for t in tasks]
        print_eval_summary(results)
        return 0
    # No collect here: collecting (judging, scoring) is its own command, launchers/collect.py.
    return run_stage_array(
        cfg, "eval", evaluate_shard, [t.index for t in tasks], wait=wait,
        summarize=print_eval_summary,
        no_wait_hint="when the array is done: python launchers/collect.py --config C "
                     "(re-running this command redoes only unfinished shards)",
        task_label=lambda index: f"eval task {index} ({tasks[index].name})")


def print_eval_summary(results: list) -> None:
    print_array_summary("eval", results, [r.items for r in results], "questions")


def print_array_summary(stage: str, results: list, sizes: list[int], unit: str) -> None:
    """One line for an array stage's task results (``skipped``, ``seconds``, ``counts``);
    ``sizes`` is each result's number of ``unit``."""
    done = [(r, n) for r, n in zip(results, sizes, strict=True) if not r.skipped]
    total = sum(n for _, n in done)
    busy = sum(r.seconds for r, _ in done)
    counts: dict[str, int] = {}
    for r, _ in done:
        for key, value in r.counts.items():
            counts[key] = counts.get(key, 0) + value
    print(f"{stage} summary: {len(done)} task(s) run, {len(results) - len(done)} skipped as "
          f"complete; {total} {unit} ({total / busy if busy else 0:.2f} {unit}/s per task); "
          f"{counts}")


def collect_results(cfg: Config) -> int:
    """Merge the shards, judge, score; exit status 1 while any shard is missing."""
    report = collect(cfg)
    table = Path(report.files["markdown"]).read_text()
    print(table.split("\n## Sub-scores")[0].rstrip())
    print(f"\nresults: {report.files['json']}, {report.files['markdown']}, "
          f"{report.files['png']}")
    for m in report.missing:
        print(f"MISSING: {m['model']}/{m['benchmark']} shard {m['shard']} of {m['num_shards']} "
              f"(eval array task {m['task_index']}): {m['reason']}")
    if report.missing:
        print(f"{len(report.missing)} shard(s) missing: rerun python launchers/eval.py "
              "--config C --array (finished shards are skipped), then collect again")
        return 1
    return 0


def submit_eval(cfg: Config, after: Sequence[str] = ()) -> list[str]:
    """Submit the eval array to Slurm after the jobs in ``after`` (training); its job ids.

    For a job chain: the checkpoint does not exist yet, so ``latest`` is resolved by each task
    when it starts (all after training ended: the same folder), and frames are not checked
    here (the synthetic benchmark's come from the preprocess job of the same chain).
    """
    status = eval_prepare(cfg)
    if status:
        raise RuntimeError("eval: preparing the benchmarks failed (see above)")
    pinned_file(cfg).unlink(missing_ok=True)  # the collector resolves `latest` like the tasks
    jobs = submit_array(functools.partial(evaluate_shard, cfg), list(range(task_count(cfg))),
                        cfg.launch, cfg.submitit_dir / "eval", name="evr1-eval", after=after)
    return [job.job_id for job in jobs]


def collect_job(cfg: Config) -> int:
    """The collector as a Slurm job body: a missing shard fails the job (state FAILED, not
    COMPLETED), so the job chain shows that the results are incomplete."""
    status = collect_results(cfg)
    if status:
        raise RuntimeError("collect: results are incomplete (shards missing, listed above); "
                           "rerun python launchers/eval.py --config C --array, then collect")
    return status


def submit_collect(cfg: Config, after: Sequence[str] = ()) -> str:
    """Submit the collector as one Slurm job after the eval array; its job id."""
    job = submit_job(functools.partial(collect_job, cfg), cfg.launch,
                     cfg.submitit_dir / "collect", name="evr1-collect", after=after)
    return job.job_id


# --------------------------------------------------------------------------- curation


def prepare_curation(cfg: Config) -> Config:
    """Check the input (types, caps, frame cache) and pin the starting model's folder, so
    that every array task samples from the same model; builds the tiny model if configured."""
    curate.check_inputs(cfg)
    if cfg.curate.model:
        model = cfg.path(cfg.curate.model)
        if not (model / "config.json").is_file():
            raise ConfigError(f"curate.model: {model} is not a model folder (no config.json)")
    else:
        model = ensure_model(cfg)
    return dataclasses.replace(cfg, curate=dataclasses.replace(cfg.curate, model=str(model)))


def run_curation(cfg: Config, submit: bool = True, wait: bool = True) -> int:
    """Pass rates of every sample (one array task per shard), then the collector."""
    cfg = prepare_curation(cfg)
    tasks = list(range(cfg.curate.num_shards))
    if not submit:
        print_curate_summary([curate.curate_shard(cfg, t) for t in tasks])
        return collect_curation(cfg)
    return run_stage_array(
        cfg, "curate", curate.curate_shard, tasks, wait=wait, summarize=print_curate_summary,
        no_wait_hint="when the array is done: python launchers/curate.py --config C --collect "
                     "(re-running --array redoes only unfinished shards)",
        finish=lambda: collect_curation(cfg))


def print_curate_summary(results: list) -> None:
    print_array_summary("curate", results, [r.samples for r in results], "samples")


def collect_curation(cfg: Config) -> int:
    """Merge the pass rates, write the filtered JSONL and the report; 1 while a shard is
    missing (nothing is filtered from an incomplete set)."""
    result = curate.collect_curation(cfg)
    for m in result.missing:
        print(f"MISSING: curate shard {m['shard']} of {m['num_shards']} (array task "
              f"{m['shard']}): {m['reason']}")
    if result.missing:
        print(f"{len(result.missing)} shard(s) missing: rerun python launchers/curate.py "
              "--config C --array (finished shards are skipped), then --collect")
        return 1
    print(Path(result.files["markdown"]).read_text().rstrip())
    print(f"\ncurated: {result.files['curated']}; report: {result.files['json']}, "
          f"{result.files['markdown']}, {result.files['png']}; pass rates: "
          f"{result.files['records']}")
    return 0


def checkpoint_evals_dir(run_dir: Path) -> Path:
    """Where a training run's checkpoint evaluations are (train.async_eval): the eval folder
    its saved config.yaml names, else <run_dir>/eval, plus ``steps``."""
    saved = run_dir / runs.CONFIG
    if saved.is_file():
        cfg = load_config(saved)
        if cfg.eval.out_dir:  # else the folder given, wherever the run has moved since
            return runs.checkpoint_evals_dir(cfg.eval_dir)
    return runs.checkpoint_evals_dir(runs.eval_dir(str(run_dir)))
