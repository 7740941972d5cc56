"""The shard runner without a model: failed media, failing generation, decode time-outs."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from evr1.config import load_config
from evr1.data.schema import Sample
from evr1.eval.benchmarks import get_benchmark
from evr1.eval.plan import BenchmarkRun, EvalTask, ModelRun
from evr1.eval.runner import DecodedFrames, cpu_threads, evaluate_samples
from evr1.rollout.base import Rollouts, SamplingParams

OPTS = ["A. red", "B. green"]


def sample(i: int, data_type: str = "video") -> Sample:
    return Sample(id=f"q{i}", problem_type="multiple_choice", problem=f"question {i}",
                  options=OPTS, solution="B", data_type=data_type,
                  path=None if data_type == "text" else f"/v/{i}.mp4", meta={"task": "t"})


def task() -> EvalTask:
    bench = BenchmarkRun("bench", get_benchmark("videomme"), Path("a"), Path("r"), Path("s"),
                         Path("p.jsonl"), None, 0)
    return EvalTask(0, ModelRun("m", Path("m")), bench, 0, 1)


class Frames:
    """q1's media failed in preprocessing; every other question has two frames."""

    def get(self, s: Sample):
        if s.id == "q1":
            return "DecodeError: file is empty"
        return np.zeros((2, 28, 28, 3), np.uint8), 2.0


class Engine:
    """Answers B, but raises for any batch that holds q3 (say, out of memory)."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def generate(self, prompts, params):
        self.calls.append([p.sample_id for p in prompts])
        if any(p.sample_id == "q3" for p in prompts):
            raise RuntimeError("CUDA out of memory")
        return Rollouts(n=1, response_ids=[[1]] * len(prompts),
                        texts=["<answer>B</answer>"] * len(prompts))


def test_failures_are_rows_not_crashes():
    samples = [sample(0), sample(1), sample(2), sample(3), sample(4, "text")]
    engine = Engine()
    rows, _ = evaluate_samples(engine, Frames(), samples, task(), SamplingParams(), 8)
    assert [r["id"] for r in rows] == ["q0", "q1", "q2", "q3", "q4"]
    assert [(r["status"], r["score"]) for r in rows] == [
        ("ok", 1.0), ("media_failed", 0.0), ("ok", 1.0), ("error", 0.0), ("ok", 1.0)]
    assert rows[1]["reason"] == "DecodeError: file is empty"
    assert "out of memory" in rows[3]["reason"]
    # The failing batch was retried question by question; q1 never reached the engine.
    assert engine.calls[0] == ["q0", "q2", "q3", "q4"]
    assert engine.calls[1:] == [["q0"], ["q2"], ["q3"], ["q4"]]


def test_on_the_fly_decode_times_out(monkeypatch):
    cfg = load_config(None, ["eval.decode_timeout_s=0.2"])

    def hang(*args, **kwargs):
        time.sleep(5)

    monkeypatch.setattr("evr1.video.decode.load_visual", hang)
    start = time.perf_counter()
    got = DecodedFrames(cfg).get(sample(0))
    assert got == "decode timed out after 0.2 s"
    assert time.perf_counter() - start < 2


def test_local_tasks_share_the_cores(monkeypatch):
    cfg = load_config(None, ["launch.array_parallelism=64"])
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu_threads(cfg, 8) == 16  # in-process or on Slurm: the whole allocation
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    assert cpu_threads(cfg, 8) == 2  # 8 local tasks side by side on 16 cores
    assert cpu_threads(cfg, 1) == 16
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads(cfg, 8) == 3  # the user's explicit choice


def test_latest_is_pinned_for_the_collector(tmp_path):
    from evr1.eval.plan import pin_models, resolve_models

    def checkpoint(step: int) -> None:
        folder = tmp_path / f"checkpoints/step-{step:08d}"
        (folder / "model").mkdir(parents=True)
        (folder / "model/config.json").write_text("{}")
        (folder / "meta.json").write_text("{}")

    cfg = load_config(None, [f"run_dir={tmp_path}"])
    checkpoint(2)
    assert pin_models(cfg, record=True).eval.models == [
        str(tmp_path / "checkpoints/step-00000002/model")]
    checkpoint(3)  # training went on after the array was submitted
    assert [m.label for m in resolve_models(cfg)] == ["step-00000003"]
    assert [m.label for m in resolve_models(cfg, pinned=True)] == ["step-00000002"]


def test_chained_submission_counts_tasks_before_the_checkpoint_exists(tmp_path, monkeypatch):
    from evr1.eval.plan import pinned_file
    from evr1.pipeline import stages

    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text('{"id": "t1", "problem_type": "boolean", "problem": "Is 2 > 1?", '
                       '"solution": "yes", "data_type": "text"}\n')
    cfg = load_config(None, [f"run_dir={tmp_path}", f"data.eval_jsonl={heldout}",
                             "eval.num_shards=3", "eval.models=[latest, latest]"])
    pinned_file(cfg).parent.mkdir(parents=True)
    pinned_file(cfg).write_text('{"latest": "/old/model"}')
    submitted = {}

    def fake_submit(fn, tasks, launch, folder, name, after=()):
        submitted.update(tasks=tasks, name=name, after=after)
        return []

    monkeypatch.setattr(stages, "submit_array", fake_submit)
    assert stages.submit_eval(cfg, after=["123"]) == []
    # No checkpoint exists yet: 2 models x 1 benchmark x 3 shards, resolved by the tasks.
    assert submitted == {"tasks": list(range(6)), "name": "evr1-eval", "after": ["123"]}
    assert not pinned_file(cfg).exists()
    assert (tmp_path / "eval/prepared/synthetic.jsonl").exists()
