"""Checkpoint evaluation while training goes on, the leaderboard, and lease-aware pruning.

The end-to-end run trains the tiny model for 6 steps with a checkpoint every 2, each evaluated
by a local background job (one at a time, queued) while training continues; the evaluation of
step 4 is made to fail (its benchmark file does not exist). The Slurm test submits the eval
array and the dependent collect job to the local Slurm cluster.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import script_module, small_config

from evr1 import leases
from evr1.config import ConfigError, EvalBenchmarkConfig, load_config
from evr1.data.synthetic import make_synthetic
from evr1.eval import while_training as async_eval
from evr1.eval.leaderboard import leaderboard, markdown
from evr1.models.loading import ensure_model
from evr1.pipeline import checkpoint_eval, stages
from evr1.pipeline.training import build_trainer
from evr1.train import checkpoint as ckpt
from evr1.train.metrics import MetricsLogger, read_metrics
from evr1.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("asynceval")
    cfg = eval_config(root, root / "setup")
    make_synthetic(cfg.synthetic, progress=False)
    assert stages.preprocess_sequential(cfg) == 0
    ensure_model(cfg)
    return root


# What these tests set on top of the training tests' small config.
EVAL_SETTINGS = ["train.micro_batch_size=8", "eval.max_new_tokens=6", "eval.num_shards=1",
                 "launch.cluster=local"]


def eval_config(root: Path, run_dir: Path, *overrides: str):
    """``small_config`` with the data under ``root`` and the run in ``run_dir``."""
    return small_config(root, f"run_dir={run_dir}", *EVAL_SETTINGS, *overrides)


ASYNC = ["train.steps=6", "train.save_every=2", "train.keep_last=1",
         "train.async_eval.enabled=true", "train.async_eval.max_samples=3",
         "train.async_eval.max_concurrent=1", "train.async_eval.keep_best=1",
         "train.async_eval.final_full_suite=false"]


def test_async_eval_config_errors_name_the_field():
    for override, message in [
            ("train.async_eval.every=3", r"train.async_eval.every=3 must be a multiple of "
                                         r"train.save_every=50"),
            ("train.async_eval.benchmarks=[videomme]", r"train.async_eval.benchmarks: "
                                                       r"'videomme' is not in eval.benchmarks"),
            ("train.async_eval.max_concurrent=0", r"train.async_eval.max_concurrent must be"),
            ("train.async_eval.when_full=later", r"train.async_eval.when_full='later'"),
            ("train.async_eval.best_metric=bleu", r"train.async_eval.best_metric='bleu'")]:
        with pytest.raises(ConfigError, match=message):
            load_config(ROOT / "configs/demo_cpu.yaml", [override])


def test_quick_and_full_suite_configs(tmp_path):
    bench = [{"name": "synthetic"}, {"name": "videomme", "annotation": "/v/x.parquet",
                                     "limit": 10}]
    cfg = load_config(ROOT / "configs/demo_cpu.yaml", [
        f"run_dir={tmp_path}", f"eval.benchmarks={json.dumps(bench)}",
        "train.async_eval.benchmarks=[videomme]", "train.async_eval.max_samples=4"])
    quick = async_eval.checkpoint_eval_config(cfg, tmp_path / "ck", tmp_path / "q", full=False)
    assert [(b.alias, b.limit) for b in quick.eval.benchmarks] == [("videomme", 4)]
    # The frame cache stays where launchers/eval.py --preprocess wrote it.
    assert quick.eval.benchmarks[0].shard_dir == str(tmp_path / "eval/shards/videomme")
    assert quick.eval.models == [str(tmp_path / "ck/model")]
    assert quick.launch.max_retries == 0 and not quick.train.async_eval.enabled
    full = async_eval.checkpoint_eval_config(cfg, tmp_path / "ck", tmp_path / "f", full=True)
    assert [(b.alias, b.limit) for b in full.eval.benchmarks] == [("synthetic", 0),
                                                                   ("videomme", 10)]


def fake_checkpoints(root: Path, steps: list[int]) -> None:
    for step in steps:
        folder = ckpt.step_dir(root, step)
        (folder / "model").mkdir(parents=True)
        (folder / "meta.json").write_text(json.dumps({"step": step}))


def test_pruning_keeps_last_best_and_leased(tmp_path):
    root = tmp_path / "checkpoints"
    fake_checkpoints(root, [1, 2, 3, 4, 5, 6])
    # Step 2 is read by a running job (this process); step 3's holder is gone.
    leased = leases.take_lease(ckpt.step_dir(root, 2), "eval-step-2", pid=os.getpid())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leases.take_lease(ckpt.step_dir(root, 3), "eval-step-3", pid=dead.pid)
    scores = {1: 10.0, 3: 50.0, 4: 90.0, 5: 20.0}
    removed = ckpt.prune_checkpoints(root, keep_last=2, keep_best=1, scores=scores)
    assert sorted(p.name for p in removed) == ["step-00000001", "step-00000003"]
    assert [p.name for p in ckpt.list_checkpoints(root)] == [
        "step-00000002", "step-00000004", "step-00000005", "step-00000006"]
    # Once its lease is given back, the leased checkpoint goes too.
    leases.release_lease(leased)
    ckpt.prune_checkpoints(root, keep_last=2, keep_best=1, scores=scores)
    assert [p.name for p in ckpt.list_checkpoints(root)] == [
        "step-00000004", "step-00000005", "step-00000006"]


def test_lease_held_on_another_host_or_unreadable_protects(tmp_path):
    root = tmp_path / "checkpoints"
    fake_checkpoints(root, [1, 2, 3])
    lease = leases.take_lease(ckpt.step_dir(root, 1), "x", pid=1)
    record = json.loads(lease.read_text())
    lease.write_text(json.dumps({**record, "host": f"not-{socket.gethostname()}"}))
    (ckpt.step_dir(root, 2) / "leases").mkdir()
    (ckpt.step_dir(root, 2) / "leases/half-written.json").write_text("{")
    ckpt.prune_checkpoints(root, keep_last=1)
    assert len(ckpt.list_checkpoints(root)) == 3


class _FakeWandb:
    def __init__(self):
        self.rows: list[tuple[int, dict]] = []
        self.axes: dict[str, str | None] = {}

    def define_metric(self, name, step_metric=None):
        self.axes[name] = step_metric

    def log(self, data, step):
        self.rows.append((step, data))

    def finish(self):
        pass


def test_wandb_gets_checkpoint_evals_on_their_own_axis_and_steps_only_go_forward(
        tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setattr("evr1.train.metrics._start_wandb", lambda *a: fake)
    metrics = MetricsLogger(tmp_path, wandb_mode="offline")
    assert fake.axes["checkpoint_eval/*"] == "checkpoint_eval/step"
    metrics.log(1, {"reward": 0.5})
    metrics.log(2, {"reward": 0.5})
    metrics.log_checkpoint_eval(2, {"score/synthetic": 40.0, "status": "done"})
    metrics.log_checkpoint_eval(1, {"score/synthetic": 30.0})  # two arrive in one step
    metrics.log(3, {"reward": 0.6})
    metrics.log_checkpoint_eval(3, {"score/synthetic": 45.0})
    metrics.close()
    steps = [s for s, _ in fake.rows]
    assert steps == sorted(steps)
    evals = [(s, d["checkpoint_eval/step"]) for s, d in fake.rows if "checkpoint_eval/step" in d]
    assert evals == [(2, 2), (3, 1), (4, 3)]  # one per row; the last after training's last
    records = read_metrics(tmp_path, "checkpoint_eval")
    assert [(r["step"], r["logged_at_step"]) for r in records] == [(2, 2), (1, 2), (3, 3)]
    assert all("time" in r for r in read_metrics(tmp_path))


@pytest.mark.slow
def test_training_goes_on_while_checkpoints_are_evaluated(prepared, tmp_path, monkeypatch,
                                                          capsys):
    real = async_eval.checkpoint_eval_config

    def fail_step_4(cfg, checkpoint, out_dir, full):
        sub = real(cfg, checkpoint, out_dir, full)
        if checkpoint.name == "step-00000004":  # a benchmark file that does not exist
            bad = EvalBenchmarkConfig(name="synthetic", annotation=str(out_dir / "missing.jsonl"))
            sub = dataclasses.replace(sub, eval=dataclasses.replace(sub.eval, benchmarks=[bad]))
        return sub

    monkeypatch.setattr(async_eval, "checkpoint_eval_config", fail_step_4)
    cfg = eval_config(prepared, tmp_path / "run", *ASYNC)
    # On a loaded machine an eval process can take longer to start than the remaining steps
    # take to run: step 3 waits (at most 5 min) for the step-2 evaluation to have started, so
    # that the overlap below is a property of the code, not of the machine's load.
    status_2 = Path(cfg.run_dir) / "eval/steps/step-00000002/status.json"
    real_step = Trainer.train_step

    def step_after_eval_started(trainer):
        if trainer.state.step == 2:
            deadline = time.time() + 300
            while time.time() < deadline and not (
                    status_2.exists() and "started_at" in json.loads(status_2.read_text())):
                time.sleep(0.2)
        return real_step(trainer)

    monkeypatch.setattr(Trainer, "train_step", step_after_eval_started)
    result = build_trainer(cfg).run()
    assert result.steps == 6  # the failed evaluation did not stop training

    records = read_metrics(Path(cfg.run_dir))
    train_times = [r["time"] for r in records if r["kind"] == "train"]
    evals = {r["step"]: r for r in records if r["kind"] == "checkpoint_eval"}
    assert sorted(evals) == [2, 4, 6]
    for step in (2, 6):
        assert evals[step]["status"] == "done" and "score/synthetic" in evals[step]
        assert 0.0 <= evals[step]["score/synthetic"] <= 100.0
    assert evals[4]["status"] == "failed" and evals[4]["failed"] == 1
    assert "missing.jsonl" in evals[4]["error"]

    # Overlap: an evaluation was running while training steps were still being taken.
    steps_dir = Path(cfg.run_dir) / "eval/steps"
    status = {s: json.loads((steps_dir / f"step-{s:08d}/status.json").read_text())
              for s in (2, 4, 6)}
    assert any(status[s]["started_at"] < t < status[s]["finished_at"]
               for s in (2, 4) for t in train_times), (status, train_times)
    assert evals[2]["logged_at_step"] > 2  # it arrived after training had moved on

    # Every lease was given back; pruning kept the last and the best checkpoint.
    kept = ckpt.list_checkpoints(cfg.checkpoint_dir)
    assert not [p for p in kept if list((p / "leases").glob("*.json"))]
    best = max((2, 6), key=lambda s: (evals[s]["score/average"], s))
    assert {p.name for p in kept} == {"step-00000006", f"step-{best:08d}"}

    # The leaderboard: 3 rows, the failure shown as such, best per benchmark and on average.
    capsys.readouterr()
    assert launch_collect("--leaderboard", cfg.run_dir) == 0
    out = capsys.readouterr().out
    board = leaderboard(steps_dir)["quick"]
    assert [r["step"] for r in board["rows"]] == [2, 4, 6]
    assert [r["status"] for r in board["rows"]] == ["done", "failed", "done"]
    assert board["best"]["average"]["step"] == best
    assert "| 4 | failed | failed |" in out and "Best checkpoint: synthetic step" in out
    assert (steps_dir / "leaderboard.png").stat().st_size > 1000
    assert "0.0" not in markdown(leaderboard(steps_dir)).split("| 4 |")[1].split("\n")[0]


def launch_collect(*args: str) -> int:
    return script_module("launchers/collect.py").main([str(a) for a in args])


def test_leaderboard_of_an_empty_run_says_so(tmp_path, capsys):
    assert launch_collect("--leaderboard", tmp_path) == 1
    assert "No checkpoint evaluations" in capsys.readouterr().out


def test_full_slots_skip_and_resume_catches_up(prepared, tmp_path, monkeypatch):
    """when_full=skip drops a checkpoint when the slot is busy; a new trainer process logs the
    results that arrived after the old one stopped."""
    monkeypatch.setattr(checkpoint_eval, "local_command", lambda out_dir: [
        sys.executable, "-c", "import time; time.sleep(3)"])
    cfg = eval_config(prepared, tmp_path / "run", "train.async_eval.enabled=true",
                       "train.async_eval.when_full=skip", "train.save_every=1")
    metrics = MetricsLogger(Path(cfg.run_dir), "disabled")
    evaluator = async_eval.AsyncEvaluator(cfg, metrics, checkpoint_eval.EvalJobs(cfg))
    fake_checkpoints(cfg.checkpoint_dir, [1, 2])
    evaluator.submit(1, ckpt.step_dir(cfg.checkpoint_dir, 1))
    evaluator.submit(2, ckpt.step_dir(cfg.checkpoint_dir, 2))
    assert evaluator.outstanding == 1
    skipped = read_metrics(Path(cfg.run_dir), "checkpoint_eval")
    assert [(r["step"], r["status"]) for r in skipped] == [(2, "skipped")]
    # The trainer stops here (its job "finishes" later with results on disk).
    job = evaluator.running[0]
    job.proc.wait()
    results = {"results": [{"benchmark": "synthetic", "score": 25.0, "complete": True}]}
    (job.out_dir / "results.json").write_text(json.dumps(results))
    async_eval.write_status(job.out_dir, "done", finished_at=time.time())
    resumed = async_eval.AsyncEvaluator(cfg, MetricsLogger(Path(cfg.run_dir), "disabled"),
                                       checkpoint_eval.EvalJobs(cfg))
    assert resumed.outstanding == 0 and resumed.scores == {1: 25.0}
    logged = read_metrics(Path(cfg.run_dir), "checkpoint_eval")
    assert [(r["step"], r["status"]) for r in logged] == [(2, "skipped"), (1, "done")]


@pytest.mark.slurm
def test_slurm_eval_array_and_dependent_collect(slurm_cluster, prepared, tmp_path):
    """On the local Slurm cluster: the checkpoint's eval array, then collect with afterok."""
    from test_slurm import job_records, wait_for_jobs

    cfg = eval_config(prepared, tmp_path / "run", "launch.cluster=slurm", "train.steps=2",
                       "train.save_every=2", "train.async_eval.enabled=true",
                       "train.async_eval.max_samples=2", "train.async_eval.final_full_suite=false",
                       "launch.cpus_per_task=1", "launch.mem_gb=2", "launch.time_min=10",
                       "launch.setup=[export OMP_NUM_THREADS=1]")
    result = build_trainer(cfg).run()  # waits at the end for the outstanding job (wait_at_end)
    assert result.steps == 2
    out_dir = Path(cfg.run_dir) / "eval/steps/step-00000002"
    request = json.loads((out_dir / "request.json").read_text())
    array = request["eval_jobs"][0].split("_")[0]
    collect = request["collect_job"]
    submission = (out_dir / f"submitit/collect/{collect}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterok:{array}" in submission
    # The trainer stops waiting once the results are written; the collect job may still be
    # exiting (Slurm shows it RUNNING for a moment after its work is done).
    wait_for_jobs([array, collect])
    tasks, [collect_job] = job_records(array), job_records(collect)
    assert {t["JobState"] for t in tasks} == {"COMPLETED"}, tasks
    assert collect_job["JobState"] == "COMPLETED", collect_job
    assert collect_job["StartTime"] >= max(t["EndTime"] for t in tasks)
    [record] = read_metrics(Path(cfg.run_dir), "checkpoint_eval")
    assert record["step"] == 2 and record["status"] == "done" and "score/synthetic" in record
    assert not list((ckpt.step_dir(cfg.checkpoint_dir, 2) / "leases").glob("*.json"))
    assert [r["step"] for r in leaderboard(out_dir.parent)["quick"]["rows"]] == [2]


def test_final_full_suite_is_submitted_and_awaited(prepared, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_eval, "local_command", lambda out_dir: [
        sys.executable, "-c", "import sys; sys.exit('no evaluation here')"])
    cfg = eval_config(prepared, tmp_path / "run", "train.async_eval.enabled=true",
                       "train.async_eval.max_samples=2", "train.save_every=1")
    evaluator = async_eval.AsyncEvaluator(cfg, MetricsLogger(Path(cfg.run_dir), "disabled"),
                                       checkpoint_eval.EvalJobs(cfg))
    fake_checkpoints(cfg.checkpoint_dir, [3])
    evaluator.finish(3, ckpt.step_dir(cfg.checkpoint_dir, 3), wait=True)
    assert evaluator.outstanding == 0
    out_dir = Path(cfg.run_dir) / "eval/steps/step-00000003-full"
    request = json.loads((out_dir / "request.json").read_text())
    assert request["suite"] == "full" and request["benchmarks"] == ["synthetic"]
    [synthetic] = load_config(out_dir / "config.yaml").eval.benchmarks
    assert synthetic.limit == 0  # no max_samples cap on the full suite
    [record] = read_metrics(Path(cfg.run_dir), "checkpoint_eval")
    assert record["suite"] == "full" and record["status"] == "failed"
    assert "no evaluation here" in record["error"]
