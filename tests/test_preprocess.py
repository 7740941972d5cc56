"""The preprocessing stage end to end: synthetic + real + corrupt media -> shards, as an array.

Runs the real launcher through submitit's local executor; the kill test SIGKILLs a task
process midway and checks that the re-run produces the same manifest as an uninterrupted run
(the same frames: an LZF shard's own bytes may differ, see evr1.video.shards.ShardWriter).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import script_module

from evr1.config import Config, dump_config, load_config
from evr1.data.preprocess import collect_media, preprocess_shard
from evr1.data.schema import load_samples
from evr1.data.synthetic import make_synthetic
from evr1.pipeline import stages
from evr1.tasks import contiguous as task_slice
from evr1.video.decode import load_visual
from evr1.video.shards import (
    FAILURES,
    MANIFEST,
    ShardError,
    ShardReader,
    TaskFiles,
    frames_sha256,
)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    cfg = load_config(ROOT / "configs/demo_cpu.yaml",
                      [f"synthetic.out_dir={out}", "synthetic.num_videos=6"])
    make_synthetic(cfg.synthetic, progress=False)
    return out


def demo_config(dataset: Path, run_dir: Path, *overrides: str) -> Config:
    return load_config(ROOT / "configs/demo_cpu.yaml", [
        f"run_dir={run_dir}", f"data.train_jsonl={dataset / 'train.jsonl'}",
        f"data.eval_jsonl={dataset / 'heldout.jsonl'}", "launch.cluster=local", *overrides])


def test_array_run_writes_shards_manifest_and_failures(dataset, tmp_path):
    cfg = demo_config(dataset, tmp_path / "run")
    assert stages.preprocess_array(cfg) == 0
    manifest = json.loads((cfg.shard_dir / MANIFEST).read_text())
    failures = [json.loads(x) for x in (cfg.shard_dir / FAILURES).read_text().splitlines()]

    samples = (load_samples(dataset / "train.jsonl", check_media=False)
               + load_samples(dataset / "heldout.jsonl", check_media=False))
    visual = [s for s in samples if s.data_type != "text"]
    failed_ids = {f["id"] for f in failures}
    # Every visual sample is either in the manifest or recorded as a failure, never both.
    assert set(manifest["samples"]) | failed_ids == {s.id for s in visual}
    assert not set(manifest["samples"]) & failed_ids
    # The deliberately broken files are the failures, each with a reason naming the problem.
    assert failed_ids == {s.id for s in visual if s.id.startswith("corrupt-")}
    reasons = {f["path"].rsplit("/", 1)[-1]: f["reason"] for f in failures}
    assert any("empty" in r.lower() or "zero" in r.lower() for r in reasons.values()), reasons
    # Real H.264 clips and both synthetic codecs made it in; each media file stored once.
    paths = {m["path"] for m in manifest["media"].values()}
    assert any("bigbuckbunny" in p for p in paths)
    assert {Path(p).suffix for p in paths} >= {".mp4", ".webm", ".png"}
    assert len(manifest["media"]) < len(manifest["samples"])
    assert len(manifest["shards"]) == cfg.preprocess.num_tasks

    # Shard frames are exactly what decoding + sampling + resizing gives on the fly.
    reader = ShardReader(cfg.shard_dir)
    for sample in visual[:12]:
        if sample.id in failed_ids:
            continue
        got = reader.get(sample.id)
        direct = load_visual(sample.path, sample.data_type, cfg.data,
                             backend=got.media.backend.split("-")[0])
        np.testing.assert_array_equal(got.frames, direct.frames)
        assert got.media.sha256 == frames_sha256(direct.frames)
        assert got.media.indices == list(direct.indices)
        budget = cfg.data.video if sample.data_type == "video" else cfg.data.image
        t, h, w, _ = got.frames.shape
        assert h % cfg.data.resize_factor == 0 and w % cfg.data.resize_factor == 0
        assert h * w <= budget.max_pixels
        if sample.data_type == "video":
            assert t % cfg.data.temporal_patch_size == 0 and t <= budget.max_frames


def manifest_content(cfg: Config) -> dict:
    """The merged manifest without the shard files' checksums and sizes: every media entry
    (with its frames' sha256), sample and setting. LZF's compressed bytes are not reproducible
    (evr1.video.shards.ShardWriter), the frames they hold are."""
    manifest = json.loads((cfg.shard_dir / MANIFEST).read_text())
    for shard in manifest["shards"]:
        del shard["shard_sha256"], shard["shard_bytes"]
    return manifest


def test_rerun_skips_complete_tasks_and_redoes_a_damaged_one(dataset, tmp_path):
    cfg = demo_config(dataset, tmp_path / "run")
    assert stages.preprocess_sequential(cfg) == 0
    before = manifest_content(cfg)
    shard1 = TaskFiles.of(cfg.shard_dir, 1, 2).shard
    mtime0 = TaskFiles.of(cfg.shard_dir, 0, 2).shard.stat().st_mtime_ns

    data = bytearray(shard1.read_bytes())
    data[len(data) // 2] ^= 0xFF  # silent corruption: same size, different bytes
    shard1.write_bytes(bytes(data))
    assert stages.preprocess_sequential(cfg) == 0
    assert TaskFiles.of(cfg.shard_dir, 0, 2).shard.stat().st_mtime_ns == mtime0, \
        "a complete task must not be redone"
    assert manifest_content(cfg) == before


def test_killed_task_rerun_gives_the_same_manifest(dataset, tmp_path):
    reference = demo_config(dataset, tmp_path / "reference")
    assert stages.preprocess_sequential(reference) == 0
    cfg = demo_config(dataset, tmp_path / "killed")
    config_path = tmp_path / "killed.yaml"
    dump_config(cfg, config_path)
    files = TaskFiles.of(cfg.shard_dir, 0, 2)
    proc = subprocess.Popen([sys.executable, str(ROOT / "launchers/preprocess.py"),
                             "--config", str(config_path), "--task", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp_glob = f".{files.shard.name}.*.tmp"
    deadline = time.monotonic() + 120
    while not list(cfg.shard_dir.glob(tmp_glob)) and proc.poll() is None:
        assert time.monotonic() < deadline, "the task never started writing its shard"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the task finished before it could be killed"
    # Killed midway: nothing under a final name, nothing that looks complete.
    assert not files.shard.exists() and not files.manifest.exists()
    assert not (cfg.shard_dir / MANIFEST).exists()

    assert stages.preprocess_array(cfg) == 0
    assert not list(cfg.shard_dir.glob(".*.tmp")), "the re-run must clean the killed temporaries"
    assert manifest_content(cfg) == manifest_content(reference)


def test_task_slices_cover_every_media_file_once(dataset):
    samples = load_samples(dataset / "train.jsonl", check_media=False)
    jobs = collect_media(samples)
    for num_tasks in (1, 2, 3, 7, len(jobs) + 3):
        covered = [i for t in range(num_tasks) for i in task_slice(len(jobs), t, num_tasks)]
        assert covered == list(range(len(jobs)))
    with pytest.raises(ValueError, match="outside 0..1"):
        task_slice(10, 2, 2)


def test_preprocess_cli_reports_a_bad_config_field(tmp_path):
    # In this process: the launcher's main exits with the message (a process of its own, with
    # no traceback, is checked below and in tests/test_config.py).
    with pytest.raises(SystemExit) as refused:
        launcher_main("preprocess")(["--config", str(ROOT / "configs/demo_cpu.yaml"),
                                     "data.video.fsp=1"])
    assert "unknown config key data.video.fsp" in str(refused.value)


def test_bad_samples_stop_preprocess_and_train_before_any_work(dataset, tmp_path):
    # Issue #24: an unknown problem type and a list solution for multiple_choice passed
    # preprocessing and killed training at the step that drew them; a relative path that
    # leaves the media root was decoded. Now both launchers refuse at once, naming each one.
    good = [json.loads(line) for line in (dataset / "train.jsonl").read_text().splitlines()]
    mc = next(r for r in good if r["problem_type"] == "multiple_choice")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in [
        good[0], {**good[1], "problem_type": "colour_naming"},
        {**mc, "id": "mc-list", "solution": [mc["solution"]]},
        {**good[2], "id": "escape", "path": "../outside/x.mp4"}]))
    run_dir = tmp_path / "run"
    common = ["--config", str(ROOT / "configs/demo_cpu.yaml"), f"run_dir={run_dir}",
              f"data.train_jsonl={bad}", f"data.media_root={dataset}", "data.eval_jsonl=",
              "launch.cluster=local"]

    def refusal(launcher: str, *extra: str) -> str:
        """The launcher's error message; the first as a process of its own, as users run it
        (its exit code and stderr), the others in this process (their SystemExit): a
        process start costs ~15 s of CI, importing torch and transformers."""
        if launcher == "preprocess" and not extra:
            out = subprocess.run([sys.executable, str(ROOT / "launchers/preprocess.py"),
                                  *common], capture_output=True, text=True, timeout=300)
            assert out.returncode != 0, out.stdout
            assert "Traceback" not in out.stderr, out.stderr
            return out.stderr
        with pytest.raises(SystemExit) as refused:
            launcher_main(launcher)([*common, *extra])
        return str(refused.value)

    for launcher in ("preprocess", "train"):
        err = refusal(launcher)
        assert f"data error: 3 problem(s) in the sample files:\n{bad}:2: sample " \
               f"{good[1]['id']}: field problem_type: unknown problem type 'colour_naming'" \
               in err, err
        assert f"{bad}:3: sample mc-list: field solution: " in err
        assert f"{bad}:4: sample escape: field path: relative media path '../outside/x.mp4' " \
               "resolves to" in err
        assert not run_dir.exists()  # no shards, no model, no checkpoints: nothing was done
    # reward.fallback_type admits the unknown type (scored as open_ended); the rest remain.
    err = refusal("preprocess", "reward.fallback_type=open_ended")
    assert "data error: 2 problem(s)" in err and "colour_naming" not in err


def test_missing_sample_files_or_shards_say_how_to_make_them(dataset, tmp_path):
    """A new checkout trains before making the demo's data or its shards: the refusal (no
    traceback) names what is missing and the command that makes it."""
    config = str(ROOT / "configs/demo_cpu.yaml")
    missing = tmp_path / "data" / "train.jsonl"
    common = ["--config", config, f"run_dir={tmp_path}", "data.eval_jsonl=",
              "launch.cluster=local"]
    with pytest.raises(SystemExit) as refused:
        launcher_main("train")([*common, f"data.train_jsonl={missing}"])
    err = str(refused.value)
    assert f"{missing}: cannot read: No such file or directory" in err, err
    assert f"python launchers/pipeline.py --config {config} --stages preprocess" in err, err

    with pytest.raises(SystemExit) as refused:
        launcher_main("train")([*common, f"data.train_jsonl={dataset / 'train.jsonl'}",
                                f"data.media_root={dataset}"])
    err = str(refused.value)
    assert err.startswith("shard error: ") and "manifest.json not found" in err, err


def test_training_prompt_set_refuses_a_sample_the_rewards_cannot_score(dataset, tmp_path):
    # The trainer's own load (inside a submitted job) fails before it builds a model.
    from evr1.data.dataset import PromptSet
    from evr1.data.schema import SampleError

    text = [json.loads(line) for line in (dataset / "train.jsonl").read_text().splitlines()
            if '"data_type": "text"' in line]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(text[0]) + "\n" + json.dumps(
        {**text[1], "problem_type": "colour_naming"}) + "\n")
    with pytest.raises(SampleError, match=r"bad\.jsonl:2: .*field problem_type"):
        PromptSet.load(str(bad), None)
    assert len(PromptSet.load(str(bad), None, fallback_type="open_ended")) == 2


def test_inspect_shards_reports_and_catches_corruption(dataset, tmp_path, capsys):
    cfg = demo_config(dataset, tmp_path / "run", "preprocess.num_tasks=1")
    assert stages.preprocess_sequential(cfg) == 0
    tool = [sys.executable, str(ROOT / "tools/inspect_shards.py"), str(cfg.shard_dir)]
    ok = subprocess.run(tool, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "checksums: OK" in ok.stdout and "failures: 2 samples" in ok.stdout
    shard = TaskFiles.of(cfg.shard_dir, 0, 1).shard
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = subprocess.run(tool, capture_output=True, text=True)
    assert bad.returncode == 1
    assert "CHECKSUM MISMATCH" in bad.stdout


def launcher_main(name: str):
    """``main`` of launchers/<name>.py, to run in this process (a refusal is a SystemExit)."""
    return script_module(f"launchers/{name}.py").main


def run_launcher(config: Path, *args: str) -> int:
    """launchers/preprocess.py in this process."""
    return launcher_main("preprocess")(["--config", str(config), *args])


def test_rerun_with_another_fps_is_refused_then_forced(dataset, tmp_path):
    # Issue 18: a re-run with another data.video.fps skipped every finished task, so the
    # shards kept the old frames and nothing said so. Now the launcher refuses before any
    # work, naming the folder and the setting; --force redoes the tasks with the new fps.
    # Up to 16 frames, so that the frame counts follow the fps (the demo takes 4 always).
    cfg = demo_config(dataset, tmp_path / "run", "data.video.max_frames=16")
    config = tmp_path / "run.yaml"
    dump_config(cfg, config)
    assert run_launcher(config) == 0
    files = sorted(p for p in cfg.shard_dir.iterdir() if p.is_file())
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    old = ShardReader(cfg.shard_dir, cfg.data)
    frames_before = {i: old.entry(i).num_frames for i in old.ids}

    with pytest.raises(SystemExit) as refused:
        run_launcher(config, "data.video.fps=1.0")
    message = str(refused.value)
    assert message.startswith(f"config error: {cfg.shard_dir}: tasks 0, 1 of 2 finished with "
                              "other settings"), message
    assert "data.video.fps: 2.0 -> 1.0" in message and "--force" in message
    assert "preprocess.out_dir" in message
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == before, \
        "a refused run must not touch the shards, manifests or the recorded config"
    assert not [p for p in cfg.shard_dir.iterdir() if p.is_file() and p not in before]
    # The trainer reading these shards with fps 1.0 is refused too, by name.
    slower = load_config(config, ["data.video.fps=1.0"])
    with pytest.raises(ShardError, match=r"data.video.fps is 2.0 in these shards .* but 1.0"):
        ShardReader(cfg.shard_dir, slower.data)

    assert run_launcher(config, "data.video.fps=1.0", "--force") == 0
    new = ShardReader(cfg.shard_dir, slower.data)
    videos = [i for i in new.ids if new.entry(i).data_type == "video"]
    assert {new.entry(i).sampling["fps"] for i in videos} == {1.0}
    assert set(new.ids) == set(frames_before)
    assert any(new.entry(i).num_frames < frames_before[i] for i in videos)
    for sample_id in videos[:4]:  # the frames are what decoding at 1 fps gives
        entry = new.entry(sample_id)
        direct = load_visual(entry.path, entry.data_type, slower.data,
                             backend=entry.backend.split("-")[0])
        assert entry.sha256 == frames_sha256(direct.frames)
    redone = {p: p.stat().st_mtime_ns for p in cfg.shard_dir.glob("shard-*.h5")}

    # The same settings again: every task skipped, nothing rewritten.
    assert stages.preprocess_sequential(slower) == 0
    assert {p: p.stat().st_mtime_ns for p in cfg.shard_dir.glob("shard-*.h5")} == redone
    assert all(preprocess_shard(slower, t).skipped for t in range(2))
