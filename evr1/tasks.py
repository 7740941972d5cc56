"""Sharded array tasks: what preprocess, eval and curate share.

A stage splits its items over ``N`` array tasks that need no coordinator: task ``i`` computes
its share from the config alone (``strided`` or ``contiguous``). Each task owns a few output
files, written atomically, and a *completion marker* written last. The marker records the
settings that decide the task's output (``settings``: a JSON object, e.g. the video budget
of preprocessing or the sampling settings of eval) and their hash (``fingerprint``).

On a re-run (``claim``):

- no marker, or an output missing: the task is redone from a clean slate;
- a marker with the same settings: the task is complete and skipped;
- a marker with other settings: the folder holds results of another configuration. They are
  never silently reused nor silently overwritten: ``SettingsMismatch`` names the folder, each
  setting that differs (``data.video.fps: 2.0 -> 1.0``) and what to do (re-run with
  ``--force``, which clears that task's files first, or write to another folder).

``states`` reads every task's state for a merge or a collector; ``check_stage`` runs in the
launcher before an array is submitted: one message for every stale task, or with ``--force``
their files cleared.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from evr1.config import ConfigError
from evr1.files import atomic_write_json

T = TypeVar("T")

ABSENT = "absent"  # no (readable) marker, or an output is missing: the task has to run
COMPLETE = "complete"  # marker with these settings and every output present: skip
STALE = "stale"  # marker with other settings: refuse, or clear with --force


# --------------------------------------------------------------------------- shares


def check_index(task: int, num_tasks: int) -> None:
    if num_tasks < 1:
        raise ValueError(f"the number of tasks must be >= 1, got {num_tasks}")
    if not 0 <= task < num_tasks:
        raise ValueError(f"task index {task} is outside 0..{num_tasks - 1}")


def strided(items: Sequence[T], task: int, num_tasks: int) -> list[T]:
    """Every ``num_tasks``-th item from ``task`` on (round robin: long and short items spread
    evenly over the tasks). Eval and curate split their questions this way."""
    check_index(task, num_tasks)
    return list(items[task::num_tasks])


def contiguous(num_items: int, task: int, num_tasks: int) -> range:
    """A contiguous, balanced slice of ``range(num_items)`` (the sizes differ by at most one).
    Preprocessing splits its media files this way."""
    check_index(task, num_tasks)
    return range(task * num_items // num_tasks, (task + 1) * num_items // num_tasks)


def part_name(kind: str, task: int, num_tasks: int, suffix: str) -> str:
    """``shard-00003-of-00008.h5``: the name of task 3 of 8's file of ``kind``."""
    return f"{kind}-{task:05d}-of-{num_tasks:05d}{suffix}"


# --------------------------------------------------------------------------- settings


def fingerprint(settings: Mapping[str, Any]) -> str:
    """sha256 of the settings as canonical JSON (sorted keys): equal settings, equal hash."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


_MISSING = object()  # a setting one side does not record


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        for key, sub in value.items():
            key = str(key)
            name = (f"{prefix}.{key}" if prefix else key) if re.fullmatch(r"\w+", key) \
                else f"{prefix}[{key!r}]"
            _flatten(sub, name, out)
    else:
        out[prefix] = value
    return out


def _show(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str) if value is not _MISSING else "(absent)"
    return text if len(text) <= 90 else text[:87] + "..."


def differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``name: old -> new`` for every setting (dotted name) whose value differs."""
    old, new = _flatten(recorded, "", {}), _flatten(current, "", {})
    return [f"{name}: {_show(old.get(name, _MISSING))} -> {_show(new.get(name, _MISSING))}"
            for name in sorted(set(old) | set(new)) if old.get(name, _MISSING) !=
            new.get(name, _MISSING)]


class SettingsMismatch(ConfigError):
    """A task folder holds results made with other settings (a ConfigError: the launchers
    print it as such and exit 1, without a traceback)."""

    def __init__(self, stale: Sequence[TaskFiles], changes: list[str], redo: str) -> None:
        self.stale, self.changes = list(stale), changes
        by_folder: dict[Path, list[int]] = {}
        for files in stale:
            by_folder.setdefault(files.folder, []).append(files.task)
        where = [f"{folder}: task{'s' if len(ts) > 1 else ''} {', '.join(map(str, ts))} of "
                 f"{stale[0].num_tasks}" for folder, ts in by_folder.items()]
        shown = "\n  ".join(changes[:12]) + ("\n  ..." if len(changes) > 12 else "")
        what = "finished with other settings than this run's (neither reused nor overwritten)"
        head = f"{where[0]} {what}:" if len(where) == 1 else \
            f"{len(where)} folders hold tasks {what}:\n  " + "\n  ".join(where) + "\nchanged:"
        super().__init__(f"{head}\n  {shown}\n{redo}")


def redo_hint(command: str, folder_setting: str) -> str:
    """What to do about a SettingsMismatch: the stage's command with --force, or another
    output folder."""
    return (f"To redo them with the new settings: {command} --force (deletes only this "
            f"stage's files of the stale tasks). To keep them: set {folder_setting} to another "
            "folder, or go back to the recorded settings.")


# --------------------------------------------------------------------------- one task's files


@dataclass(frozen=True)
class TaskFiles:
    """The files array task ``task`` of ``num_tasks`` owns: ``outputs`` (all must exist for
    the task to be complete), ``extra`` (other files it writes: progress files a resumed
    attempt reads, an output that may legitimately be absent) and the ``marker``, written
    last."""

    task: int
    num_tasks: int
    marker: Path
    outputs: tuple[Path, ...]
    extra: tuple[Path, ...] = ()  # other files it owns: progress files, an optional output

    @property
    def folder(self) -> Path:
        return self.marker.parent

    def all(self) -> tuple[Path, ...]:
        return (self.marker, *self.outputs, *self.extra)


@dataclass
class TaskState:
    status: Literal["absent", "complete", "stale"]
    marker: dict[str, Any] = field(default_factory=dict)  # the marker's content, when readable
    changes: list[str] = field(default_factory=list)  # stale: each setting that differs
    reason: str = ""  # absent: why


def read_marker(path: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def recorded_settings(marker: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The settings a marker records; None for a marker from before settings were recorded.

    Eval and curate markers used to hold the settings object itself under ``fingerprint``:
    those are read as their settings, so their results stay usable."""
    if isinstance(marker.get("settings"), Mapping):
        return marker["settings"]
    if isinstance(marker.get("fingerprint"), Mapping):
        return marker["fingerprint"]
    return None


def state(files: TaskFiles, settings: Mapping[str, Any]) -> TaskState:
    """Whether the task is complete for ``settings``, stale, or still to be done."""
    marker = read_marker(files.marker)
    if marker is None:
        why = "unreadable marker" if files.marker.exists() else \
            "not written (its task failed or never ran)"
        return TaskState(ABSENT, reason=why)
    recorded = recorded_settings(marker)
    if recorded is None:
        return TaskState(STALE, marker, [f"(the marker {files.marker.name} records no settings: "
                                         "made by an older evr1)"])
    if recorded != settings:
        return TaskState(STALE, marker, differences(recorded, settings))
    missing = [p.name for p in files.outputs if not p.exists()]
    if missing:
        return TaskState(ABSENT, marker, reason=f"output missing: {', '.join(missing)}")
    return TaskState(COMPLETE, marker)


def clear(files: TaskFiles) -> None:
    """Delete the task's files, marker first (so that no moment shows a marker beside
    missing outputs), and the temporaries a killed atomic write left beside them."""
    for path in files.all():
        path.unlink(missing_ok=True)
        for tmp in path.parent.glob(f".{path.name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def claim(files: TaskFiles, settings: Mapping[str, Any], *, force: bool = False,
          redo: str = "") -> str:
    """Start of a task. Returns ``COMPLETE`` when it is complete with ``settings`` (skip it),
    ``ABSENT`` when it has to run (the caller starts from a clean slate, or resumes its
    progress files), ``STALE`` when it had results of other settings and ``force`` deleted
    them (the task runs). Without ``force`` such results raise ``SettingsMismatch`` (``redo``
    says what to run)."""
    current = state(files, settings)
    if current.status == STALE:
        if not force:
            raise SettingsMismatch([files], current.changes, redo)
        clear(files)
    elif current.status == ABSENT:
        files.marker.unlink(missing_ok=True)  # an unreadable or orphaned marker
    return current.status


def write_marker(files: TaskFiles, settings: Mapping[str, Any], **fields: Any) -> None:
    """The completion marker, written atomically after every output: settings, their
    fingerprint, and the stage's own fields (counts, timing)."""
    atomic_write_json(files.marker, {**fields, "settings": dict(settings),
                                     "fingerprint": fingerprint(settings)})


# --------------------------------------------------------------------------- a whole stage


def states(tasks: Iterable[tuple[TaskFiles, Mapping[str, Any]]]) -> list[TaskState]:
    """The state of each (task files, its settings): what a merge or collector reads."""
    return [state(files, settings) for files, settings in tasks]


def check_stage(tasks: Sequence[tuple[TaskFiles, Mapping[str, Any]]], *, force: bool,
                redo: str) -> list[int]:
    """Before an array is submitted: raise ``SettingsMismatch`` naming every stale task and
    the settings that changed, or with ``force`` clear them. Returns the cleared tasks.

    Run in the launcher, so that a changed setting is one clear message and not an array of
    tasks that each fail the same way."""
    stale = [(files, st) for (files, settings), st in zip(tasks, states(tasks), strict=True)
             if st.status == STALE]
    if not stale:
        return []
    if not force:
        changes: list[str] = []
        for _, st in stale:
            changes += [c for c in st.changes if c not in changes]
        raise SettingsMismatch([files for files, _ in stale], changes, redo)
    for files, _ in stale:
        clear(files)
    return [files.task for files, _ in stale]
