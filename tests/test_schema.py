"""Sample JSONL: every bad input names its file, line, sample and field; good files round-trip."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from evr1.data.schema import (
    Sample,
    SampleError,
    load_samples,
    main,
    resolve_media_path,
    validate_samples,
    write_samples,
)


def record(**changes: Any) -> dict[str, Any]:
    """A valid video record (its media file is created by the `folder` fixture)."""
    base: dict[str, Any] = {
        "id": "s1", "problem_type": "multiple_choice",
        "problem": "What colour is the moving shape?\nA. red\nB. green",
        "options": ["A. red", "B. green"], "solution": "A", "data_type": "video",
        "path": "videos/a.mp4",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not _DROP}


_DROP = object()  # record(field=_DROP) leaves the field out


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "a.mp4").write_bytes(b"\x00" * 16)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "b.png").write_bytes(b"\x00" * 16)
    return tmp_path


def write_lines(path: Path, lines: list[Any]) -> Path:
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                   for line in lines)
    path.write_text(text)
    return path


GOOD = [
    record(meta={"video": "a", "reward_kwargs": {"box_format": "normalized"}},
           offline_output="<answer>A</answer>"),
    record(id="s2", problem_type="spatial_grounding", problem="Where?", options=_DROP,
           solution=[0.1, 0.2, 0.3, 0.4], data_type="image", path="images/b.png"),
    record(id="s3", problem_type="numerical", problem="What is 2 plus 3?", options=_DROP,
           solution=5, data_type="text", path=_DROP),
    record(id="s4", problem_type="open_ended", problem="Describe.", options=_DROP,
           solution={"text": "a red square"}, data_type="text", path=""),
]


# --------------------------------------------------------------------------- good files


def test_good_file_round_trips(folder: Path) -> None:
    src = write_lines(folder / "train.jsonl", [GOOD[0], "", GOOD[1], "   ", GOOD[2], GOOD[3]])
    samples = load_samples(src)
    assert [s.id for s in samples] == ["s1", "s2", "s3", "s4"]
    assert samples[0].path == str(folder / "videos" / "a.mp4")  # resolved, absolute
    assert samples[0].meta["reward_kwargs"] == {"box_format": "normalized"}
    assert samples[2].path is None and samples[3].path is None
    assert samples[1].solution == [0.1, 0.2, 0.3, 0.4] and samples[3].meta == {}

    copy = folder / "sub" / "copy.jsonl"
    assert write_samples(copy, samples) == 4
    assert load_samples(copy) == samples
    for sample, line in zip(samples, copy.read_text().splitlines(), strict=True):
        assert json.loads(sample.to_json()) == json.loads(line) == sample.to_dict()
        assert "\n" not in sample.to_json()
    assert not [p for p in copy.parent.iterdir() if p.name.endswith(".tmp")]


def test_to_dict_leaves_out_unset_optional_fields() -> None:
    sample = Sample(id="t", problem_type="boolean", problem="Is 3 more than 2?",
                    solution="yes", data_type="text")
    assert sample.to_dict() == {"id": "t", "problem_type": "boolean",
                                "problem": "Is 3 more than 2?", "solution": "yes",
                                "data_type": "text"}


def test_relative_paths_resolve_against_media_root(folder: Path, tmp_path_factory) -> None:
    elsewhere = tmp_path_factory.mktemp("jsonl") / "x.jsonl"
    write_lines(elsewhere, [GOOD[0], record(id="abs", path=str(folder / "videos" / "a.mp4"))])
    with pytest.raises(SampleError, match="media file not found"):
        load_samples(elsewhere)  # relative to the JSONL's own folder: not there
    samples = load_samples(elsewhere, media_root=folder)
    assert [s.path for s in samples] == [str(folder / "videos" / "a.mp4")] * 2
    assert load_samples(elsewhere, media_root="", check_media=False)[0].path == str(
        elsewhere.parent / "videos" / "a.mp4")  # empty media_root (config default) = unset
    assert resolve_media_path("~/v.mp4", elsewhere) == os.path.expanduser("~/v.mp4")


# --------------------------------------------------------------------------- bad input

# (lines of the file, the line at fault, sample id in the message, field, words of the reason)
BAD_CASES = {
    "malformed_json": ([GOOD[0], '{"id": "s2", "problem": '], 2, None, None, "not valid JSON"),
    "not_an_object": ([GOOD[0], "[1, 2]"], 2, None, None, "expected a JSON object"),
    "missing_solution": ([GOOD[0], record(id="s2", solution=_DROP)], 2, "s2", "solution",
                         "missing required field"),
    "null_solution": ([record(solution=None)], 1, "s1", "solution", "missing required field"),
    "missing_id": ([GOOD[0], GOOD[0] | {"id": "s2"}, record(id=_DROP)], 3, None, "id",
                   "missing required field"),
    "id_not_a_string": ([record(id=7)], 1, None, "id", "must be a string, got number"),
    "empty_problem": ([record(problem="  ")], 1, "s1", "problem", "must not be empty"),
    "options_not_a_list": ([record(options="A. red")], 1, "s1", "options",
                           "must be a list of strings, got string"),
    "option_not_a_string": ([record(options=["A. red", 2])], 1, "s1", "options[1]",
                            "must be a string, got number"),
    "unknown_data_type": ([GOOD[0], record(id="s2", data_type="audio")], 2, "s2",
                          "data_type", "unknown data type 'audio'"),
    "problem_type_not_a_string": ([record(problem_type=["numerical"])], 1, "s1",
                                  "problem_type", "must be a string, got list"),
    "missing_media": ([GOOD[0], record(id="s2", path="videos/nope.mp4")], 2, "s2", "path",
                      "media file not found"),
    "media_is_a_folder": ([record(path="videos")], 1, "s1", "path", "not a file"),
    "video_without_path": ([record(path=_DROP)], 1, "s1", "path", "required for data_type"),
    "text_with_path": ([record(data_type="text")], 1, "s1", "path", "must not have a media"),
    "duplicate_id": ([GOOD[0], GOOD[1], record()], 3, "s1", "id", "first seen at line 1"),
    "unknown_field": ([record(soluton="A")], 1, "s1", "soluton", "unknown field"),
    "meta_not_an_object": ([record(meta=[1])], 1, "s1", "meta", "must be a JSON object"),
    "offline_output_not_a_string": ([record(offline_output=3)], 1, "s1", "offline_output",
                                    "must be a string"),
    "data_type_not_a_string": ([record(solution=[], data_type=1)], 1, "s1", "data_type",
                           "must be a string"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_names_file_line_sample_field(folder: Path, case: str) -> None:
    lines, line, sample_id, field, reason = BAD_CASES[case]
    path = write_lines(folder / "bad.jsonl", lines)
    with pytest.raises(SampleError) as info:
        load_samples(path)
    err = info.value
    assert (err.file, err.line, err.sample_id, err.field) == (str(path), line, sample_id, field)
    prefix = f"{path}:{line}: "
    if sample_id is not None:
        prefix += f"sample {sample_id}: "
    if field is not None:
        prefix += f"field {field}: "
    assert str(err).startswith(prefix), str(err)
    assert reason in str(err)


def test_invalid_utf8_names_the_line(folder: Path) -> None:
    path = folder / "bad.jsonl"
    path.write_bytes(json.dumps(GOOD[0]).encode() + b"\n" + b'{"id": "\xff"}\n')
    with pytest.raises(SampleError, match=r"bad\.jsonl:2: not valid UTF-8"):
        load_samples(path)


def test_missing_file_is_a_sample_error(tmp_path: Path) -> None:
    with pytest.raises(SampleError, match=r"nope\.jsonl: cannot read"):
        load_samples(tmp_path / "nope.jsonl")


def test_check_media_false_skips_only_the_file_check(folder: Path) -> None:
    path = write_lines(folder / "x.jsonl", [record(path="videos/nope.mp4")])
    assert load_samples(path, check_media=False)[0].path == str(folder / "videos" / "nope.mp4")
    write_lines(path, [record(path=_DROP)])
    with pytest.raises(SampleError, match="field path"):
        load_samples(path, check_media=False)


def test_validate_collects_every_error(folder: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_lines(folder / "bad.jsonl", [
        GOOD[0], "not json", record(id="s2", data_type="audio"), GOOD[1],
        record(id="s5", path="videos/nope.mp4"), record(), GOOD[2]])
    errors = validate_samples(path)
    assert [(e.line, e.field) for e in errors] == [(2, None), (3, "data_type"), (5, "path"),
                                                  (6, "id")]
    assert validate_samples(write_lines(folder / "ok.jsonl", GOOD)) == []

    assert main([str(path), str(folder / "ok.jsonl")]) == 1
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 4 and "ok.jsonl: ok" in captured.out


# --------------------------------------------------------------------------- writing


def test_failed_write_leaves_the_old_file(folder: Path) -> None:
    target = write_lines(folder / "out.jsonl", GOOD)
    before = target.read_bytes()
    samples = load_samples(target)
    bad_batches = {
        "duplicate id": samples + [samples[0]],
        "finite number": [Sample(id="n", problem_type="numerical", problem="?",
                                 solution=float("nan"), data_type="text")],
        "field data_type": [Sample(id="d", problem_type="numerical", problem="?", solution=1,
                                   data_type="audio")],
        "not JSON serializable": [Sample(id="j", problem_type="numerical", problem="?",
                                         solution=1, data_type="text", meta={"x": object()})],
    }
    for reason, batch in bad_batches.items():
        with pytest.raises(SampleError, match=reason):
            write_samples(target, batch)
        assert target.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == ["out.jsonl"]
