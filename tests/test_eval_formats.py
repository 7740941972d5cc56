"""Benchmark loaders on small files in each benchmark's published format (made here).

The ``write_*`` helpers are also used by tests/test_eval_run.py to build a full evaluation.
"""

from __future__ import annotations

import base64
import json
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from evr1.eval.benchmarks import BENCHMARKS, LoadContext, get_benchmark, load_benchmark
from evr1.eval.formats import FormatError, MediaResolver, split_inline_options
from evr1.rewards import score

# --------------------------------------------------------------------------- writers


def touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def videomme_rows(video_ids: list[str]) -> list[dict]:
    """lmms-lab/Video-MME: one row per question, options "A. ..." and a letter answer."""
    rows = []
    for i, vid in enumerate(video_ids):
        rows.append({
            "video_id": f"{i + 1:03d}", "duration": ["short", "medium", "long"][i % 3],
            "domain": "Knowledge", "sub_category": "Astronomy", "url": f"https://x/{vid}",
            "videoID": vid, "question_id": f"{i + 1:03d}-1", "task_type": "Counting Problem",
            "question": "What colour is the moving shape?",
            "options": ["A. red", "B. green", "C. blue", "D. yellow"],
            "answer": "ABCD"[i % 4]})
    return rows


def write_charades(path: Path, lines: list[tuple[str, float, float, str]]) -> Path:
    """charades_sta_test.txt: '<vid> <start> <end>##<sentence>' per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{v} {s} {e}##{t}\n" for v, s, e, t in lines))
    return path


def write_vcrbench(path: Path, videos: list[str]) -> Path:
    rows = [{"id": 0, "video_path": videos[0], "dimension": "video temporal counting",
             "question": "Which colour moves?", "choices": {"A": "red", "B": "green"},
             "answer": "B"},
            {"id": 1, "video_path": videos[-1], "dimension": "video plot analysis",
             "question": "What happens in the video?", "answer": "a shape moves right"}]
    return write_json(path, rows)


def png_bytes(width: int = 8, height: int = 8) -> bytes:
    """A tiny valid RGB PNG (no PIL needed to write it)."""
    raw = b"".join(b"\x00" + bytes([200, 30, 30]) * width for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return (len(data).to_bytes(4, "big") + body
                + zlib.crc32(body).to_bytes(4, "big"))

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def load(name: str, annotation: Path, root: Path, tmp: Path | None = None, limit: int = 0,
         style: str = "tags"):
    bench = get_benchmark(name)
    ctx = LoadContext(name=bench.name, alias=bench.name, annotation=annotation,
                      media=MediaResolver(root), style=style,
                      media_out=(tmp or root) / "media")
    samples = load_benchmark(bench, ctx, limit)
    for s in samples:  # every solution must be readable by its reward type
        score(s.problem_type, "", s.solution, options=s.options,
              **(s.meta.get("reward_kwargs") or {}))
    return samples, ctx


# --------------------------------------------------------------------------- loaders


def test_every_listed_benchmark_is_registered():
    wanted = {"videomme", "mvbench", "tempcompass", "motionbench", "lvbench", "longvideobench",
              "mlvu", "video_holmes", "minerva", "vcrbench", "videoreasonbench",
              "longvideo_reason", "mmvu", "videommmu", "videomathqa", "vsibench",
              "charades_sta", "stvg", "ovobench", "odvbench", "livesports3k_qa", "mmstar",
              "synthetic"}
    assert wanted <= set(BENCHMARKS)
    for bench in BENCHMARKS.values():
        assert bench.precision in ("precise", "documented")
        assert bench.formats and bench.files and bench.source


def test_videomme_parquet(tmp_path):
    touch(tmp_path, "data/vid1.mp4", "data/vid2.MP4")
    ann = write_parquet(tmp_path / "videomme/test-00000-of-00001.parquet",
                        videomme_rows(["vid1", "vid2", "gone"]))
    samples, ctx = load("videomme", ann, tmp_path)
    assert [s.solution for s in samples] == ["A", "B", "C"]
    assert samples[0].id == "videomme-001-1"
    assert samples[0].path == str(tmp_path / "data/vid1.mp4")
    assert samples[1].path == str(tmp_path / "data/vid2.MP4")  # other suffixes are found
    assert ctx.media.missing == 1  # "gone": counted, kept (preprocessing records the failure)
    assert samples[2].meta["duration"] == "long"
    assert "C. blue" in samples[0].problem and "<answer>" in samples[0].problem
    official, _ = load("videomme", ann, tmp_path, style="official")
    assert official[0].problem.startswith("Select the best answer")
    assert official[0].problem.endswith("The best answer is:")


def test_mvbench_task_files_and_folders(tmp_path):
    touch(tmp_path / "video", "star/Charades_v1_480/A1.mp4", "clevrer/video_validation/v.mp4")
    write_json(tmp_path / "json/action_sequence.json", [
        {"video": "A1.mp4", "question": "What did the person do first?",
         "candidates": ["Sat down.", "Opened the door.", "Took a cup."],
         "answer": "Opened the door.", "start": 2.0, "end": 9.5}])
    write_json(tmp_path / "json/moving_count.json", [
        {"video": "v.mp4", "question": "How many cubes move?", "candidates": ["1", "2"],
         "answer": "2"},
        {"video": "v.mp4", "question": "How many spheres move?", "candidates": ["1", "2"],
         "answer": "1"}])
    samples, _ = load("mvbench", tmp_path / "json", tmp_path / "video")
    assert [(s.meta["task"], s.solution) for s in samples] == [
        ("action_sequence", "B"), ("moving_count", "B"), ("moving_count", "A")]
    assert samples[0].path.endswith("star/Charades_v1_480/A1.mp4")
    assert samples[0].meta["start"] == 2.0
    assert len({s.id for s in samples}) == 3
    official, _ = load("mvbench", tmp_path / "json", tmp_path / "video", style="official")
    assert "(B) Opened the door." in official[0].problem


def test_tempcompass_parquet_and_official_nested_json(tmp_path):
    touch(tmp_path, "videos/1001.mp4")
    write_parquet(tmp_path / "multi-choice.parquet", [
        {"video_id": "1001", "dim": "direction",
         "question": "Which way does the car move?\nA. left\nB. right\nC. up",
         "answer": "B. right"}])
    write_json(tmp_path / "yes_no.json", {"1001": {"speed": [
        {"question": "Is the car moving fast?", "answer": "no"},
        {"question": "Is the car moving slowly?", "answer": "yes"}]}})
    write_json(tmp_path / "captioning.json", {"1001": {"speed": [
        {"question": "Describe the video.", "answer": "x"}]}})
    samples, ctx = load("tempcompass", tmp_path, tmp_path)
    by_task = {(s.meta["task"], s.solution) for s in samples}
    assert by_task == {("multi-choice", "B"), ("yes_no", "no"), ("yes_no", "yes")}
    mc = next(s for s in samples if s.problem_type == "multiple_choice")
    assert mc.options == ["A. left", "B. right", "C. up"] and mc.meta["dim"] == "direction"
    assert ctx.skipped == {"captioning: needs an LLM to answer the paired question": 1}


def test_motionbench_skips_questions_without_public_answers(tmp_path):
    ann = write_jsonl(tmp_path / "video_info.meta.jsonl", [
        {"key": "k1", "video_path": "a.mp4", "question_type": "MR", "qa": [
            {"uid": "q1", "question": "What motion?\nA. wave\nB. jump\nC. run", "answer": "C"},
            {"uid": "q2", "question": "Again?\nA. yes\nB. no", "answer": "NA"}]}])
    samples, ctx = load("motionbench", ann, tmp_path)
    assert [(s.id, s.solution, s.meta["task"]) for s in samples] == [("motionbench-q1", "C",
                                                                      "MR")]
    assert sum(ctx.skipped.values()) == 1


def test_lvbench_inline_options_and_multi_label_types(tmp_path):
    ann = write_jsonl(tmp_path / "video_info.meta.jsonl", [
        {"key": "abc", "type": "cartoon", "qa": [
            {"uid": 7, "question": "What is on the table?\n(A) a cup\n(B) a pen\n(C) a book\n"
                                   "(D) nothing", "answer": "D",
             "question_type": ["entity recognition", "key information retrieval"],
             "time_reference": "00:15-00:19"}]}])
    samples, _ = load("lvbench", ann, tmp_path)
    s = samples[0]
    assert s.solution == "D" and s.options[0] == "A. a cup" and len(s.options) == 4
    assert s.meta["question_type"] == ["entity recognition", "key information retrieval"]
    assert s.meta["question"] == "What is on the table?"


def test_longvideobench_json_and_parquet(tmp_path):
    record = {"id": "86CxyhFV9MI_0", "video_path": "86CxyhFV9MI.mp4", "question": "Who?",
              "duration_group": 600, "question_category": "TOS"}
    write_json(tmp_path / "lvb_val.json", [{**record, "candidates": ["a", "b", "c"],
                                            "correct_choice": 2}])
    samples, _ = load("longvideobench", tmp_path / "lvb_val.json", tmp_path)
    assert samples[0].solution == "C" and samples[0].meta["duration_group"] == "600"
    write_parquet(tmp_path / "validation-00000-of-00001.parquet", [
        {**record, "option0": "a", "option1": "b", "option2": "N/A", "option3": "N/A",
         "option4": "N/A", "correct_choice": 1}])
    samples, _ = load("longvideobench", tmp_path / "validation-00000-of-00001.parquet", tmp_path)
    assert samples[0].options == ["A. a", "B. b"] and samples[0].solution == "B"


def test_mlvu_choice_and_generation_tasks(tmp_path):
    touch(tmp_path / "video", "1_plotQA/movie1.mp4")
    write_json(tmp_path / "json/1_plotQA.json", [
        {"video": "movie1.mp4", "duration": 300, "question": "Who enters?",
         "candidates": ["a dog", "a cat"], "answer": "a cat", "question_type": "plotQA"}])
    write_json(tmp_path / "json/9_summary.json", [
        {"video": "movie2.mp4", "duration": 600, "question": "Summarize the video.",
         "answer": "People walk.", "question_type": "summary"}])
    samples, _ = load("mlvu", tmp_path / "json", tmp_path / "video")
    assert [(s.problem_type, s.solution, s.meta["task"]) for s in samples] == [
        ("multiple_choice", "B", "plotQA"), ("open_ended", "People walk.", "summary")]
    assert samples[0].path == str(tmp_path / "video/1_plotQA/movie1.mp4")


def test_video_holmes_minerva(tmp_path):
    ann = write_json(tmp_path / "test_Video-Holmes.json", [
        {"video ID": "xyz", "Question ID": 3, "Question Type": "TCI", "Question": "Why?",
         "Options": {"A": "x", "B": "y", "C": "z", "D": "w", "E": "v", "F": "u"},
         "Answer": "E", "Explanation": "..."}])
    samples, _ = load("video_holmes", ann, tmp_path)
    assert samples[0].solution == "E" and len(samples[0].options) == 6
    assert samples[0].meta["question_type"] == "TCI"
    ann = write_json(tmp_path / "minerva.json", [
        {"key": "m1", "video_id": "yt1", "question": "What is counted?",
         **{f"answer_choice_{i}": f"c{i}" for i in range(5)}, "answer_id": 3,
         "answer": "c3"}])
    samples, _ = load("minerva", ann, tmp_path)
    assert samples[0].solution == "D" and samples[0].id == "minerva-m1"


def test_vcrbench_mixes_choice_and_open_ended(tmp_path):
    samples, _ = load("vcrbench", write_vcrbench(tmp_path / "vcr.json", ["a.mp4", "b.mp4"]),
                      tmp_path)
    assert [s.problem_type for s in samples] == ["multiple_choice", "open_ended"]
    assert samples[0].solution == "B" and samples[1].solution == "a shape moves right"
    assert samples[0].meta["task"] == "video temporal counting"


def test_videoreasonbench_longvideo_reason_videomathqa_odv(tmp_path):
    samples, _ = load("videoreasonbench", write_json(tmp_path / "vrb.json", [
        {"video": "v1.mp4", "question": "Which cup holds the ball?", "answer": "the left cup",
         "dim": "infer state"}]), tmp_path)
    assert samples[0].problem_type == "open_ended" and samples[0].meta["task"] == "infer state"
    samples, _ = load("longvideo_reason", write_jsonl(tmp_path / "lvr.jsonl", [
        {"id": "q1", "video": "v.mp4", "question": "Why?", "options": ["A. x", "B. y"],
         "answer": "<answer>B</answer>", "category": "Goal"}]), tmp_path)
    assert samples[0].solution == "B" and samples[0].meta["task"] == "Goal"
    samples, _ = load("videomathqa", write_jsonl(tmp_path / "vmqa.jsonl", [
        {"question_id": "p1", "video_id": "math1", "question": "What is the area?",
         "options": ["(A) 2", "(B) 4", "(C) 8"], "answer": "C", "category": "Problem Focused"}]),
        tmp_path)
    assert samples[0].options == ["A. 2", "B. 4", "C. 8"] and samples[0].solution == "C"
    # CSV with the options as a JSON list in one column
    csv_path = tmp_path / "odv.csv"
    csv_path.write_text('id,clip,question,options,answer,task\n'
                        'o1,c1.mp4,Is the light red?,"[""red"", ""green""]",A,perception\n')
    samples, _ = load("odvbench", csv_path, tmp_path)
    assert samples[0].options == ["A. red", "B. green"] and samples[0].solution == "A"


def test_mmvu_urls_and_videommmu_tracks(tmp_path):
    touch(tmp_path, "videos/Art/0.mp4")
    ann = write_json(tmp_path / "validation.json", [
        {"id": "m0", "video": "https://huggingface.co/datasets/yale-nlp/MMVU/resolve/main/"
                              "videos/Art/0.mp4",
         "question": "Which style?", "choices": {"A": "baroque", "B": "cubism"},
         "answer": "B", "question_type": "multiple-choice", "metadata": {"subject": "Art"}},
        {"id": "m1", "video": "https://huggingface.co/datasets/yale-nlp/MMVU/resolve/main/"
                              "videos/Art/0.mp4",
         "question": "Name the painter.", "choices": {}, "answer": "Picasso",
         "question_type": "open-ended", "metadata": {"subject": "Art"}}])
    samples, _ = load("mmvu", ann, tmp_path)
    assert samples[0].path == str(tmp_path / "videos/Art/0.mp4")
    assert [s.problem_type for s in samples] == ["multiple_choice", "open_ended"]
    assert samples[1].meta["subject"] == "Art"
    write_parquet(tmp_path / "mmmu/Perception.parquet", [
        {"id": "perception_1", "question": "What is shown?", "options": ["x", "y", "z"],
         "answer": "C", "question_type": "multiple-choice"}])
    write_parquet(tmp_path / "mmmu/Adaptation.parquet", [
        {"id": "adaptation_1", "question": "Compute the speed.", "options": [],
         "answer": "12.5", "question_type": "open"}])
    samples, _ = load("videommmu", tmp_path / "mmmu", tmp_path)
    assert [(s.meta["track"], s.problem_type, s.solution) for s in samples] == [
        ("Adaptation", "numerical", "12.5"), ("Perception", "multiple_choice", "C")]


def test_vsibench_choice_and_number_types(tmp_path):
    touch(tmp_path, "scannet/scene0011_00.mp4")
    ann = write_parquet(tmp_path / "test-00000-of-00001.parquet", [
        {"id": 1, "dataset": "scannet", "scene_name": "scene0011_00",
         "question_type": "object_counting", "question": "How many chairs?",
         "ground_truth": "4", "options": None},
        {"id": 2, "dataset": "scannet", "scene_name": "scene0011_00",
         "question_type": "object_rel_direction_easy", "question": "Where is the sofa?",
         "ground_truth": "B", "options": ["A. left", "B. right"]}])
    samples, ctx = load("vsibench", ann, tmp_path)
    assert [(s.problem_type, s.solution) for s in samples] == [("vsibench_mra", "4"),
                                                               ("multiple_choice", "B")]
    assert "Answer with a number" in samples[0].problem and ctx.media.missing == 0


def test_charades_sta_text_and_json(tmp_path):
    ann = write_charades(tmp_path / "charades_sta_test.txt",
                         [("3MSZA", 24.3, 30.4, "person turn a light on."),
                          ("3MSZA", 0.0, 6.1, "a person is opening a door.")])
    samples, _ = load("charades_sta", ann, tmp_path)
    assert [s.solution for s in samples] == [[24.3, 30.4], [0.0, 6.1]]
    assert samples[0].problem_type == "temporal_grounding"
    assert '"person turn a light on"' in samples[0].problem
    ann = write_json(tmp_path / "charades.json", {"3MSZA": {
        "duration": 30.96, "timestamps": [[24.3, 30.4], [0, 6.1]],
        "sentences": ["person turn a light on.", "a person is opening a door."]}})
    samples, _ = load("charades_sta", ann, tmp_path)
    assert [s.solution for s in samples] == [[24.3, 30.4], [0.0, 6.1]]
    bad = tmp_path / "bad.txt"
    bad.write_text("3MSZA 24.3##no end time\n")
    with pytest.raises(FormatError, match=r"bad.txt:1: expected '<video> <start> <end>"):
        load("charades_sta", bad, tmp_path)


def test_stvg_hcstvg_boxes_become_seconds(tmp_path):
    ann = write_json(tmp_path / "test.json", {"v1.mp4": {
        "English": "The man in black sits down.", "st_time": 1.0, "ed_time": 3.0,
        "st_frame": 10, "ed_frame": 30, "img_hw": [100, 200],
        "bbox": [[10, 20, 30, 40]] * 21}})
    samples, _ = load("stvg", ann, tmp_path)
    s = samples[0]
    # 10 frames a second (st_frame / st_time): frames 10..30 are seconds 1..3.
    assert s.solution == {"span": [1.0, 3.0], "boxes": {"1": [10.0, 20.0, 40.0, 60.0],
                                                         "2": [10.0, 20.0, 40.0, 60.0],
                                                         "3": [10.0, 20.0, 40.0, 60.0]}}
    assert s.meta["reward_kwargs"] == {"box_format": "pixel", "image_size": [200, 100]}


def test_ovobench_skips_forward_tasks(tmp_path):
    ann = write_json(tmp_path / "ovo_bench_new.json", [
        {"id": 0, "task": "EPM", "video": "src/0.mp4", "realtime": 12.0,
         "question": "What did I drop?", "options": ["meat", "onion", "eggplant"], "gt": 2},
        {"id": 1, "task": "REC", "video": "src/1.mp4", "test_info": [{"realtime": 3}]}])
    samples, ctx = load("ovobench", ann, tmp_path)
    assert [(s.solution, s.meta["task"]) for s in samples] == [("C", "EPM")]
    assert samples[0].path.endswith("chunked_videos/0.mp4")
    assert sum(ctx.skipped.values()) == 1


def test_livesports_clip_names_and_converted_layout(tmp_path):
    touch(tmp_path, "I0rOeSG6_Y4_300.745_350.676.mp4")
    ann = write_jsonl(tmp_path / "qa.jsonl", [
        {"video_id": "I0rOeSG6_Y4", "begin": 300.745, "end": 350.676, "question": "When?",
         "options": ["A: early", "B: late"], "answer": "A", "q_type": "When"}])
    samples, ctx = load("livesports3k_qa", ann, tmp_path)
    assert samples[0].path.endswith("I0rOeSG6_Y4_300.745_350.676.mp4") and not ctx.media.missing
    assert samples[0].options == ["A. early", "B. late"]
    # The converted layout (problem / problem_type / options / solution / path).
    ann = write_json(tmp_path / "converted.json", [
        {"data_type": "video", "problem_type": "multiple choice", "problem": "Who?",
         "options": ["A: x", "B: y"], "path": "I0rOeSG6_Y4_300.745_350.676.mp4",
         "problem_id": "p1", "solution": "<answer>B</answer>", "q_type_livesports": "Who"}])
    samples, _ = load("livesports3k_qa", ann, tmp_path)
    assert samples[0].solution == "B" and samples[0].meta["task"] == "Who"


def test_mmstar_tsv_writes_embedded_images(tmp_path):
    image = base64.b64encode(png_bytes()).decode()
    tsv = tmp_path / "MMStar.tsv"
    tsv.write_text("index\tquestion\tA\tB\tC\tD\tanswer\tcategory\tl2-category\timage\n"
                   f"7\tWhat colour is it?\tred\tgreen\tblue\tgrey\tA\tcoarse perception"
                   f"\timage scene\t{image}\n")
    samples, _ = load("mmstar", tsv, tmp_path, tmp=tmp_path)
    s = samples[0]
    assert s.data_type == "image" and s.solution == "A" and s.path.endswith(".png")
    assert Path(s.path).read_bytes() == png_bytes()
    assert s.meta["l2_category"] == "image scene"


def test_limit_and_unique_ids(tmp_path):
    ann = write_parquet(tmp_path / "t.parquet", videomme_rows(["a", "b", "c", "d"]))
    samples, _ = load("videomme", ann, tmp_path, limit=2)
    assert len(samples) == 2


def test_wrong_format_names_the_fields_found(tmp_path):
    ann = write_json(tmp_path / "x.json", [{"vid": "a", "q": "?", "ans": "A"}])
    with pytest.raises(FormatError, match=r"x.json: record 0: videomme: no field videoID "
                                          r"\(fields present: ans, q, vid\)"):
        load("videomme", ann, tmp_path)
    ann = write_json(tmp_path / "y.json", [{"videoID": "a", "question_id": "1",
                                            "question": "?", "options": ["A. x", "B. y"],
                                            "answer": "F"}])
    with pytest.raises(FormatError, match="answer 'F' is neither a letter"):
        load("videomme", ann, tmp_path)
    with pytest.raises(FormatError, match="does not exist"):
        load("videomme", tmp_path / "missing.parquet", tmp_path)
    with pytest.raises(KeyError, match="unknown benchmark 'videome'; known: "):
        get_benchmark("videome")


def test_split_inline_options():
    stem, options = split_inline_options("What?\nOptions:\n(A) one\n(B) two\n  wrapped\n(C) 3")
    assert stem == "What?" and options == ["A. one", "B. two wrapped", "C. 3"]
