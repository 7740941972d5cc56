"""The sample record: one JSON object per line of a JSONL file.

A record names its problem, its verifiable solution and the media it is about::

    {"id": "syn-0003-colour", "problem_type": "multiple_choice",
     "problem": "What colour is the moving shape?\\nA. red\\n...", "options": ["A. red", ...],
     "solution": "A", "data_type": "video", "path": "videos/syn-0003.mp4",
     "offline_output": "<answer>A</answer>", "meta": {"video": "syn-0003"}}

``load_samples`` checks every line and stops at the first problem with a ``SampleError`` whose
message says where it is (``file:line: sample <id>: field <name>: what is wrong``), so a bad
dataset fails before a job array is submitted, not in the middle of one. ``validate_samples``
runs the same checks but collects every problem (``python -m evr1.data.schema FILE...``);
``check_files`` does that for the launchers, before any work.

Checked here: the record's shape; that its ``problem_type`` is registered in ``evr1.rewards``
and its solution and options have the shape that type reads (the registry asks the reward
module, which owns that rule: ``evr1.rewards.check_solution``); that a relative media path
stays inside the media root.

Media paths: an absolute path (or ``~/...``) is the user's explicit choice and is used as it
is. A relative path resolves against ``data.media_root`` (else the JSONL's folder) and must stay
inside it once ``..`` and symlinks are resolved: a dataset (a downloaded JSONL, an unpacked
archive with links in it) must not make the pipeline read ``../../etc/passwd``. A symlink
inside the root that points elsewhere is refused too; point ``media_root`` at the real folder
or write absolute paths.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evr1.files import atomic_write_bytes
from evr1.rewards import InvalidSolution, RewardInputError, UnknownProblemType, check_solution

DATA_TYPES = ("video", "image", "text")
REQUIRED_FIELDS = ("id", "problem_type", "problem", "solution", "data_type")
OPTIONAL_FIELDS = ("options", "path", "offline_output", "meta")
ALL_FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS


class SampleError(ValueError):
    """A sample record is malformed; the message says which file, line, sample and field."""

    def __init__(self, what: str, *, file: str | os.PathLike[str] | None = None,
                 line: int | None = None, sample_id: str | None = None,
                 field: str | None = None) -> None:
        self.what = what
        self.file = None if file is None else str(file)
        self.line = line
        self.sample_id = sample_id
        self.field = field
        super().__init__(self._format())

    def _format(self) -> str:
        # Parts that are unknown (an unparsable line has no id) are left out rather than
        # printed as placeholders.
        where = self.file or ""
        if self.line is not None:
            where = f"{where}:{self.line}" if where else f"line {self.line}"
        parts = [where] if where else []
        if self.sample_id is not None:
            parts.append(f"sample {self.sample_id}")
        if self.field is not None:
            parts.append(f"field {self.field}")
        parts.append(self.what)
        return ": ".join(parts)

    def located(self, file: str | os.PathLike[str] | None, line: int | None) -> SampleError:
        """The same error, placed at a file and line."""
        return SampleError(self.what, file=file, line=line, sample_id=self.sample_id,
                           field=self.field)


@dataclass(kw_only=True)
class Sample:
    """One verifiable problem about one video, image, or no media at all.

    After ``load_samples`` the ``path`` is absolute (resolved against the media root or the
    JSONL's folder), so stages that run elsewhere need no other context to find the file.
    """

    id: str
    problem_type: str
    problem: str
    options: list[str] | None = None
    solution: Any
    data_type: str
    path: str | None = None
    offline_output: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: Any) -> Sample:
        """Check a decoded JSON object and build a Sample (``path`` as given, unresolved)."""
        if not isinstance(raw, dict):
            raise SampleError(f"expected a JSON object, got {_json_type(raw)}")
        sample_id = raw.get("id") if isinstance(raw.get("id"), str) else None

        def fail(name: str, what: str) -> SampleError:
            return SampleError(what, sample_id=sample_id, field=name)

        unknown = sorted(set(raw) - set(ALL_FIELDS))
        if unknown:
            raise fail(unknown[0], "unknown field (known fields: " + ", ".join(ALL_FIELDS)
                       + "; put anything else under meta)")
        for name in REQUIRED_FIELDS:
            if name not in raw or raw[name] is None:
                raise fail(name, "missing required field")
        for name in ("id", "problem_type", "problem", "data_type"):
            _check_nonempty_str(raw[name], name, fail)
        if raw["data_type"] not in DATA_TYPES:
            raise fail("data_type", f"unknown data type {raw['data_type']!r}; expected one of "
                                    + ", ".join(DATA_TYPES))
        _check_solution(raw["solution"], fail)
        _check_options(raw.get("options"), fail)
        path = _check_path(raw.get("path"), raw["data_type"], fail)
        offline = raw.get("offline_output")
        if offline is not None and not isinstance(offline, str):
            raise fail("offline_output", f"must be a string, got {_json_type(offline)}")
        meta = raw.get("meta")
        if meta is not None and not isinstance(meta, dict):
            raise fail("meta", f"must be a JSON object, got {_json_type(meta)}")
        reward_kwargs = (meta or {}).get("reward_kwargs")
        if reward_kwargs is not None and not isinstance(reward_kwargs, dict):
            raise fail("meta.reward_kwargs", "must be a JSON object of reward options, got "
                                             f"{_json_type(reward_kwargs)}")
        return cls(id=raw["id"], problem_type=raw["problem_type"], problem=raw["problem"],
                   options=raw.get("options"), solution=raw["solution"],
                   data_type=raw["data_type"], path=path, offline_output=offline,
                   meta=dict(meta or {}))

    def to_dict(self) -> dict[str, Any]:
        """The JSON record; optional fields that are unset are left out."""
        out: dict[str, Any] = {"id": self.id, "problem_type": self.problem_type,
                               "problem": self.problem}
        if self.options is not None:
            out["options"] = list(self.options)
        out["solution"] = self.solution
        out["data_type"] = self.data_type
        if self.path is not None:
            out["path"] = self.path
        if self.offline_output is not None:
            out["offline_output"] = self.offline_output
        if self.meta:
            out["meta"] = self.meta
        return out

    def to_json(self) -> str:
        """One JSONL line (no trailing newline). NaN/inf are refused: they are not JSON."""
        return json.dumps(self.to_dict(), ensure_ascii=False, allow_nan=False)


# --------------------------------------------------------------------------- field checks

# Builds the error for (field, what is wrong) with the sample id already filled in.
_Fail = Callable[[str, str], SampleError]


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _check_nonempty_str(value: Any, name: str, fail: _Fail) -> None:
    if not isinstance(value, str):
        raise fail(name, f"must be a string, got {_json_type(value)}")
    if not value.strip():
        raise fail(name, "must not be empty")


def _check_solution(value: Any, fail: _Fail) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise fail("solution", f"must be a finite number, got {value}")
    if isinstance(value, str) and not value.strip():
        raise fail("solution", "must not be empty")
    if not isinstance(value, (str, int, float, list, dict)):
        raise fail("solution", f"must be a string, number, list or object, got "
                               f"{_json_type(value)}")


def _check_options(value: Any, fail: _Fail) -> None:
    if value is None:
        return
    if not isinstance(value, list):
        raise fail("options", f"must be a list of strings, got {_json_type(value)}")
    for i, option in enumerate(value):
        if not isinstance(option, str):
            raise fail(f"options[{i}]", f"must be a string, got {_json_type(option)}")


def _check_path(value: Any, data_type: str, fail: _Fail) -> str | None:
    if data_type == "text":
        # Converted datasets often carry an empty path on text rows; a real path on a text
        # sample is ambiguous (is the data_type wrong?) so it is refused.
        if value not in (None, ""):
            raise fail("path", "a text sample must not have a media path")
        return None
    if value is None:
        raise fail("path", f"missing: required for data_type {data_type!r}")
    _check_nonempty_str(value, "path", fail)
    return value


def check_reward(sample: Sample, fallback_type: str = "") -> None:
    """Raise ``SampleError`` (field problem_type, solution or meta.reward_kwargs) unless the
    reward registry can score ``sample``: the same options the trainer passes
    (``evr1.train.groups.reward_item``: ``options`` and ``meta.reward_kwargs``)."""
    kwargs = dict(sample.meta.get("reward_kwargs") or {})
    if sample.options:
        kwargs["options"] = sample.options
    try:
        check_solution(sample.problem_type, sample.solution, fallback_type=fallback_type,
                       **kwargs)
    except UnknownProblemType as exc:
        raise SampleError(str(exc), sample_id=sample.id, field="problem_type") from exc
    except InvalidSolution as exc:
        raise SampleError(f"{exc} (problem type {sample.problem_type!r})",
                          sample_id=sample.id, field="solution") from exc
    except RewardInputError as exc:
        raise SampleError(str(exc), sample_id=sample.id, field="meta.reward_kwargs") from exc


# --------------------------------------------------------------------------- files


def media_base(jsonl_path: str | os.PathLike[str],
               media_root: str | os.PathLike[str] | None = None) -> str:
    """The folder relative media paths resolve against: media_root, else the JSONL's folder."""
    base = os.fspath(media_root) if media_root else os.path.dirname(os.fspath(jsonl_path))
    return os.path.abspath(os.path.expanduser(base))


def media_path_outside_root(path: str, jsonl_path: str | os.PathLike[str],
                            media_root: str | os.PathLike[str] | None = None) -> str | None:
    """Why a relative ``path`` may not be used (it leaves the media root once ``..`` and
    symlinks are resolved), or None. Absolute paths are the user's choice: never refused."""
    expanded = os.path.expanduser(path)
    if os.path.isabs(expanded):
        return None
    base = media_base(jsonl_path, media_root)
    root = os.path.realpath(base)
    target = os.path.realpath(os.path.join(base, expanded))
    if os.path.commonpath([root, target]) == root:
        return None
    return (f"relative media path {path!r} resolves to {target}, outside the media root "
            f"{root} (relative paths may not leave it through '..' or symlinks; use an "
            "absolute path to read from elsewhere)")


def resolve_media_path(path: str, jsonl_path: str | os.PathLike[str],
                       media_root: str | os.PathLike[str] | None = None) -> str:
    """Absolute media path: relative paths resolve against media_root, else the JSONL's folder.

    Symlinks are kept (not resolved) so the path stays the one the user wrote.
    """
    expanded = os.path.expanduser(path)
    if os.path.isabs(expanded):
        return os.path.normpath(expanded)
    return os.path.normpath(os.path.join(media_base(jsonl_path, media_root), expanded))


def _media_problem(path: str) -> str | None:
    if not os.path.exists(path):
        return f"media file not found: {path}"
    if not os.path.isfile(path):
        return f"media path is not a file: {path}"
    return None


@dataclass(frozen=True)
class _Checks:
    """What each line is checked for beyond its shape."""

    media_root: str | os.PathLike[str] | None = None
    check_media: bool = True  # the media file exists
    check_rewards: bool = True  # the reward registry can score the sample
    fallback_type: str = ""  # the type unknown problem types are scored as ("": an error)


def _iter_checked(path: str | os.PathLike[str],
                  checks: _Checks) -> Iterator[Sample | SampleError]:
    """Yield each line's Sample, or the SampleError that describes what is wrong with it."""
    file = os.fspath(path)
    try:
        with open(file, "rb") as fh:
            lines = fh.readlines()
    except OSError as exc:
        yield SampleError(f"cannot read: {exc.strerror or exc}", file=file)
        return
    first_line: dict[str, int] = {}
    for number, raw_line in enumerate(lines, start=1):
        result = _parse_line(raw_line, file, number, checks)
        if isinstance(result, Sample):
            if result.id in first_line:
                result = SampleError(f"duplicate id (first seen at line {first_line[result.id]})",
                                     file=file, line=number, sample_id=result.id, field="id")
            else:
                first_line[result.id] = number
        if result is not None:
            yield result


def _parse_line(raw_line: bytes, file: str, number: int,
                checks: _Checks) -> Sample | SampleError | None:
    try:
        text = raw_line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return SampleError(f"not valid UTF-8 ({exc.reason} at byte {exc.start})",
                           file=file, line=number)
    if not text.strip():
        return None  # blank lines (a trailing newline, hand-edited files) carry nothing
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        return SampleError(f"not valid JSON: {exc.msg} (column {exc.colno})",
                           file=file, line=number)
    try:
        sample = Sample.from_dict(raw)
        if checks.check_rewards:
            check_reward(sample, checks.fallback_type)
    except SampleError as exc:
        return exc.located(file, number)
    if sample.path is not None:
        problem = media_path_outside_root(sample.path, file, checks.media_root)
        sample.path = resolve_media_path(sample.path, file, checks.media_root)
        if problem is None and checks.check_media:
            problem = _media_problem(sample.path)
        if problem:
            return SampleError(problem, file=file, line=number, sample_id=sample.id,
                               field="path")
    return sample


def load_samples(path: str | os.PathLike[str], media_root: str | os.PathLike[str] | None = None,
                 check_media: bool = True, *, check_rewards: bool = True,
                 fallback_type: str = "") -> list[Sample]:
    """Read and check a JSONL file; raise the first ``SampleError`` found.

    ``media_root`` may be empty or None: relative media paths then resolve against the
    JSONL's folder. With ``check_media`` every video/image file must exist (its content is
    checked later, by the decoder). With ``check_rewards`` every problem type must be known to
    ``evr1.rewards`` (or ``fallback_type`` given, as ``reward.fallback_type``) and every
    solution readable by its type.
    """
    samples = []
    for item in _iter_checked(path, _Checks(media_root, check_media, check_rewards,
                                            fallback_type)):
        if isinstance(item, SampleError):
            raise item
        samples.append(item)
    return samples


def validate_samples(path: str | os.PathLike[str],
                     media_root: str | os.PathLike[str] | None = None,
                     check_media: bool = True, *, check_rewards: bool = True,
                     fallback_type: str = "") -> list[SampleError]:
    """Every problem in a JSONL file (empty when it is valid); never raises SampleError."""
    checks = _Checks(media_root, check_media, check_rewards, fallback_type)
    return [item for item in _iter_checked(path, checks) if isinstance(item, SampleError)]


class DatasetError(ValueError):
    """Sample files checked before a stage starts have problems; ``errors`` holds each one."""

    SHOWN = 20

    def __init__(self, errors: list[SampleError]) -> None:
        self.errors = errors
        lines = [str(e) for e in errors[:self.SHOWN]]
        if len(errors) > self.SHOWN:
            lines.append(f"... and {len(errors) - self.SHOWN} more (python -m evr1.data.schema "
                         "FILE lists every one)")
        super().__init__(f"{len(errors)} problem(s) in the sample files:\n" + "\n".join(lines))


def check_files(files: Iterable[str | os.PathLike[str]],
                media_root: str | os.PathLike[str] | None = None, *, check_media: bool = False,
                fallback_type: str = "") -> None:
    """Check whole sample files before a stage does any work (launchers call this): raise one
    ``DatasetError`` listing every problem of every file. Media existence is off by default:
    preprocessing records a missing file as a failure and goes on."""
    errors = [e for f in files for e in validate_samples(
        f, media_root or None, check_media, fallback_type=fallback_type)]
    if errors:
        raise DatasetError(errors)


def write_samples(path: str | os.PathLike[str], samples: Iterable[Sample], *,
                  fallback_type: str = "") -> int:
    """Write samples as JSONL atomically (temp file, fsync, rename); return how many.

    Each sample is checked first (shape, and that the rewards can score it, with
    ``fallback_type`` as ``load_samples`` takes it) and ids must be unique, so a file this
    writes always loads back; on any error the previous file (if any) is left untouched.
    """
    target = Path(path)
    lines = _checked_lines(samples, target, fallback_type)
    atomic_write_bytes(target, "".join(line + "\n" for line in lines).encode("utf-8"))
    return len(lines)


def _checked_lines(samples: Iterable[Sample], target: Path, fallback_type: str) -> list[str]:
    lines: list[str] = []
    seen: set[str] = set()
    for index, sample in enumerate(samples):
        try:
            record = sample.to_dict()
            check_reward(Sample.from_dict(record), fallback_type)
            line = json.dumps(record, ensure_ascii=False, allow_nan=False)
        except SampleError as exc:
            raise SampleError(f"cannot write sample #{index}: {exc.what}", file=target,
                              sample_id=exc.sample_id, field=exc.field) from exc
        except (TypeError, ValueError) as exc:  # not JSON-able, or NaN
            raise SampleError(f"cannot write sample #{index}: {exc}", file=target,
                              sample_id=sample.id) from exc
        if sample.id in seen:
            raise SampleError("duplicate id", file=target, sample_id=sample.id, field="id")
        seen.add(sample.id)
        lines.append(line)
    return lines


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """``python -m evr1.data.schema FILE... [--media-root DIR] [--no-check-media]
    [--fallback-type TYPE]``."""
    parser = argparse.ArgumentParser(description="Check sample JSONL files; list every problem.")
    parser.add_argument("files", nargs="+")
    parser.add_argument("--media-root", default=None)
    parser.add_argument("--no-check-media", action="store_true")
    parser.add_argument("--fallback-type", default="",
                        help="score unknown problem types as this type (reward.fallback_type)")
    args = parser.parse_args(argv)
    bad = 0
    for file in args.files:
        errors = validate_samples(file, args.media_root, not args.no_check_media,
                                  fallback_type=args.fallback_type)
        for error in errors:
            print(error, file=sys.stderr)
        bad += len(errors)
        if not errors:
            print(f"{file}: ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
