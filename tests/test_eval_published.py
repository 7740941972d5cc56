"""Every benchmark prepared from the folder a user downloads, in its published layout.

Each fixture is a dataset folder as the benchmark's release or its Hugging Face copy lays it
out (sharded parquet ``<split>-00000-of-0000N.parquet`` in config folders, the official JSON
files beside the training or test-without-answers files, videos in the folders the release
uses), with invented items but the release's field names, nesting and types. The config points
``annotation`` at the downloaded folder only (``video_root`` defaults to it). The sources of
each layout are in docs/eval_benchmarks.md. Then every prepared question is scored twice, with its
own answer (100) and a wrong one (0).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import script_module
from test_eval_formats import png_bytes, touch, write_json, write_jsonl, write_parquet

from evr1.config import load_config
from evr1.data.schema import load_samples
from evr1.eval.benchmarks import BENCHMARKS
from evr1.eval.prepare import prepare_all
from evr1.eval.scoring import OK, UNJUDGED, score_response

ROOT = Path(__file__).resolve().parents[1]


def parquet_shards(folder: Path, split: str, rows: list[dict], shards: int = 1,
                   schema: pa.Schema | None = None) -> None:
    """``<split>-0000k-of-0000N.parquet`` as the hub writes them (rows dealt in order)."""
    size = -(-len(rows) // shards)
    for k in range(shards):
        part = rows[k * size:(k + 1) * size]
        path = folder / f"{split}-{k:05d}-of-{shards:05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(part, schema=schema), path)


# --------------------------------------------------------------------------- the releases
# Each writer returns the questions it expects: {source id: (problem type, solution)}.


def videomme(root: Path) -> dict:
    """lmms-lab/Video-MME: videomme/test-*.parquet, videos extracted to data/<videoID>.mp4."""
    rows = [{"video_id": "001", "duration": "short", "domain": "Knowledge",
             "sub_category": "Humanity & History", "url": "https://www.youtube.com/watch?v=fFjv93ACGo8",
             "language": "English", "videoID": "fFjv93ACGo8", "question_id": "001-1",
             "task_type": "Counting Problem", "question": "How many people appear?",
             "options": ["A. 1.", "B. 2.", "C. 3.", "D. 4."], "answer": "C"},
            {"video_id": "002", "duration": "long", "domain": "Sports Competition",
             "sub_category": "Esports", "url": "https://www.youtube.com/watch?v=rj45Omrq6Pk",
             "language": "English", "videoID": "rj45Omrq6Pk", "question_id": "002-3",
             "task_type": "Action Reasoning", "question": "Which lane wins?",
             "options": ["A. Top.", "B. Jungle.", "C. Bottom.", "D. Mid."], "answer": "A"}]
    parquet_shards(root / "videomme", "test", rows, shards=2)
    touch(root, "data/fFjv93ACGo8.mp4", "data/rj45Omrq6Pk.mp4", "subtitle/fFjv93ACGo8.srt")
    return {"001-1": ("multiple_choice", "C"), "002-3": ("multiple_choice", "A")}


def mvbench(root: Path) -> dict:
    """OpenGVLab/MVBench: json/<task>.json beside video/<source dataset folders>."""
    write_json(root / "json/action_sequence.json", [
        {"video": "ZS9XR.mp4", "question": "What happened after the person took the food?",
         "candidates": ["Ate the medicine.", "Tidied up the blanket.", "Put down the cup."],
         "answer": "Ate the medicine.", "start": 11.1, "end": 19.6}])
    write_json(root / "json/fine_grained_pose.json", [
        {"video": "S001C001P001R001A001_rgb.avi", "question": "What is the pose?",
         "candidates": ["sit down", "stand up", "drink water", "throw"],
         "answer": "drink water"}])
    touch(root / "video", "star/Charades_v1_480/ZS9XR.mp4",
          "nturgbd/S001C001P001R001A001_rgb.avi")
    return {"action_sequence-0": ("multiple_choice", "A"),
            "fine_grained_pose-0": ("multiple_choice", "C")}


def tempcompass(root: Path) -> dict:
    """lmms-lab/TempCompass: one config folder per task, each test-00000-of-00001.parquet."""
    parquet_shards(root / "multi-choice", "test", [
        {"video_id": "1001", "question": "What is the direction of the car?\nA. left\nB. right"
         "\nC. up\nD. down", "answer": "B. right", "dim": "direction"}])
    parquet_shards(root / "yes_no", "test", [
        {"video_id": "1001", "question": "Is the car moving to the left?", "answer": "no",
         "dim": "direction"}])
    parquet_shards(root / "caption_matching", "test", [
        {"video_id": "1002", "question": "Which caption matches the video?\nCaption A: A dog "
         "runs fast.\nCaption B: A dog runs slowly.", "answer": "Caption A: A dog runs fast.",
         "dim": "speed"}])
    parquet_shards(root / "captioning", "test", [
        {"video_id": "1002", "question": "Describe the speed of the dog.", "answer": "fast",
         "dim": "speed", "mc_question": "How fast?\nA. fast\nB. slow", "mc_answer": "A. fast"}])
    touch(root, "videos/1001.mp4", "videos/1002.mp4")
    return {"multi-choice-1001-direction-0-0": ("multiple_choice", "B"),
            "yes_no-1001-direction-0-0": ("boolean", "no"),
            "caption_matching-1002-speed-0-0": ("multiple_choice", "A")}


def motionbench(root: Path) -> dict:
    """THUDM/MotionBench: video_info.meta.jsonl (dev answers, test "NA"), videos by path."""
    write_jsonl(root / "video_info.meta.jsonl", [
        {"key": "c3b1", "video_path": "public-dataset/c3b1.mp4", "video_type": "MR",
         "question_type": "MR", "qa": [
             {"uid": "1034", "question": "What does the hand do?\nA. waves\nB. grabs\nC. "
              "points\nD. claps", "answer": "B"}]},
        {"key": "f00d", "video_path": "self-collected/f00d.mp4", "video_type": "AO",
         "question_type": "AO", "qa": [
             {"uid": "2051", "question": "Where does the ball go?\nA. up\nB. down",
              "answer": "NA"}]}])
    touch(root, "public-dataset/c3b1.mp4", "self-collected/f00d.mp4")
    return {"1034": ("multiple_choice", "B")}


def lvbench(root: Path) -> dict:
    """THUDM/LVBench: video_info.meta.jsonl, one line per video, questions under qa."""
    write_jsonl(root / "video_info.meta.jsonl", [
        {"key": "2LH3JCGkEBU", "type": "sport", "video_info": {"duration_minutes": 73.0},
         "qa": [{"uid": "4329", "question": "How many Olympic Games are featured?\n(A) 4\n(B) "
                 "3\n(C) 2\n(D) 1", "answer": "B", "question_type": ["event understanding"],
                 "time_reference": "00:00-73:01"}]}])
    touch(root, "videos/2LH3JCGkEBU.mp4")
    return {"4329": ("multiple_choice", "B")}


def longvideobench(root: Path) -> dict:
    """longvideobench/LongVideoBench: lvb_val.json beside lvb_test_wo_gt.json and videos/."""
    record = {"video_id": "86CxyhFV9MI", "question": "What is the man wearing?",
              "question_wo_referring_query": "What is he wearing?",
              "candidates": ["a hat", "a scarf", "gloves"], "position": [1, 2],
              "topic_category": "NP-News-Programs", "question_category": "TOS", "level": "L2",
              "id": "86CxyhFV9MI_0", "video_path": "86CxyhFV9MI.mp4",
              "subtitle_path": "86CxyhFV9MI_en.json", "duration_group": 600, "duration": 523.5,
              "starting_timestamp_for_subtitles": 0, "view_count": 1000}
    write_json(root / "lvb_val.json", [{**record, "correct_choice": 1}])
    write_json(root / "lvb_test_wo_gt.json", [{**record, "id": "T_0"}])
    touch(root, "videos/86CxyhFV9MI.mp4")
    return {"86CxyhFV9MI_0": ("multiple_choice", "B")}


def mlvu(root: Path) -> dict:
    """MLVU/MVLU: MLVU/json/<n>_<task>.json and MLVU/video/<n>_<task>/ (names repeat)."""
    write_json(root / "MLVU/json/1_plotQA.json", [
        {"video": "movie101_66.mp4", "duration": 246, "question": "What color is the car?",
         "candidates": ["Red", "Blue", "Green", "White"], "answer": "Blue",
         "question_type": "plotQA"}])
    write_json(root / "MLVU/json/4_count.json", [
        {"video": "movie101_66.mp4", "duration": 246, "question": "How many dogs?",
         "candidates": ["1", "2", "3", "4"], "answer": "3", "question_type": "count"}])
    write_json(root / "MLVU/json/9_summary.json", [
        {"video": "sum1.mp4", "duration": 600, "question": "Summarize the video.",
         "answer": "A family travels.", "question_type": "summary"}])
    touch(root / "MLVU/video", "1_plotQA/movie101_66.mp4", "4_count/movie101_66.mp4",
          "9_summary/sum1.mp4")
    return {"1_plotQA-0": ("multiple_choice", "B"), "4_count-0": ("multiple_choice", "C"),
            "9_summary-0": ("open_ended", "A family travels.")}


def video_holmes(root: Path) -> dict:
    """TencentARC/Video-Holmes: Benchmark/test_Video-Holmes.json, Benchmark/videos_cropped/."""
    write_json(root / "Benchmark/test_Video-Holmes.json", [
        {"video ID": "0Kq3Hu", "Question ID": 3, "Question Type": "TCI",
         "Question": "Why does the woman leave?",
         "Options": {"A": "x", "B": "y", "C": "z", "D": "w", "E": "v", "F": "u"},
         "Answer": "E", "Explanation": "Because."}])
    touch(root, "Benchmark/videos_cropped/0Kq3Hu.mp4")
    return {"0Kq3Hu-3": ("multiple_choice", "E")}


def minerva(root: Path) -> dict:
    """google-deepmind/neptune MINERVA: minerva.json (YouTube ids; videos fetched by the user)."""
    write_json(root / "minerva.json", [
        {"key": "m1", "video_id": "yt_abc", "question": "How many goals are scored?",
         "answer": "two", "answer_id": 1, "reasoning": "...", "question_type": "Counting",
         "split": "test", "category": "Sports",
         **{f"answer_choice_{i}": c for i, c in enumerate(["one", "two", "three", "four",
                                                           "five"])}}])
    touch(root, "videos/yt_abc.mp4")
    return {"m1": ("multiple_choice", "B")}


def vcrbench(root: Path) -> dict:
    """VLM-Reasoning/VCR-Bench: question records with video_path, dimension, choices map."""
    write_json(root / "vcrbench.json", [
        {"id": 0, "video_path": "v_0.mp4", "dimension": "video temporal counting",
         "question": "Which colour moves?", "choices": {"A": "red", "B": "green"},
         "answer": "B"},
        {"id": 1, "video_path": "v_1.mp4", "dimension": "video plot analysis",
         "question": "What happens?", "answer": "a shape moves right"}])
    touch(root, "v/v_0.mp4", "v/v_1.mp4")
    return {"0": ("multiple_choice", "B"), "1": ("open_ended", "a shape moves right")}


def videoreasonbench(root: Path) -> dict:
    write_json(root / "reasoning_videos.json", [
        {"id": "r1", "video": "cup_01.mp4", "question": "Which cup holds the ball?",
         "answer": "the left cup", "dim": "infer state"}])
    touch(root, "videos/cup_01.mp4")
    return {"r1": ("open_ended", "the left cup")}


def longvideo_reason(root: Path) -> dict:
    write_json(root / "longvideo_reason_eval.json", [
        {"id": "q1", "video": "lv1.mp4", "question": "Why does he return?",
         "options": ["A. to rest", "B. to help"], "answer": "B", "category": "Goal"}])
    touch(root, "videos/lv1.mp4")
    return {"q1": ("multiple_choice", "B")}


def videomathqa(root: Path) -> dict:
    """MBZUAI/VideoMathQA: config folders mcq/ and mbin/ of test-*.parquet."""
    row = {"videoID": "10_0", "question_id": 7, "category": "Geometry",
           "question": "What is the area?", "options": ["(A) 12", "(B) 14", "(C) 16"],
           "answer": "B", "steps": "1. ...", "length": "short"}
    parquet_shards(root / "mcq", "test", [row])
    parquet_shards(root / "mbin", "test", [{**row, "options": ["(A) 12", "(B) 14"]}])
    touch(root, "videos/10_0.mp4")
    return {"7": ("multiple_choice", "B")}


def odvbench(root: Path) -> dict:
    write_jsonl(root / "odv_bench.jsonl", [
        {"id": "o1", "clip": "clip_1.mp4", "task": "ego motion", "question": "Where?",
         "options": {"A": "left", "B": "right"}, "answer": "A"}])
    touch(root, "clips/clip_1.mp4")
    return {"o1": ("multiple_choice", "A")}


def livesports(root: Path) -> dict:
    """stdKonjac/LiveSports-3K: the QA part beside the captioning (CC) part."""
    write_json(root / "LiveSports-3K-QA.json", [
        {"question_id": "ls1", "video_id": "NBA01", "begin": 10, "end": 40, "q_type": "who",
         "question": "Who scores?", "options": ["A. #23", "B. #30"], "answer": "B"}])
    write_json(root / "LiveSports-3K-CC.json", [{"video_id": "NBA01", "caption": "x"}])
    touch(root, "clips/NBA01_10_40.mp4")
    return {"ls1": ("multiple_choice", "B")}


def mmvu(root: Path) -> dict:
    """yale-nlp/MMVU: validation.json (open-ended records carry empty choices), videos/."""
    base = "https://huggingface.co/datasets/yale-nlp/MMVU/resolve/main/videos"
    write_json(root / "validation.json", [
        {"id": "val_0", "question": "Which algorithm is shown?", "choices": {
            "A": "", "B": "", "C": "", "D": "", "E": ""}, "answer": "Bubble Sort",
         "question_type": "open-ended", "metadata": {"subject": "Computer_Science",
                                                     "textbook": "x", "rationale": "y"},
         "video": f"{base}/Computer_Science/0.mp4"},
        {"id": "val_1", "question": "What reaction is this?", "choices": {
            "A": "oxidation", "B": "reduction", "C": "hydrolysis", "D": "fusion",
            "E": "fission"}, "answer": "C", "question_type": "multiple-choice",
         "metadata": {"subject": "Chemistry"}, "video": f"{base}/Chemistry/3.mp4"}])
    write_json(root / "test.json", [{"id": "test_0", "question": "?", "choices": {},
                                     "question_type": "open-ended", "video": f"{base}/Art/1.mp4"}])
    touch(root, "videos/Computer_Science/0.mp4", "videos/Chemistry/3.mp4")
    return {"val_0": ("open_ended", "Bubble Sort"), "val_1": ("multiple_choice", "C")}


def videommmu(root: Path) -> dict:
    """lmms-lab/VideoMMMU: Perception/, Comprehension/, Adaptation/ config folders of
    test-*.parquet; videos sorted into discipline folders the records do not name."""
    for track, rows in {
            "Perception": [{"id": "validation_Accounting_1", "question": "What is the total?",
                            "options": ["100", "200", "300"], "answer": "B",
                            "question_type": "multiple-choice", "link_selected": "x"}],
            "Comprehension": [{"id": "validation_Accounting_1", "question": "Compute the "
                               "tax in dollars.", "options": [], "answer": "42",
                               "question_type": "open", "link_selected": "x"}],
            "Adaptation": [{"id": "validation_Chemistry_5", "question": "Which product forms?",
                            "options": ["salt", "water", "gas", "acid"], "answer": "D",
                            "question_type": "multiple-choice", "link_selected": "x",
                            "image": {"bytes": png_bytes(), "path": "q.png"}}]}.items():
        parquet_shards(root / track, "test", rows)
    touch(root, "Business/validation_Accounting_1.mp4", "Science/validation_Chemistry_5.mp4")
    return {"Perception-validation_Accounting_1": ("multiple_choice", "B"),
            "Comprehension-validation_Accounting_1": ("numerical", "42"),
            "Adaptation-validation_Chemistry_5": ("multiple_choice", "D")}


def vsibench(root: Path) -> dict:
    """nyu-visionx/VSI-Bench: test-00000-of-00001.parquet, videos per source dataset."""
    parquet_shards(root, "test", [
        {"id": 1, "dataset": "arkitscenes", "scene_name": "41069025",
         "question_type": "object_counting", "question": "How many chairs are there?",
         "ground_truth": "4", "options": None},
        {"id": 2, "dataset": "scannet", "scene_name": "scene0011_00",
         "question_type": "object_rel_direction_easy", "question": "Is the sofa left of the "
         "table?", "ground_truth": "A", "options": ["A. left", "B. right"]}])
    touch(root, "arkitscenes/41069025.mp4", "scannet/scene0011_00.mp4")
    return {"1": ("vsibench_mra", "4"), "2": ("multiple_choice", "A")}


def charades_sta(root: Path) -> dict:
    """jiyanggao/TALL: charades_sta_test.txt beside the train file; Charades_v1_480/ videos."""
    (root / "charades_sta_test.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "charades_sta_test.txt").write_text("3MSZA 24.3 30.4##person turn a light on.\n")
    (root / "charades_sta_train.txt").write_text("AO8RW 0.0 6.9##a person is putting a book.\n")
    touch(root, "Charades_v1_480/3MSZA.mp4")
    return {"3MSZA-0": ("temporal_grounding", [24.3, 30.4])}


def stvg(root: Path) -> dict:
    """HC-STVG v2: anno_v2/val_v2.json beside train_v2.json, keyed by video file name."""
    anno = {"51_Dt5Tg.mp4": {"English": "The man in black walks to the door.",
                             "st_time": 2.0, "ed_time": 4.0, "st_frame": 50, "ed_frame": 100,
                             "bbox": [[10, 20, 30, 40]] * 51, "img_num": 500,
                             "img_hw": [720, 1280], "frame_count": 500}}
    write_json(root / "anno_v2/val_v2.json", anno)
    write_json(root / "anno_v2/train_v2.json", {"x.mp4": anno["51_Dt5Tg.mp4"]})
    touch(root, "v2_video/51_Dt5Tg.mp4")
    return {"51_Dt5Tg-0": ("spatial_temporal_grounding", None)}


def ovobench(root: Path) -> dict:
    """JoeLeelyf/OVO-Bench: ovo_bench_new.json; clips cut into chunked_videos/."""
    write_json(root / "ovo_bench_new.json", [
        {"id": 17, "task": "EPM", "video": "COIN/abc.mp4", "question": "What was used?",
         "options": ["knife", "spoon", "fork"], "gt": 1, "realtime": 120.5},
        {"id": 18, "task": "REC", "video": "COIN/abc.mp4", "activity": "jumping",
         "test_info": [{"realtime": 10, "type": 0}]}])
    touch(root, "chunked_videos/17.mp4", "src_videos/COIN/abc.mp4")
    return {"17": ("multiple_choice", "B")}


def mmstar(root: Path) -> dict:
    """Lin-Chen/MMStar: mmstar.parquet with the image embedded as {bytes, path}."""
    write_parquet(root / "mmstar.parquet", [
        {"index": 0, "question": "Which shape is shown?\nOptions: A: circle, B: square, "
         "C: triangle, D: star", "image": {"bytes": png_bytes(), "path": None},
         "answer": "B", "category": "coarse perception", "l2_category": "image scene",
         "meta_info": {"source": "x", "split": "val", "image_path": "0.png"}}])
    return {"0": ("multiple_choice", "B")}


def synthetic(root: Path) -> dict:
    write_jsonl(root / "heldout.jsonl", [
        {"id": "syn-1", "problem_type": "numerical", "problem": "How many?", "solution": "3",
         "data_type": "text"}])
    return {"syn-1": ("numerical", "3")}


RELEASES = {"videomme": videomme, "mvbench": mvbench, "tempcompass": tempcompass,
            "motionbench": motionbench, "lvbench": lvbench, "longvideobench": longvideobench,
            "mlvu": mlvu, "video_holmes": video_holmes, "minerva": minerva,
            "vcrbench": vcrbench, "videoreasonbench": videoreasonbench,
            "longvideo_reason": longvideo_reason, "videomathqa": videomathqa,
            "odvbench": odvbench, "livesports3k_qa": livesports, "mmvu": mmvu,
            "videommmu": videommmu, "vsibench": vsibench, "charades_sta": charades_sta,
            "stvg": stvg, "ovobench": ovobench, "mmstar": mmstar, "synthetic": synthetic}


def eval_config(tmp: Path, entries: list[dict]):
    path = tmp / "eval.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp / "run"),
                                    "eval": {"benchmarks": entries}}))
    return load_config(path)


# --------------------------------------------------------------------------- scoring


def responses(ptype: str, solution) -> tuple[str, str]:
    """A response with the right answer and one with a wrong answer of the same shape."""
    if ptype == "multiple_choice":
        wrong = "A" if solution != "A" else "B"
        return f"<answer>{solution}</answer>", f"<answer>{wrong}</answer>"
    if ptype == "boolean":
        flipped = "yes" if solution == "no" else "no"
        return f"<answer>{solution}</answer>", f"<answer>{flipped}</answer>"
    if ptype in ("numerical", "vsibench_mra"):
        return f"<answer>{solution}</answer>", f"<answer>{float(solution) * 10 + 7}</answer>"
    if ptype == "temporal_grounding":
        return (f"<answer>[{solution[0]}, {solution[1]}]</answer>",
                "<answer>[1000.0, 1001.0]</answer>")
    if ptype == "spatial_temporal_grounding":
        return (f"<answer>{json.dumps(solution)}</answer>",
                '<answer>{"span": [500, 501], "boxes": {"500": [0, 0, 1, 1]}}</answer>')
    return f"<answer>{solution}</answer>", "<answer>something else</answer>"


# --------------------------------------------------------------------------- tests


def test_every_benchmark_has_a_published_layout_here():
    assert set(RELEASES) == set(BENCHMARKS)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("published")
    expected, entries = {}, []
    for name, write in RELEASES.items():
        root = tmp / "downloads" / name
        root.mkdir(parents=True)
        expected[name] = write(root)
        annotation = root / "heldout.jsonl" if name == "synthetic" else root
        entries.append({"name": name, "annotation": str(annotation), "video_root":
                        str(root / "v") if name == "vcrbench" else ""})
    cfg = eval_config(tmp, entries)
    report = prepare_all(cfg)
    return tmp, cfg, expected, report


def test_every_release_prepares_from_its_download_folder(prepared):
    tmp, cfg, expected, report = prepared
    assert report.failed == []
    by_name = {s.name: s for s in report.prepared}
    assert set(by_name) == set(RELEASES)
    for name, summary in by_name.items():
        assert summary.media_missing == 0, (name, summary.line())
        samples = load_samples(Path(summary.path), check_media=False)
        got = {s.meta["source_id"] if name != "synthetic" else s.id: s for s in samples}
        assert set(got) == set(expected[name]), name
        for sid, (ptype, solution) in expected[name].items():
            sample = got[sid]
            assert sample.problem_type == ptype, (name, sid)
            if solution is not None:
                assert sample.solution == solution, (name, sid)
            if sample.path and sample.data_type == "video":
                assert Path(sample.path).is_file(), (name, sid, sample.path)


def test_layout_details(prepared):
    tmp, cfg, expected, report = prepared
    by_name = {s.name: s for s in report.prepared}

    def samples(name):
        return {s.meta["source_id"]: s
                for s in load_samples(Path(by_name[name].path), check_media=False)}

    # Video-MMMU: the track comes from the config folder; videos from subject folders.
    mmmu = samples("videommmu")
    assert {s.meta["track"] for s in mmmu.values()} == {"Perception", "Comprehension",
                                                        "Adaptation"}
    assert mmmu["Adaptation-validation_Chemistry_5"].path.endswith(
        "Science/validation_Chemistry_5.mp4")
    # TempCompass: the task from the config folder; captioning skipped and counted.
    assert {s.meta["task"] for s in samples("tempcompass").values()} == {
        "multi-choice", "yes_no", "caption_matching"}
    assert by_name["tempcompass"].skipped == {
        "captioning: needs an LLM to answer the paired question": 1}
    # Files that are not the evaluation split are not read.
    assert by_name["longvideobench"].samples == 1 and by_name["mmvu"].samples == 2
    assert by_name["charades_sta"].samples == 1 and by_name["stvg"].samples == 1
    assert by_name["videomathqa"].samples == 1  # mcq/ only, not mbin/
    assert by_name["livesports3k_qa"].samples == 1
    assert by_name["motionbench"].skipped == {"no public answer (test split)": 1}
    # MLVU: the same file name in two task folders resolves to each task's own video.
    mlvu = samples("mlvu")
    assert mlvu["1_plotQA-0"].path.endswith("1_plotQA/movie101_66.mp4")
    assert mlvu["4_count-0"].path.endswith("4_count/movie101_66.mp4")
    # MMVU: empty choices make an open-ended question without options.
    assert samples("mmvu")["val_0"].options is None
    # Video-MME: both shards are read.
    assert by_name["videomme"].samples == 2


def test_every_prepared_question_scores_right_and_wrong(prepared):
    tmp, cfg, expected, report = prepared
    checked = 0
    for summary in report.prepared:
        for s in load_samples(Path(summary.path), check_media=False):
            right, wrong = responses(s.problem_type, s.solution)
            kwargs = s.meta.get("reward_kwargs")
            good = score_response(s.problem_type, right, s.solution, s.options, kwargs)
            bad = score_response(s.problem_type, wrong, s.solution, s.options, kwargs)
            if s.problem_type == "open_ended":  # left for the judge, never a number here
                assert good.status == bad.status == UNJUDGED and good.score is None
                continue
            assert (good.status, good.score) == (OK, 1.0), (summary.name, s.id, good)
            assert bad.score == 0.0, (summary.name, s.id, bad)
            checked += 1
    assert checked >= 25


# --------------------------------------------------------------------------- other layouts


def test_other_published_layouts(tmp_path):
    """The same benchmarks from their other release (or pointed at one config folder/file)."""
    root = tmp_path / "dl"
    # Video-MME's official JSON: the questions of a video nested under "questions".
    write_json(root / "videomme_json/videomme.json", [
        {"video_id": "001", "duration": "short", "domain": "Knowledge",
         "sub_category": "Astronomy", "url": "https://www.youtube.com/watch?v=fFjv93ACGo8",
         "questions": [{"question_id": "001-1", "task_type": "Counting Problem",
                        "question": "How many?", "options": ["A. 1", "B. 2", "C. 3", "D. 4"],
                        "answer": "D"}]}])
    touch(root / "videomme_json", "data/fFjv93ACGo8.mp4")
    # TempCompass's official repository: questions/<task>.json, nested {video: {dim: [...]}}.
    write_json(root / "tc/questions/multi-choice.json", {"1001": {"direction": [
        {"question": "Where?\nA. left\nB. right", "answer": "A. left"}]}})
    touch(root / "tc", "videos/1001.mp4")
    # TempCompass pointed at one config folder (its videos one level up).
    parquet_shards(root / "tc2/yes_no", "test", [
        {"video_id": "1001", "question": "Is it left?", "answer": "yes", "dim": "direction"}])
    touch(root / "tc2", "videos/1001.mp4")
    # Video-MMMU on the hub's parquet branch (<track>/test/0000.parquet), one track file.
    write_parquet(root / "mmmu/Perception/test/0000.parquet", [
        {"id": "validation_Art_2", "question": "Which style?", "options": ["a", "b"],
         "answer": "A", "question_type": "multiple-choice"}])
    touch(root / "mmmu", "Art/validation_Art_2.mp4")
    # LVBench as lmms-lab's parquet: one row per question.
    parquet_shards(root / "lv/data", "train", [
        {"video_path": "2LH3JCGkEBU.mp4", "uid": "4323", "question": "What pants?\n(A) Short"
         "\n(B) Suit\n(C) Jeans\n(D) Beach", "question_type": ["entity recognition"],
         "answer": "C", "time_reference": "15:07-15:25", "type": "sport",
         "key": "2LH3JCGkEBU"}])
    touch(root / "lv", "2LH3JCGkEBU.mp4")
    entries = [
        {"name": "videomme", "alias": "mme_json", "annotation": str(root / "videomme_json")},
        {"name": "tempcompass", "alias": "tc_json", "annotation": str(root / "tc")},
        {"name": "tempcompass", "alias": "tc_config",
         "annotation": str(root / "tc2/yes_no")},
        {"name": "videommmu", "alias": "mmmu_file",
         "annotation": str(root / "mmmu/Perception/test/0000.parquet"),
         "video_root": str(root / "mmmu")},
        {"name": "lvbench", "alias": "lv_parquet", "annotation": str(root / "lv")}]
    report = prepare_all(eval_config(tmp_path, entries))
    assert report.failed == []
    got = {}
    for summary in report.prepared:
        assert summary.media_missing == 0, summary.line()
        got[summary.alias] = load_samples(Path(summary.path), check_media=False)
    assert [s.solution for s in got["mme_json"]] == ["D"]
    assert got["mme_json"][0].meta["duration"] == "short"
    assert [(s.meta["task"], s.solution) for s in got["tc_json"]] == [("multi-choice", "A")]
    assert [(s.meta["task"], s.solution) for s in got["tc_config"]] == [("yes_no", "yes")]
    assert [(s.meta["track"], s.solution) for s in got["mmmu_file"]] == [("Perception", "A")]
    assert [(s.meta["source_id"], s.solution) for s in got["lv_parquet"]] == [("4323", "C")]


def test_a_folder_without_the_layout_names_what_it_looked_for(tmp_path):
    (tmp_path / "TempCompass" / "README.md").parent.mkdir(parents=True)
    (tmp_path / "TempCompass" / "README.md").write_text("x")
    report = prepare_all(eval_config(tmp_path, [
        {"name": "tempcompass", "annotation": str(tmp_path / "TempCompass")}]))
    assert [f.alias for f in report.failed] == ["tempcompass"]
    message = report.failed[0].error
    assert "multi-choice/test-*.parquet" in message and "README.md" in message


def test_prepare_reports_a_failing_benchmark_and_prepares_the_others(tmp_path, capsys):
    """--prepare: the broken benchmark is named, the others are written, the exit status is 1,
    and the broken one's older prepared file is removed (nothing reads stale questions)."""
    launcher = script_module("launchers/eval.py")
    ok = tmp_path / "dl/vsibench"
    ok.mkdir(parents=True)
    vsibench(ok)
    broken = tmp_path / "dl/mmvu"
    write_json(broken / "validation.json", [
        {"id": "v0", "question": "?", "choices": {"A": "x", "B": "y"}, "answer": "Z",
         "question_type": "multiple-choice", "video": "videos/a.mp4"}])
    entries = [{"name": "mmvu", "annotation": str(broken)},
               {"name": "vsibench", "annotation": str(ok)},
               {"name": "mlvu", "alias": "mlvu_missing", "annotation": str(tmp_path / "nope")}]
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"),
                                      "eval": {"benchmarks": entries}}))
    stale = tmp_path / "run/eval/prepared/mmvu.jsonl"
    stale.parent.mkdir(parents=True)
    stale.write_text('{"id": "old"}\n')
    assert launcher.main(["--config", str(config), "--prepare"]) == 1
    out = capsys.readouterr().out
    assert "prepared vsibench (vsibench): 2 questions" in out
    assert "prepare FAILED: mmvu (mmvu): " in out and "answer 'Z'" in out
    assert "prepare FAILED: mlvu_missing (mlvu): " in out and "does not exist" in out
    assert "2 of 3 benchmark(s) failed: mmvu, mlvu_missing" in out
    assert (tmp_path / "run/eval/prepared/vsibench.jsonl").exists()
    assert not stale.exists()
