"""Curation by pass rate: the array on the tiny model, the filter, the report, resume.

The synthetic set includes a truncated and an empty video (failed in preprocessing): their
samples must get a ``media_failed`` record and be counted, not stop the task. The input JSONL
is the synthetic training file without its ``offline_output`` fields, so that attaching a
sampled response can be seen.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import script_module

from evr1 import tasks
from evr1.config import ConfigError, load_config
from evr1.data.schema import load_samples, write_samples
from evr1.data.synthetic import make_synthetic
from evr1.files import atomic_write_jsonl, read_jsonl
from evr1.models.loading import ensure_model
from evr1.pipeline import curate, stages

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ["launch.cluster=local", "launch.max_retries=0"]
CURATE = {"num_shards": 2, "k": 4, "max_new_tokens": 6, "batch_size": 3}


# --------------------------------------------------------------------------- unit


def test_buckets_and_range_semantics():
    assert [curate.bucket(p) for p in (0, 0.125, 0.25, 0.375, 0.75, 0.875, 1)] == \
        ["0", "(0,0.25]", "(0,0.25]", "(0.25,0.5]", "(0.5,0.75]", "(0.75,1)", "1"]
    cfg = load_config(None, [])
    assert [curate.in_range(p, cfg) for p in (0, 0.125, 0.875, 1)] == [False, True, True, False]
    cfg = load_config(None, ["curate.min_pass_rate=0.25", "curate.max_pass_rate=0.5",
                             "curate.inclusive=min"])
    assert [curate.in_range(p, cfg) for p in (0.125, 0.25, 0.375, 0.5)] == \
        [False, True, True, False]


@pytest.mark.parametrize("override, message", [
    ("curate.k=0", "curate.k must be >= 1"),
    ("curate.max_pass_rate=1.5", "curate.max_pass_rate must be in"),
    ("curate.inclusive=left", "curate.inclusive='left' is not one of"),
    ("curate.caps={boolean: -1}", "curate.caps.boolean must be >= 0"),
    ("curate.attach_offline_below=0", "curate.attach_offline_below must be in"),
])
def test_bad_curate_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_empty_range_is_refused():
    with pytest.raises(ConfigError, match="keeps nothing unless curate.inclusive=both"):
        load_config(None, ["curate.min_pass_rate=0.5", "curate.max_pass_rate=0.5"])


# --------------------------------------------------------------------------- fixture


@pytest.fixture(scope="module")
def run_config(tmp_path_factory) -> Path:
    """Synthetic data (with two broken videos), shards, a tiny model, and the config file."""
    root = tmp_path_factory.mktemp("curate")
    raw = yaml.safe_load((ROOT / "configs/demo_cpu.yaml").read_text())
    raw.update(run_dir=str(root), curate={**CURATE, "input_jsonl": str(root / "input.jsonl")})
    raw["synthetic"].update(out_dir=str(root / "data"), num_videos=4, include_real_videos=False,
                            include_corrupt=True)
    raw["data"].update(train_jsonl=str(root / "data/train.jsonl"),
                       eval_jsonl=str(root / "data/heldout.jsonl"))
    raw["model"]["path"] = str(root / "tiny_model")
    raw["preprocess"]["num_tasks"] = 1
    path = root / "curate.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path, LOCAL)
    make_synthetic(cfg.synthetic, progress=False)
    assert stages.preprocess_sequential(cfg) == 0
    ensure_model(cfg)
    samples = load_samples(cfg.data.train_jsonl, check_media=False)
    for s in samples:
        s.offline_output = None
    write_samples(root / "input.jsonl", samples)
    return path


def launch(config: Path, *args: str) -> int:
    return script_module("launchers/curate.py").main(["--config", str(config), *args, *LOCAL])


def records_by_id(cfg) -> dict[str, dict]:
    return {r["id"]: r for r in read_jsonl(curate.curate_dir(cfg) / "pass_rates.jsonl")}


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_array_writes_pass_rates_filtered_jsonl_and_report(run_config, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # same threads as the direct computation
    assert launch(run_config, "--array") == 0
    out = capsys.readouterr().out
    assert "| **all** |" in out and "curated:" in out
    cfg = load_config(run_config, LOCAL)
    out_dir = curate.curate_dir(cfg)
    inputs = load_samples(cfg.curate.input_jsonl, check_media=False)
    records = records_by_id(cfg)
    assert set(records) == {s.id for s in inputs}
    # The broken videos: recorded with the reason, counted, nothing else lost.
    failed = {i: r for i, r in records.items() if r["status"] != "ok"}
    assert set(failed) == {s.id for s in inputs if s.id.startswith("corrupt-")}
    assert all(r["status"] == "media_failed" and r["reason"] for r in failed.values())
    for r in records.values():
        if r["status"] == "ok":
            assert r["k"] == 4 and len(r["accuracies"]) == 4
            assert r["pass_rate"] == sum(a >= 1.0 for a in r["accuracies"]) / 4
    # The filter keeps exactly the samples with 0 < p < 1, in input order.
    kept = [s.id for s in load_samples(curate.output_jsonl(cfg), check_media=False)]
    assert kept == [s.id for s in inputs
                    if records[s.id]["status"] == "ok" and 0 < records[s.id]["pass_rate"] < 1]
    report = json.loads((out_dir / "report.json").read_text())
    totals = report["totals"]
    assert report["complete"] and report["keep"] == "(0, 1)"
    assert totals["samples"] == len(inputs) and totals["media_failed"] == len(failed)
    assert totals["kept"] == len(kept)
    assert sum(totals["buckets"].values()) == len(inputs) - len(failed)
    assert sum(e["samples"] for e in report["by_problem_type"].values()) == len(inputs)
    assert {f["id"] for f in report["failures"]} == set(failed)
    assert (out_dir / "pass_rates.png").stat().st_size > 5000
    assert "| problem type | samples | failed | 0 |" in (out_dir / "report.md").read_text()


@pytest.mark.slow
def test_pass_rates_equal_a_direct_computation(run_config):
    """k responses with the same seed, scored with evr1.rewards.score, for shard 0's first
    batch (the array ran in other processes)."""
    import torch

    from evr1.eval.runner import ShardFrames
    from evr1.models.loading import load_model, load_processor
    from evr1.rewards import score
    from evr1.rollout.base import Prompt, SamplingParams
    from evr1.rollout.hf import HFRolloutEngine

    cfg = load_config(run_config, LOCAL)
    records = records_by_id(cfg)
    if not records:
        pytest.skip("needs the array run")
    batch = curate.shard_samples(cfg, 0)[:CURATE["batch_size"]]
    frames = ShardFrames(cfg.shard_dir, cfg.data.video.fps)
    got = [(s, frames.get(s)) for s in batch]
    ready = [(s, f) for s, f in got if not isinstance(f, str)]
    assert len(ready) >= 2
    torch.set_num_threads(1)
    engine = HFRolloutEngine(load_model(cfg.model_path, "float32", "cpu"),
                             load_processor(cfg.model_path))
    torch.manual_seed(curate.batch_seed(cfg.curate.seed, [s.id for s, _ in ready]))
    out = engine.generate([Prompt(s.id, s.problem, s.data_type, f[0], fps=f[1])
                           for s, f in ready],
                          SamplingParams(n=4, temperature=1.0, max_new_tokens=6))
    for i, (sample, _) in enumerate(ready):
        texts = out.texts[i * 4:(i + 1) * 4]
        acc = [score(sample.problem_type, t, sample.solution, options=sample.options).accuracy
               for t in texts]
        rec = records[sample.id]
        assert rec["lengths"] == [len(ids) for ids in out.response_ids[i * 4:(i + 1) * 4]]
        assert rec["accuracies"] == acc
        assert rec["pass_rate"] == sum(a == 1.0 for a in acc) / 4
        passing = [t for t, a in zip(texts, acc, strict=True) if a == 1.0]
        assert rec["correct_response"] == (passing[0] if passing else None)


@pytest.mark.slow
def test_killed_task_rerun_completes_only_the_missing_shard(run_config, monkeypatch, capsys):
    cfg = stages.prepare_curation(load_config(run_config, LOCAL))
    shard0 = curate.CurateFiles.of(cfg, 0, 2)
    shard1 = curate.CurateFiles.of(cfg, 1, 2)
    if not shard1.records.exists():
        pytest.skip("needs the array run")
    before = read_jsonl(shard1.records)
    mtime0 = shard0.records.stat().st_mtime_ns
    # Task 1 is killed in its second batch: its outputs are gone, its first batch is saved.
    shard1.records.unlink()
    shard1.marker.unlink()
    calls = {"n": 0}
    real = curate.curate_batch

    def dies_in_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(curate, "curate_batch", dies_in_second_batch)
    with pytest.raises(KeyboardInterrupt):
        curate.curate_shard(cfg, 1)
    monkeypatch.setattr(curate, "curate_batch", real)
    assert shard1.partial.exists() and not shard1.records.exists()
    assert launch(run_config, "--collect") == 1
    assert "MISSING: curate shard 1 of 2" in capsys.readouterr().out
    # The re-run: shard 0 is skipped untouched; shard 1 resumes after its first batch and
    # ends with the records the uninterrupted run wrote.
    results = [curate.curate_shard(cfg, i) for i in range(2)]
    assert [r.skipped for r in results] == [True, False]
    assert results[1].resumed_batches == 1
    assert shard0.records.stat().st_mtime_ns == mtime0
    assert read_jsonl(shard1.records) == before
    assert not shard1.partial.exists()
    assert launch(run_config, "--collect") == 0


@pytest.mark.slow
def test_collector_filter_caps_and_offline_on_known_pass_rates(run_config, tmp_path):
    """Records with chosen pass rates: exactly the in-range samples are kept, caps are a
    seeded draw, and offline_output is the correct response for 0 < p < threshold."""
    base = load_config(run_config, LOCAL)
    inputs = load_samples(base.curate.input_jsonl, check_media=False)
    rates = [0.0, 0.25, 0.5, 0.75, 1.0]
    records = []
    for i, s in enumerate(inputs):
        if s.id.startswith("corrupt-"):
            records.append(curate.failed_record(s, curate.MEDIA_FAILED, "no frames"))
            continue
        p = rates[i % len(rates)]
        passes = int(p * 4)
        records.append({**curate.failed_record(s, curate.OK, ""), "status": "ok", "k": 4,
                        "passes": passes, "pass_rate": p, "mean_reward": p,
                        "accuracies": [1.0] * passes + [0.0] * (4 - passes),
                        "correct_response": f"<answer>{s.id}</answer>" if passes else None})

    def collect(*overrides: str):
        cfg = load_config(run_config, [*LOCAL, f"curate.out_dir={tmp_path / 'c'}", *overrides])
        for shard in range(2):
            files = curate.CurateFiles.of(cfg, shard, 2)
            atomic_write_jsonl(files.records, records[shard::2])
            tasks.write_marker(files.marked(shard, 2), curate.settings(cfg))
        assert stages.collect_curation(cfg) == 0
        return cfg, {s.id: s for s in load_samples(curate.output_jsonl(cfg), check_media=False)}

    by_id = {r["id"]: r for r in records}
    ok = [r for r in records if r["status"] == "ok"]
    cfg, kept = collect("curate.attach_offline_below=0.6")
    assert set(kept) == {r["id"] for r in ok if 0 < r["pass_rate"] < 1}
    for sample_id, sample in kept.items():
        p = by_id[sample_id]["pass_rate"]
        assert sample.meta["pass_rate"] == p
        assert sample.offline_output == (f"<answer>{sample_id}</answer>" if p < 0.6 else None)
    report = json.loads((curate.curate_dir(cfg) / "report.json").read_text())
    assert report["offline_output"]["attached"] == sum(1 for r in ok if 0 < r["pass_rate"] < 0.6)
    assert report["totals"]["below_range"] == sum(1 for r in ok if r["pass_rate"] == 0)
    assert report["totals"]["above_range"] == sum(1 for r in ok if r["pass_rate"] == 1)
    # Closed range [0.25, 0.75] and a cap on multiple choice.
    in_range = [r for r in ok if 0.25 <= r["pass_rate"] <= 0.75]
    mc = [r["id"] for r in in_range if r["problem_type"] == "multiple_choice"]
    assert len(mc) > 2
    caps = ["curate.min_pass_rate=0.25", "curate.max_pass_rate=0.75", "curate.inclusive=both",
            "curate.caps={'multiple choice': 2}"]
    _, kept = collect(*caps)
    assert {i for i in kept if i not in mc} == {r["id"] for r in in_range if r["id"] not in mc}
    chosen = [i for i in kept if i in mc]
    assert len(chosen) == 2
    _, again = collect(*caps)
    assert [i for i in again if i in mc] == chosen  # the same draw every time
    _, other_seed = collect(*caps, "curate.seed=1")  # (a new seed: other records expected,
    assert len([i for i in other_seed if i in mc]) == 2  # but the same number)


def test_collect_refuses_an_unknown_cap_type(tmp_path):
    cfg = load_config(None, ["curate.caps={nonsense: 1}"])
    with pytest.raises(ConfigError, match="curate.caps.nonsense: unknown problem type"):
        curate.canonical_caps(cfg)


def test_partial_file_with_a_torn_last_line_is_read_up_to_it(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    files = curate.CurateFiles.of(cfg, 0, 1)
    files.partial.parent.mkdir(parents=True)
    expected = {"model": "m"}
    files.partial.write_text(json.dumps({"fingerprint": expected}) + "\n"
                             + json.dumps({"batch": 0, "records": [{"id": "a"}]}) + "\n"
                             + '{"batch": 1, "reco')
    assert curate._read_partial(files, expected) == {0: [{"id": "a"}]}
    assert curate._read_partial(files, {"model": "other"}) == {}
    os.remove(files.partial)
    assert curate._read_partial(files, expected) == {}


def test_a_failing_generation_or_solution_costs_only_its_sample():
    """A batch whose generation raises is retried prompt by prompt; the prompt that still
    fails and a sample whose solution cannot be scored get error records."""
    from evr1.data.schema import Sample
    from evr1.rollout.base import Rollouts

    class Engine:
        calls = 0

        def generate(self, prompts, params):
            Engine.calls += 1
            if any(p.sample_id == "bad" for p in prompts):
                raise RuntimeError("out of memory")
            texts = ["<answer>A</answer>", "<answer>B</answer>"] * (params.n // 2)
            return Rollouts(n=params.n, response_ids=[[1, 2]] * len(prompts) * params.n,
                            texts=texts * len(prompts), truncated=[False] * params.n
                            * len(prompts))

    def sample(sample_id, ptype="multiple_choice", solution="A"):
        return Sample(id=sample_id, problem_type=ptype, problem="q", solution=solution,
                      options=["A. x", "B. y"], data_type="text")

    cfg = load_config(None, ["curate.k=4"])
    batch = [sample("good"), sample("bad"), sample("nosol", "numerical", "abc")]
    good, bad, nosol = curate.curate_batch(Engine(), None, batch, cfg)
    assert Engine.calls == 4  # the batch, then each prompt alone
    assert (good["status"], good["pass_rate"], good["correct_response"]) == \
        ("ok", 0.5, "<answer>A</answer>")
    assert good["lengths"] == [2, 2, 2, 2]
    assert bad["status"] == "error" and "out of memory" in bad["reason"]
    assert nosol["status"] == "error" and "InvalidSolution" in nosol["reason"]


@pytest.mark.slow
def test_shards_of_other_settings_are_refused_then_forced(run_config, capsys):
    """A shard finished with other sampling settings was redone silently; now --array
    refuses, naming the folder and the setting, and --force redoes it."""
    cfg = stages.prepare_curation(load_config(run_config, LOCAL))
    shard0 = curate.CurateFiles.of(cfg, 0, 2)
    if not shard0.records.exists():
        pytest.skip("needs the array run")
    before = {p: p.read_bytes() for p in shard0.records.parent.iterdir()}
    with pytest.raises(SystemExit) as refused:
        launch(run_config, "--array", "curate.k=2")
    message = str(refused.value)
    assert f"{shard0.records.parent}: tasks 0, 1 of 2 finished with other settings" in message
    assert "sampling.k: 4 -> 2" in message and "--force" in message
    assert "curate.out_dir" in message
    assert {p: p.read_bytes() for p in shard0.records.parent.iterdir()} == before
    assert launch(run_config, "--collect", "curate.k=2") == 1
    assert "MISSING: curate shard 0 of 2 (array task 0): made with other settings" in \
        capsys.readouterr().out
    fewer = stages.prepare_curation(load_config(run_config, [*LOCAL, "curate.k=2"]))
    assert not curate.curate_shard(fewer, 0, force=True).skipped
    assert {r["k"] for r in read_jsonl(shard0.records) if r["status"] == "ok"} == {2}
    assert curate.curate_shard(fewer, 0).skipped
