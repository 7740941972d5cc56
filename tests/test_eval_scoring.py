"""Answer extraction, per-item scoring and benchmark metrics, on hand-checked values."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from evr1.config import JudgeConfig, load_config
from evr1.eval.benchmarks import MetricSpec, get_benchmark
from evr1.eval.extraction import extract_answer
from evr1.eval.judge import ServerJudge, judge_rows, parse_verdict
from evr1.eval.metrics import summarize
from evr1.eval.scoring import score_response
from evr1.rewards.numeric import score_vsibench_mra

OPTS = ["A. red", "B. green", "C. blue", "D. yellow"]

# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize("response, answer, method", [
    ("<think>It is green.</think><answer>B</answer>", "B", "tag"),
    ("<answer>(C) blue</answer>", "C", "tag"),
    ("<answer>green</answer>", "B", "tag"),  # the text of an option
    ("Looking at it closely... The answer is D.", "D", "phrase"),
    ("Final answer: (A)", "A", "phrase"),
    ("**Answer:** C", "C", "phrase"),
    ("Best option: (B) green", "B", "phrase"),
    ("<answer>I am not sure</answer> but I would say (C)", "C", "letter"),
    ("A man walks in. I think it is C", "C", "letter"),  # "A" and "I" are words here
    ("C) because the shape is blue", "C", "letter"),
    ("The shape is definitely yellow.", "D", "text"),  # quotes one option's text
    ("A man walks in and I see him.", None, "none"),
    ("", None, "none"),
    ("The answer is E.", None, "none"),  # not one of four options
])
def test_multiple_choice_extraction(response, answer, method):
    found = extract_answer(response, "multiple_choice", OPTS)
    assert (found.answer, found.method) == (answer, method)


@pytest.mark.parametrize("ptype, response, answer, method", [
    ("numerical", "<answer>4 shapes</answer>", "4", "tag"),
    ("numerical", "There are 3, no wait, the final answer is 5.", "5", "phrase"),
    ("numerical", "I count 2 then 7", "7", "text"),
    ("numerical", "no idea", None, "none"),
    ("vsibench_mra", "\\boxed{12.5}", "12.5", "phrase"),
    ("boolean", "<answer>Yes</answer>", "yes", "tag"),
    ("boolean", "Hmm. The answer is no", "no", "phrase"),
    ("temporal_grounding", "The event happens in 0:12 - 0:20 seconds", "[12, 20]", "text"),
    ("temporal_grounding", "<answer>[2.5, 7]</answer>", "[2.5, 7]", "tag"),
    ("spatial_grounding", "<answer>{\"bbox_2d\": [0.1, 0.2, 0.5, 0.6]}</answer>",
     "[0.1, 0.2, 0.5, 0.6]", "tag"),
    ("open_ended", "<think>hmm</think>A red car.", "A red car.", "text"),
])
def test_other_type_extraction(ptype, response, answer, method):
    found = extract_answer(response, ptype)
    assert (found.answer, found.method) == (answer, method)


def test_tube_extraction_accepts_time_for_span():
    found = extract_answer('<answer>{"time": [1, 3], "boxes": {"2": [0, 0, 10, 10]}}</answer>',
                           "spatial_temporal_grounding")
    assert json.loads(found.answer) == {"span": [1, 3], "boxes": {"2": [0, 0, 10, 10]}}


# --------------------------------------------------------------------------- scoring


def test_score_response_statuses():
    right = score_response("multiple_choice", "The answer is B", "B", OPTS)
    assert (right.score, right.status, right.method) == (1.0, "ok", "phrase")
    wrong = score_response("multiple_choice", "<answer>A</answer>", "B", OPTS)
    assert (wrong.score, wrong.status) == (0.0, "ok")
    none = score_response("multiple_choice", "no idea", "B", OPTS)
    assert (none.score, none.status, none.extracted) == (0.0, "unextracted", None)
    iou = score_response("temporal_grounding", "<answer>[0, 4]</answer>", [2, 6])
    assert iou.score == pytest.approx(2 / 6) and iou.details == {"iou": pytest.approx(2 / 6)}
    open_ = score_response("open_ended", "<answer>The Eiffel Tower</answer>", "eiffel tower")
    assert (open_.score, open_.status) == (None, "unjudged")
    assert open_.details["reference_score"] == 1.0


def test_vsi_mra_matches_the_official_thresholds():
    # VSI-Bench counts |pred - gold| / gold <= 1 - c for c in numpy.linspace(0.5, 0.95, 10).
    # 15 for 10: error 0.5 <= 1 - 0.5 only: 1 of 10; the training reward's strict "<" gives 0.
    assert score_vsibench_mra("15", "10").accuracy == pytest.approx(0.1)
    assert score_response("regression", "<answer>15</answer>", 10).score == 0.0
    # 11 for 10: error 0.1; with linspace's floats 1 - 0.9 is just above 0.1: 9 of 10 (the
    # reward: 8). 12 for 10: error 0.2 is just above 1 - 0.8 in floats: 6 of 10 in both.
    assert score_vsibench_mra("11", "10").accuracy == pytest.approx(0.9)
    assert score_response("regression", "<answer>11</answer>", 10).score == pytest.approx(0.8)
    assert score_vsibench_mra("12", "10").accuracy == pytest.approx(0.6)
    assert score_vsibench_mra("10", "10").accuracy == 1.0
    assert score_vsibench_mra("16", "10").accuracy == 0.0  # error 0.6 > 0.5
    assert score_vsibench_mra("none", "10").parsed is False


def test_tube_ious_by_hand():
    solution = {"span": [0, 4], "boxes": {"1": [0, 0, 10, 10], "2": [0, 0, 10, 10]}}
    answer = ('<answer>{"span": [2, 6], "boxes": {"2": [0, 0, 10, 5], '
              '"3": [0, 0, 10, 10]}}</answer>')
    got = score_response("spatial_temporal_grounding", answer, solution,
                         reward_kwargs={"box_format": "pixel"})
    # tIoU [2,6] vs [0,4] = 2/6. Seconds: gold {1, 2}, predicted {2, 3}; union 3 seconds, the
    # shared second 2 has box IoU 50/100: vIoU = 0.5 / 3.
    assert got.details["tiou"] == pytest.approx(2 / 6)
    assert got.details["viou"] == pytest.approx(0.5 / 3)
    # The reward itself: 0.5 * tIoU + 0.5 * mean IoU over shared seconds (second 2: 0.5).
    assert got.score == pytest.approx(0.5 * 2 / 6 + 0.5 * 0.5)


# --------------------------------------------------------------------------- metrics


def row(score, status="ok", ptype="multiple_choice", **meta):
    return {"score": score, "status": status, "problem_type": ptype, "meta": meta,
            "method": "tag" if status == "ok" else "none"}


def test_accuracy_never_drops_failures():
    rows = [row(1.0, duration="short"), row(1.0, duration="short"), row(0.0, duration="long"),
            row(0.0, "unextracted", duration="long"), row(0.0, "media_failed", duration="long")]
    out = summarize(rows, MetricSpec("accuracy", breakdowns=("duration",)))
    assert out["score"] == pytest.approx(40.0)  # 2 of 5, not 2 of 3
    assert out["sub_scores"]["duration"] == {"long": 0.0, "short": 100.0}
    assert (out["n"], out["n_unextracted"], out["n_media_failed"]) == (5, 1, 1)


def test_category_mean_and_merge():
    spec = get_benchmark("vsibench").metric
    rows = ([row(1.0, question_type="object_rel_direction_easy")] * 2
            + [row(0.0, question_type="object_rel_direction_hard")]
            + [row(0.5, ptype="vsibench_mra", question_type="object_counting")] * 3)
    out = summarize(rows, spec)
    # object_rel_direction = mean(100, 0) = 50; object_counting = 50; overall = 50.
    assert out["score"] == pytest.approx(50.0)
    per = out["sub_scores"]["question_type (mean over 2)"]
    assert per == {"object_counting": 50.0, "object_rel_direction": 50.0}


def test_mlvu_main_score_uses_choice_tasks_only():
    spec = get_benchmark("mlvu").metric
    rows = [row(1.0, task="plotQA"), row(0.0, task="needle"), row(0.0, task="needle"),
            row(None, "unjudged", ptype="open_ended", task="summary")]
    out = summarize(rows, spec)
    assert out["score"] == pytest.approx(50.0)  # mean(100, 0) over the two tasks
    assert out["n_unjudged"] == 1


def test_ovo_group_mean():
    spec = get_benchmark("ovobench").metric
    rows = [row(1.0, task="EPM"), row(0.0, task="ASI"), row(1.0, task="STU")]
    out = summarize(rows, spec)
    # backward = mean(EPM 100, ASI 0) = 50; realtime = STU 100; overall = 75.
    assert out["sub_scores"]["groups"] == {"backward": 50.0, "realtime": 100.0}
    assert out["score"] == pytest.approx(75.0)


def test_grounding_recall_and_miou():
    rows = [{"score": i, "status": "ok", "problem_type": "temporal_grounding",
             "details": {"iou": i}} for i in (0.8, 0.6, 0.4, 0.2)]
    rows.append({"score": 0.0, "status": "media_failed", "problem_type": "temporal_grounding",
                 "details": {}})
    out = summarize(rows, get_benchmark("charades_sta").metric)
    assert out["sub_scores"]["grounding"] == {"R@0.3": 60.0, "R@0.5": 40.0, "R@0.7": 20.0,
                                              "mIoU": 40.0}
    assert out["score"] == pytest.approx(40.0)


def test_stvg_metric():
    rows = [{"score": 0.5, "status": "ok", "problem_type": "spatial_temporal_grounding",
             "details": {"tiou": t, "viou": v}} for t, v in ((1.0, 0.6), (0.5, 0.2))]
    out = summarize(rows, get_benchmark("stvg").metric)
    assert out["sub_scores"]["stvg"] == {"m_tIoU": 75.0, "m_vIoU": 40.0, "vIoU@0.3": 50.0,
                                         "vIoU@0.5": 50.0}


# --------------------------------------------------------------------------- judge


def test_parse_verdict():
    assert parse_verdict("Correct.") == 1.0
    assert parse_verdict("incorrect") == 0.0
    assert parse_verdict("I cannot tell") is None


class _FakeJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible /chat/completions that says correct when the answers share a word."""

    calls = 0

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        reference = prompt.split("Reference answer: ")[1].split("\n")[0].lower().split()
        answer = prompt.split("Model answer: ")[1].split("\n")[0].lower().split()
        verdict = "correct" if set(reference) & set(answer) else "incorrect"
        type(self).calls += 1
        data = json.dumps({"choices": [{"message": {"content": verdict}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_url():
    server = HTTPServer(("127.0.0.1", 0), _FakeJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_server_judge_scores_and_caches(judge_url, tmp_path):
    rows = [{"status": "unjudged", "score": None, "question": "What moves?",
             "solution": "a red car", "extracted": "the car"},
            {"status": "unjudged", "score": None, "question": "Who?",
             "solution": "a dog", "extracted": "nobody"},
            {"status": "unjudged", "score": None, "question": "Who?", "solution": "a dog",
             "extracted": None}]
    judge = ServerJudge(JudgeConfig(backend="server", url=judge_url))
    _FakeJudge.calls = 0
    assert judge_rows(rows, judge, tmp_path / "cache.jsonl") == 2
    assert [(r["status"], r["score"]) for r in rows] == [("judged", 1.0), ("judged", 0.0),
                                                          ("unjudged", None)]
    again = [{**r, "status": "unjudged", "score": None} for r in rows]
    assert judge_rows(again, judge, tmp_path / "cache.jsonl") == 2
    assert _FakeJudge.calls == 2  # the second pass came from the cache


def test_unreachable_judge_leaves_items_unjudged(tmp_path):
    judge = ServerJudge(JudgeConfig(backend="server", url="http://127.0.0.1:9/v1",
                                    timeout_s=2))
    rows = [{"status": "unjudged", "score": None, "question": "q", "solution": "a",
             "extracted": "a"}]
    assert judge_rows(rows, judge, tmp_path / "cache.jsonl") == 0
    assert rows[0]["status"] == "unjudged"


def test_eval_config_checks():
    cfg = load_config(None, ["eval.benchmarks=[{name: videomme, annotation: x}]",
                             "eval.temperature=0.7"])
    assert cfg.eval.benchmarks[0].name == "videomme" and cfg.eval.temperature == 0.7
    with pytest.raises(ValueError, match="appears twice; give one an alias"):
        load_config(None, ["eval.benchmarks=[{name: mvbench}, {name: mvbench}]"])
    with pytest.raises(ValueError, match="eval.num_shards must be >= 1"):
        load_config(None, ["eval.num_shards=0"])
    with pytest.raises(ValueError, match="needs eval.judge.url"):
        load_config(None, ["eval.judge.backend=server"])
