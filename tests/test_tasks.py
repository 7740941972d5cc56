"""The sharded-task helper (evr1.tasks): shares, markers with settings, refusal, --force."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evr1 import tasks
from evr1.config import ConfigError
from evr1.files import atomic_write_jsonl

SETTINGS = {"data": {"video": {"fps": 2.0, "max_frames": 4}, "patch_size": 14},
            "inputs": {"/d/train.jsonl": "aa"}}


def files_of(folder: Path, task: int, num_tasks: int = 2) -> tasks.TaskFiles:
    return tasks.TaskFiles(task, num_tasks,
                           marker=folder / tasks.part_name("marker", task, num_tasks, ".json"),
                           outputs=(folder / tasks.part_name("out", task, num_tasks, ".jsonl"),),
                           extra=(folder / tasks.part_name("partial", task, num_tasks, ".jsonl"),))


def finish(files: tasks.TaskFiles, settings: dict) -> None:
    atomic_write_jsonl(files.outputs[0], [{"task": files.task}])
    tasks.write_marker(files, settings, result={"items": 1})


def test_shares_are_the_stages_own_splits():
    items = list(range(11))
    for n in (1, 2, 3, 4, 11, 14):
        # Eval and curate: round robin, as items[i::n] always was.
        assert [tasks.strided(items, i, n) for i in range(n)] == [items[i::n] for i in range(n)]
        # Preprocess: contiguous, balanced, in order (the formula it always used).
        slices = [list(tasks.contiguous(len(items), i, n)) for i in range(n)]
        assert sum(slices, []) == items
        assert max(map(len, slices)) - min(map(len, slices)) <= 1
        assert slices == [list(range(i * 11 // n, (i + 1) * 11 // n)) for i in range(n)]
    with pytest.raises(ValueError, match="outside 0..1"):
        tasks.strided(items, 2, 2)
    with pytest.raises(ValueError, match="outside 0..2"):
        tasks.contiguous(5, -1, 3)
    assert tasks.part_name("shard", 3, 12, ".h5") == "shard-00003-of-00012.h5"


def test_fingerprint_is_of_the_settings_not_their_order():
    reordered = {"inputs": {"/d/train.jsonl": "aa"},
                 "data": {"patch_size": 14, "video": {"max_frames": 4, "fps": 2.0}}}
    assert tasks.fingerprint(SETTINGS) == tasks.fingerprint(reordered)
    other = json.loads(json.dumps(SETTINGS))
    other["data"]["video"]["fps"] = 1.0
    assert tasks.fingerprint(other) != tasks.fingerprint(SETTINGS)
    assert tasks.differences(SETTINGS, other) == ["data.video.fps: 2.0 -> 1.0"]
    other["inputs"] = {"/d/train.jsonl": "bb"}
    del other["data"]["patch_size"]
    assert tasks.differences(SETTINGS, other) == [
        "data.patch_size: 14 -> (absent)", "data.video.fps: 2.0 -> 1.0",
        "inputs['/d/train.jsonl']: \"aa\" -> \"bb\""]


def test_claim_skips_same_settings_refuses_other_and_force_clears(tmp_path):
    files = files_of(tmp_path, 0)
    assert tasks.claim(files, SETTINGS) == tasks.ABSENT
    finish(files, SETTINGS)
    marker = json.loads(files.marker.read_text())
    assert marker["settings"] == SETTINGS and marker["result"] == {"items": 1}
    assert marker["fingerprint"] == tasks.fingerprint(SETTINGS)
    assert tasks.claim(files, SETTINGS) == tasks.COMPLETE

    changed = {**SETTINGS, "data": {**SETTINGS["data"], "video": {"fps": 1.0, "max_frames": 4}}}
    before = {p: p.read_bytes() for p in (files.marker, files.outputs[0])}
    with pytest.raises(tasks.SettingsMismatch) as err:
        tasks.claim(files, changed, redo="run it with --force")
    assert isinstance(err.value, ConfigError)  # launchers print it without a traceback
    message = str(err.value)
    assert f"{tmp_path}: task 0 of 2" in message
    assert "data.video.fps: 2.0 -> 1.0" in message and "run it with --force" in message
    assert {p: p.read_bytes() for p in before} == before, "a refusal must not touch anything"

    files.extra[0].write_text("progress of the old settings\n")
    assert tasks.claim(files, changed, force=True) == tasks.STALE
    assert not any(p.exists() for p in files.all()), "force clears every file of the task"
    finish(files, changed)
    assert tasks.claim(files, changed, force=True) == tasks.COMPLETE  # force redoes only stale


def test_absent_output_or_unreadable_marker_means_redo(tmp_path):
    files = files_of(tmp_path, 1)
    finish(files, SETTINGS)
    files.outputs[0].unlink()
    assert tasks.state(files, SETTINGS).status == tasks.ABSENT
    assert tasks.claim(files, SETTINGS) == tasks.ABSENT
    assert not files.marker.exists(), "an orphaned marker is removed before the task runs"
    files.marker.write_text('{"settings": ')
    assert tasks.state(files, SETTINGS).reason == "unreadable marker"


def test_markers_of_older_versions(tmp_path):
    files = files_of(tmp_path, 0)
    atomic_write_jsonl(files.outputs[0], [])
    # Eval and curate markers held the settings object itself under "fingerprint".
    files.marker.write_text(json.dumps({"fingerprint": SETTINGS}))
    assert tasks.state(files, SETTINGS).status == tasks.COMPLETE
    # Preprocess manifest parts recorded no settings: never trusted for new settings.
    files.marker.write_text(json.dumps({"task": 0, "media": {}}))
    found = tasks.state(files, SETTINGS)
    assert found.status == tasks.STALE and "records no settings" in found.changes[0]


def test_check_stage_names_every_stale_task_once_or_clears_them(tmp_path):
    stage = [files_of(tmp_path, t, 3) for t in range(3)]
    changed = {**SETTINGS, "inputs": {"/d/train.jsonl": "bb"}}
    finish(stage[0], SETTINGS)
    finish(stage[2], SETTINGS)
    with pytest.raises(tasks.SettingsMismatch) as err:
        tasks.check_stage([(f, changed) for f in stage], force=False, redo="R")
    assert str(err.value).startswith(f"{tmp_path}: tasks 0, 2 of 3 finished with other")
    assert str(err.value).count("inputs['/d/train.jsonl']") == 1
    assert tasks.check_stage([(f, SETTINGS) for f in stage], force=False, redo="R") == []
    assert tasks.check_stage([(f, changed) for f in stage], force=True, redo="R") == [0, 2]
    assert [tasks.state(f, changed).status for f in stage] == [tasks.ABSENT] * 3
    # Several folders (eval: one per model and benchmark): each named on its own line.
    other = files_of(tmp_path / "other", 1, 3)
    finish(stage[0], SETTINGS)
    finish(other, SETTINGS)
    with pytest.raises(tasks.SettingsMismatch) as err:
        tasks.check_stage([(stage[0], changed), (other, changed)], force=False, redo="R")
    assert str(err.value) == (
        f"2 folders hold tasks finished with other settings than this run's (neither reused "
        f"nor overwritten):\n  {tmp_path}: task 0 of 3\n  {tmp_path / 'other'}: task 1 of 3\n"
        "changed:\n  inputs['/d/train.jsonl']: \"aa\" -> \"bb\"\nR")
