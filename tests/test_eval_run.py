"""Evaluation end to end on the tiny model: prepare, preprocess, tasks, collect, resume, judge.

Benchmark files are written in their published formats (tests/test_eval_formats.py) over the
synthetic videos; one Video-MME video is missing on purpose (a media failure that must be
counted). The benchmarks' frame caches are made by preprocess arrays through submitit's local
executor; the six eval tasks run in this process (``launchers/eval.py`` without ``--array``:
the same task function; a local process per task cost ~14 CPU s of start-up each, and the
eval array itself is run on Slurm by tests/test_slurm.py, local arrays by
tests/test_preprocess.py). VCR-Bench's open-ended
question is evaluated with frames decoded on the fly, reported unjudged, then judged by a fake
OpenAI-compatible server.
"""

from __future__ import annotations

import json
import shutil
import threading
from http.server import HTTPServer
from pathlib import Path

import pytest
import yaml
from conftest import script_module
from test_eval_formats import videomme_rows, write_charades, write_parquet, write_vcrbench
from test_eval_scoring import _FakeJudge

from evr1.config import load_config
from evr1.data.schema import load_samples
from evr1.data.synthetic import make_synthetic
from evr1.models.loading import ensure_model
from evr1.pipeline import stages

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

BASE = ["synthetic.num_videos=4", "synthetic.include_real_videos=false",
        "synthetic.include_corrupt=false", "preprocess.num_tasks=1", "launch.cluster=local",
        "launch.max_retries=0"]


def write_benchmarks(root: Path, videos: list[Path]) -> list[dict]:
    """Video-MME (parquet) and Charades-STA (text) over the given videos."""
    mme = root / "videomme"
    ids = []
    for i, video in enumerate(videos[:3]):
        (mme / "data").mkdir(parents=True, exist_ok=True)
        shutil.copy(video, mme / "data" / f"v{i}{video.suffix}")
        ids.append(f"v{i}")
    write_parquet(mme / "videomme/test-00000-of-00001.parquet",
                  videomme_rows([*ids, "missing-video"]))
    cha = root / "charades"
    (cha / "videos").mkdir(parents=True)
    shutil.copy(videos[0], cha / "videos" / f"CH01{videos[0].suffix}")
    write_charades(cha / "charades_sta_test.txt", [("CH01", 0.0, 1.5, "a shape moves."),
                                                  ("CH01", 1.0, 3.0, "a shape stops.")])
    return [{"name": "synthetic"},
            {"name": "videomme", "annotation": str(mme / "videomme/test-00000-of-00001.parquet"),
             "video_root": str(mme), "official_score": 62.0},
            {"name": "charades_sta", "annotation": str(cha / "charades_sta_test.txt"),
             "video_root": str(cha)}]


@pytest.fixture(scope="module")
def run_config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evalrun")
    cfg = load_config(ROOT / "configs/demo_cpu.yaml", [
        f"run_dir={root}", f"synthetic.out_dir={root / 'data'}",
        f"data.train_jsonl={root / 'data/train.jsonl'}",
        f"data.eval_jsonl={root / 'data/heldout.jsonl'}", f"model.path={root / 'tiny_model'}",
        *BASE])
    make_synthetic(cfg.synthetic, progress=False)
    assert stages.preprocess_sequential(cfg) == 0
    ensure_model(cfg)
    videos = sorted(p for p in (root / "data/videos").iterdir() if p.name.startswith("syn-"))
    raw = yaml.safe_load((ROOT / "configs/demo_cpu.yaml").read_text())
    raw.update(run_dir=str(root), eval={
        "benchmarks": write_benchmarks(root / "bench", videos), "num_shards": 2,
        "max_new_tokens": 6, "batch_size": 4})
    raw["model"]["path"] = str(root / "tiny_model")
    raw["preprocess"]["num_tasks"] = 1
    raw["data"].update(train_jsonl=str(root / "data/train.jsonl"),
                       eval_jsonl=str(root / "data/heldout.jsonl"))
    path = root / "eval.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def launch(script: str, config: Path, *args: str) -> int:
    return script_module(f"launchers/{script}.py").main(["--config", str(config), *args,
                                                         *BASE[-2:]])


def results(config: Path) -> dict:
    return json.loads((config.parent / "eval/results.json").read_text())


def test_full_eval_then_collect(run_config, capsys):
    assert launch("eval", run_config, "--preprocess") == 0
    assert launch("eval", run_config) == 0  # every task, in this process
    assert launch("collect", run_config) == 0
    out = capsys.readouterr().out
    assert "| benchmark | metric | tiny_model | official |" in out
    assert "| videomme | accuracy |" in out and "62.0 |" in out

    res = results(run_config)
    assert res["complete"] and res["sampling"]["temperature"] == 0.0
    by = {r["benchmark"]: r for r in res["results"]}
    assert set(by) == {"synthetic", "videomme", "charades_sta"}
    heldout = load_samples(run_config.parent / "data/heldout.jsonl", check_media=False)
    assert by["synthetic"]["n"] == len(heldout)
    # The missing video is counted as a failed item, inside the denominator.
    assert (by["videomme"]["n"], by["videomme"]["n_media_failed"]) == (4, 1)
    assert by["charades_sta"]["metric"] == "mIoU"
    assert set(by["charades_sta"]["sub_scores"]["grounding"]) == {"R@0.3", "R@0.5", "R@0.7",
                                                                  "mIoU"}
    for r in res["results"]:
        assert r["n"] == r["n_scored"] + r["n_unjudged"]
    eval_dir = run_config.parent / "eval"
    assert (eval_dir / "results.png").stat().st_size > 1000
    # The prediction contract: one JSONL per shard with these fields.
    rows = [json.loads(x) for x in (eval_dir / "predictions/tiny_model/videomme/"
                                    "predictions-00000-of-00002.jsonl").read_text().splitlines()]
    assert rows and all({"id", "benchmark", "problem_type", "response", "extracted",
                         "score"} <= set(r) for r in rows)


def test_deleted_shard_is_reported_then_redone(run_config, capsys):
    shard = (run_config.parent / "eval/predictions/tiny_model/charades_sta/"
             "predictions-00001-of-00002.jsonl")
    if not shard.exists():
        pytest.skip("needs the full run")
    shard.unlink()
    assert launch("collect", run_config) == 1
    out = capsys.readouterr().out
    assert "MISSING: tiny_model/charades_sta shard 1 of 2 (eval array task 5)" in out
    assert not results(run_config)["complete"]
    # Re-running evaluates only that shard; everything finished is skipped.
    cfg = load_config(run_config, BASE[-2:])
    from evr1.eval.plan import pin_models
    from evr1.eval.runner import evaluate_shard

    cfg = pin_models(cfg)
    ran = [evaluate_shard(cfg, i) for i in range(6)]
    assert [r.skipped for r in ran] == [True] * 5 + [False]
    assert launch("collect", run_config) == 0


def test_open_ended_unjudged_then_judged_with_frames_decoded_on_the_fly(run_config, tmp_path):
    root = run_config.parent
    video = next(p for p in (root / "data/videos").iterdir() if p.name.startswith("syn-"))
    shutil.copy(video, tmp_path / video.name)
    bench = [{"name": "vcrbench", "annotation": str(write_vcrbench(tmp_path / "vcr.json",
                                                                   [video.name]))}]
    overrides = [f"eval.benchmarks={json.dumps(bench)}", f"eval.out_dir={tmp_path / 'eval'}",
                 "eval.num_shards=1", "eval.frames=decode", *BASE[-2:]]
    cfg = load_config(run_config, overrides)
    assert stages.run_evaluation(cfg, submit=False) == 0  # no --preprocess: decoded here
    assert stages.collect_results(cfg) == 0
    res = json.loads((tmp_path / "eval/results.json").read_text())["results"][0]
    assert res["n"] == 2 and res["sampling"]["frames"] == "decode"
    assert res["n_unjudged"] + res["n_unextracted"] >= 1  # the open-ended answer
    server = HTTPServer(("127.0.0.1", 0), _FakeJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        judged = load_config(run_config, [*overrides, "eval.judge.backend=server",
                                          f"eval.judge.url={url}"])
        assert stages.collect_results(judged) == 0
    finally:
        server.shutdown()
    res = json.loads((tmp_path / "eval/results.json").read_text())
    assert res["judge"] == "server" and res["results"][0]["n_unjudged"] == 0


def test_shards_of_other_sampling_settings_are_refused_then_forced(run_config, capsys):
    """Finished shards were redone silently when a setting changed; now the launcher refuses
    before any work, naming the folder and the setting, and --force redoes them."""
    from evr1.eval.plan import pin_models
    from evr1.eval.runner import evaluate_shard

    folder = run_config.parent / "eval/predictions/tiny_model/synthetic"
    if not (folder / "shard-00000-of-00002.json").exists():
        pytest.skip("needs the full run")
    before = {p: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(SystemExit) as refused:
        launch("eval", run_config, "--array", "eval.max_new_tokens=5")
    message = str(refused.value)
    assert message.startswith("config error: 3 folders hold tasks finished with other "
                              "settings"), message
    assert f"\n  {folder}: tasks 0, 1 of 2\n" in message
    assert "\nchanged:\n  sampling.max_new_tokens: 6 -> 5\n" in message
    assert "--force" in message and "eval.out_dir" in message
    assert {p: p.read_bytes() for p in folder.iterdir()} == before, "nothing may change"
    shorter = load_config(run_config, [*BASE[-2:], "eval.max_new_tokens=5"])
    assert stages.collect_results(shorter) == 1
    assert "MISSING: tiny_model/synthetic shard 0 of 2 (eval array task 0): stale" in \
        capsys.readouterr().out
    # --force redoes the task (here one, in this process) with the new settings.
    shorter = pin_models(shorter)
    assert not evaluate_shard(shorter, 0, force=True).skipped
    marker = json.loads((folder / "shard-00000-of-00002.json").read_text())
    assert marker["settings"]["sampling"]["max_new_tokens"] == 5
    assert evaluate_shard(shorter, 0).skipped and evaluate_shard(shorter, 0, force=True).skipped
