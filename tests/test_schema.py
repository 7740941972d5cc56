"""Sample JSONL: every bad input names its file, line, sample and field; good files round-trip."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from evr1.data.schema import (
    DatasetError,
    Sample,
    SampleError,
    check_files,
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
    record(id="s4", problem_type="temporal_grounding", problem="When?", options=_DROP,
           solution={"start": 1.0, "end": 2.5}, data_type="text", path=""),
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
    # What the reward registry can score (the probe of issue #24: both passed the schema and
    # killed training at the step that drew them).
    "unknown_problem_type": ([GOOD[0], record(id="s2", problem_type="colour_naming")], 2, "s2",
                             "problem_type", "unknown problem type 'colour_naming'"),
    "list_solution_for_multiple_choice": ([record(solution=["A"])], 1, "s1", "solution",
                                          "not an option letter"),
    "letter_beyond_the_options": ([record(solution="E")], 1, "s1", "solution",
                                  "not an option letter or option text among 2 options"),
    "reward_kwargs_not_an_object": ([record(meta={"reward_kwargs": ["pixel"]})], 1, "s1",
                                    "meta.reward_kwargs", "must be a JSON object"),
    "unknown_box_format": ([record(problem_type="spatial_grounding", options=_DROP,
                                   solution=[0.1, 0.1, 0.5, 0.5],
                                   meta={"reward_kwargs": {"box_format": "xyxy"}})],
                           1, "s1", "meta.reward_kwargs", "box_format must be"),
    # Media paths may not leave the media root (issue #24: ../outside/x.mp4 was decoded).
    "path_climbs_out_of_the_root": ([GOOD[0], record(id="s2", path="../outside/x.mp4")], 2,
                                    "s2", "path", "outside the media root"),
    "path_climbs_out_and_back": ([record(path="videos/../../x/../videos/a.mp4")], 1, "s1",
                                 "path", "outside the media root"),
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
        # A file this writes loads back: the rewards must be able to score every sample.
        "field problem_type: cannot write sample #0: unknown problem type": [Sample(
            id="u", problem_type="colour_naming", problem="?", solution="red",
            data_type="text")],
        "field solution: .*is not an option letter": [Sample(id="m", problem_type="multiple_choice",
                                                   problem="?", solution=["A"],
                                                   data_type="text")],
    }
    for reason, batch in bad_batches.items():
        with pytest.raises(SampleError, match=reason):
            write_samples(target, batch)
        assert target.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == ["out.jsonl"]


# --------------------------------------------------------------------------- rewards

# One solution per built-in type (and per shape it accepts) that its scorer reads, and one it
# cannot: problem_type -> (options, reward_kwargs, good solutions, bad solutions).
SOLUTIONS: dict[str, tuple[Any, dict[str, Any], list[Any], list[Any]]] = {
    "multiple_choice": (["A. red", "B. green"], {}, ["B", "(A)", "B. green", "green"],
                        [["A"], "E", 1, {"answer": "A"}]),
    "numerical": (None, {"rel_tol": 0.05}, [5, 2.5, "1,234", "3/4"],
                  [[5], "many", "1 or 2", True, {"value": 5}]),
    "regression": (None, {}, [12, "0.5", "about ten"], [[1, 2], "a lot", {"value": 3}]),
    "vsibench_mra": (None, {}, [4, "2.5"], [[1, 2], "a lot"]),
    "temporal_grounding": (None, {}, [[1, 2.5], {"start": 0, "end": 3}, {"span": [1, 2]},
                                      "0:12 - 0:20"],
                           [[5, 2], [1, 2, 3], "soon", 4]),
    "spatial_grounding": (None, {}, [[0.1, 0.2, 0.5, 0.6], {"bbox_2d": [0, 0, 1, 1]},
                                     "[0.1, 0.2, 0.3, 0.4]"],
                          [[0.1, 0.2, 0.3], [10, 10, 50, 50], [0.5, 0.5, 0.1, 0.1], "left"]),
    "spatial_temporal_grounding": (None, {}, [{"span": [1, 3], "boxes": {"2": [0, 0, .5, .5]}},
                                              '{"span": [1, 3], "boxes": {"2s": [0, 0, 1, 1]}}'],
                                   [{"span": [1, 3]}, {"span": [1, 3], "boxes": {}},
                                    [1, 3], "1-3"]),
    "open_ended": (None, {}, ["the Eiffel Tower", 42], [{"text": "a"}, ["a", "b"], True]),
    "math": (None, {}, ["x^2+2x+1", 0.5], [["x"], {"expr": "x"}, False]),
    "ocr": (None, {}, ["STOP", "the quick brown fox"], [True, ["STOP"]]),
    "boolean": (None, {}, ["yes", "False", True, 0], ["maybe", [True], 2]),
    "code": (None, {}, ["def add(a, b):\n    return a + b", "<svg width='4'></svg>"],
             [42, ["print(1)"], {"code": "x"}]),
    "preference": (None, {}, ["1", 2, "tie", "Response 2"], ["3", [1], 1.5, "better"]),
}


def test_every_builtin_type_has_solution_cases() -> None:
    from evr1.rewards import BUILTIN_TYPES

    assert set(SOLUTIONS) == set(BUILTIN_TYPES)  # 11 problem types + preference


@pytest.mark.parametrize("ptype", sorted(SOLUTIONS))
def test_solution_shapes_per_type(folder: Path, ptype: str) -> None:
    options, kwargs, good, bad = SOLUTIONS[ptype]

    def line(i: int, solution: Any) -> dict[str, Any]:
        return record(id=f"{ptype}-{i}", problem_type=ptype, options=options or _DROP,
                      solution=solution, data_type="text", path=_DROP,
                      meta={"reward_kwargs": kwargs} if kwargs else _DROP)

    good_file = write_lines(folder / "good.jsonl", [line(i, s) for i, s in enumerate(good)])
    assert [s.solution for s in load_samples(good_file)] == good
    bad_file = write_lines(folder / "bad.jsonl", [line(i, s) for i, s in enumerate(bad)])
    errors = validate_samples(bad_file)
    assert [(e.line, e.sample_id, e.field) for e in errors] == \
        [(i + 1, f"{ptype}-{i}", "solution") for i in range(len(bad))], errors
    assert all(str(e).startswith(f"{bad_file}:{e.line}: sample {e.sample_id}: field solution: ")
               and ptype in str(e) for e in errors)


def test_every_scorer_agrees_with_its_check(folder: Path) -> None:
    # The check must refuse exactly what the scorer refuses: score each case with an answer.
    from evr1.rewards import InvalidSolution, score

    for ptype, (options, kwargs, good, bad) in SOLUTIONS.items():
        kw = {**kwargs, **({"options": options} if options else {})}
        for solution in good:
            score(ptype, "<answer>x</answer>", solution, **kw)
        for solution in bad:
            with pytest.raises(InvalidSolution):
                score(ptype, "<answer>x</answer>", solution, **kw)


def test_fallback_type_admits_unknown_types(folder: Path) -> None:
    path = write_lines(folder / "x.jsonl", [record(problem_type="colour_naming", options=_DROP,
                                                   solution="red")])
    assert validate_samples(path)[0].field == "problem_type"
    assert load_samples(path, fallback_type="open_ended")[0].problem_type == "colour_naming"
    assert main([str(path), "--fallback-type", "open_ended"]) == 0
    # The solution is checked as the fallback type reads it.
    write_lines(path, [record(problem_type="colour_naming", options=_DROP, solution=["red"])])
    assert validate_samples(path, fallback_type="open_ended")[0].field == "solution"


def test_registered_types_bring_their_own_check(folder: Path, clean_registry) -> None:
    from evr1.rewards import InvalidSolution, register

    def check_colour(solution: Any, **_: Any) -> None:
        if solution not in ("red", "green"):
            raise InvalidSolution(f"colour: {solution!r} is not a colour")

    register("colour", lambda answer, solution: 1.0, check=check_colour)
    register("anything", lambda answer, solution: 1.0)  # no check: only the name is known
    path = write_lines(folder / "x.jsonl", [
        record(id="a", problem_type="colour", options=_DROP, solution="red"),
        record(id="b", problem_type="colour", options=_DROP, solution="blue"),
        record(id="c", problem_type="anything", options=_DROP, solution=[1, {"x": 2}])])
    assert [(e.sample_id, e.field) for e in validate_samples(path)] == [("b", "solution")]


def test_skipping_reward_checks(folder: Path) -> None:
    path = write_lines(folder / "x.jsonl", [record(problem_type="colour_naming")])
    assert load_samples(path, check_rewards=False)[0].problem_type == "colour_naming"


def test_command_line_names_file_line_sample_field(folder: Path) -> None:
    import subprocess
    import sys

    from evr1.rewards import BUILTIN_TYPES

    path = write_lines(folder / "bad.jsonl", [GOOD[0], record(id="s2", problem_type="nope"),
                                              record(id="s3", solution=["A"])])
    out = subprocess.run([sys.executable, "-m", "evr1.data.schema", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        f"{path}:2: sample s2: field problem_type: unknown problem type 'nope'; known types: "
        + ", ".join(BUILTIN_TYPES)  # the child process registers nothing else
        + " (or set a fallback_type)",
        f"{path}:3: sample s3: field solution: multiple_choice: solution ['A'] is not an option "
        "letter or option text among 2 options (problem type 'multiple_choice')"]


def test_check_files_lists_every_problem_of_every_file(folder: Path) -> None:
    a = write_lines(folder / "a.jsonl", [GOOD[0], record(id="s2", problem_type="nope")])
    b = write_lines(folder / "b.jsonl", [record(solution=["A"]), record(id="s2", path="../x")])
    with pytest.raises(DatasetError) as info:
        check_files([a, b])
    assert [(Path(e.file).name, e.line, e.field) for e in info.value.errors] == [
        ("a.jsonl", 2, "problem_type"), ("b.jsonl", 1, "solution"), ("b.jsonl", 2, "path")]
    assert str(info.value).startswith("3 problem(s) in the sample files:\n")
    check_files([write_lines(folder / "ok.jsonl", GOOD)])


def test_rewards_do_not_import_data_or_train() -> None:
    # evr1.data.schema asks evr1.rewards; the other way round would be an import cycle.
    import subprocess
    import sys

    code = ("import sys, evr1.rewards, evr1.data.schema; "
            "print(sorted(m for m in sys.modules if m.startswith(('evr1.train', 'evr1.data.'))"
            " and m != 'evr1.data.schema'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- media paths


def test_media_paths_stay_inside_the_root(folder: Path, tmp_path_factory) -> None:
    outside = tmp_path_factory.mktemp("outside")
    (outside / "x.mp4").write_bytes(b"\x00" * 16)
    (folder / "videos" / "link.mp4").symlink_to(outside / "x.mp4")
    (folder / "linkdir").symlink_to(outside)
    (folder / "videos" / "inner.mp4").symlink_to(folder / "videos" / "a.mp4")
    jsonl = folder / "x.jsonl"

    def problem(path: str, media_root: Path | None = None) -> str | None:
        write_lines(jsonl, [record(path=path)])
        errors = validate_samples(jsonl, media_root)
        assert all(e.field == "path" and e.sample_id == "s1" for e in errors)
        return str(errors[0]) if errors else None

    assert problem("videos/a.mp4") is None
    assert problem("./videos/../videos/a.mp4") is None  # ".." that stays inside
    assert problem("videos/inner.mp4") is None  # a link to a file inside the root
    assert problem(str(outside / "x.mp4")) is None  # absolute: the user's explicit choice
    assert f"resolves to {outside / 'x.mp4'}, outside the media root {folder}" in problem(
        "videos/link.mp4")  # a link out (an unpacked archive's link to /etc/passwd)
    assert "outside the media root" in problem("linkdir/x.mp4")
    assert "outside the media root" in problem(f"../{outside.name}/x.mp4")
    assert "outside the media root" in problem("../../../../../../../../etc/passwd")
    # Against data.media_root instead of the JSONL's folder.
    assert problem("a.mp4", folder / "videos") is None
    assert "outside the media root" in problem("../images/b.png", folder / "videos")
    # Checked even when the file existence check is off (the preprocess and train stages).
    write_lines(jsonl, [record(path="../outside/x.mp4")])
    with pytest.raises(SampleError, match="outside the media root"):
        load_samples(jsonl, check_media=False)
