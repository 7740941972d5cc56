"""The pre-flight token check: counts worked out by hand, counts equal to what the real
processor builds (evr1.models.inputs.encode on the tiny models of both families), refusals that
name the sample, and a pass with the token budget summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CORPUS
from test_shards import clip, write_task

from evr1.config import load_config
from evr1.data.schema import load_samples
from evr1.eval.plan import eval_dir
from evr1.eval.preflight import preflight_eval
from evr1.models.inputs import encode
from evr1.models.preflight import (
    Limits,
    PreflightError,
    PreflightInput,
    TokenCounter,
    VisionGeometry,
    check_prompts,
    frame_timestamps,
    main,
    run_checks,
)
from evr1.models.tiny import build_tiny_model
from evr1.video.shards import ShardReader, merge_manifests

PROBLEM = "What colour is the moving shape?\nA. red\nB. blue"


@pytest.fixture(scope="module")
def qwen25(tiny_model_dir) -> TokenCounter:
    return TokenCounter(tiny_model_dir)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> TokenCounter:
    return TokenCounter(build_tiny_model(tmp_path_factory.mktemp("qwen3"), TINY_CORPUS,
                                         family="qwen3_vl"))


@pytest.fixture(params=["qwen25", "qwen3"])
def counter(request) -> TokenCounter:
    return request.getfixturevalue(request.param)


def test_vision_tokens_by_hand():
    # Qwen2.5-VL (patch 14, merge 2, temporal 2): 8 frames of 224 x 336 are 4 temporal
    # patches, each a 16 x 24 grid of 14-pixel patches, merged 2 x 2 into 8 x 12 = 96 tokens.
    assert VisionGeometry(14, 2, 2).tokens(8, 224, 336) == 4 * 96 == 384
    # Qwen3-VL (patch 16): 64 frames of 448 x 256: 32 temporal patches of 14 x 8 = 112 tokens.
    assert VisionGeometry(16, 2, 2).tokens(64, 448, 256) == 32 * 112 == 3584
    # An image is one temporal patch: 448 x 448 at patch 14 is 16 x 16 = 256 tokens.
    assert VisionGeometry(14, 2, 2).tokens(1, 448, 448) == 256
    # Qwen3-VL's stamps: frames at 0, 0.5, 1.0, 1.5 s (2 fps) pair up into 0.25 and 1.25 s.
    assert frame_timestamps(4, 2.0, 2) == [0.25, 1.25]


def test_frames_off_the_patch_grid_are_named():
    geometry = VisionGeometry(16, 2, 2)
    assert "not multiples of 32" in geometry.problem("video", 4, 28, 56)
    assert "temporal patch 2" in geometry.problem("video", 3, 32, 32)
    assert geometry.problem("video", 4, 32, 64) is None


@pytest.mark.parametrize("data_type, frames, rows, cols, fps", [
    ("video", 8, 2, 3, 2.0), ("video", 6, 1, 1, 1.3), ("video", 2, 3, 1, 0.7),
    ("image", 1, 2, 1, 2.0), ("text", 0, 0, 0, 2.0)])
def test_count_equals_the_processors_prompt(counter, data_type, frames, rows, cols, fps):
    """The counted prompt is exactly as long as the one encode() builds with pixels (Qwen3-VL:
    with its per-patch time stamps, here at rates that are not whole numbers)."""
    factor = counter.video.factor
    shape = None if data_type == "text" else (frames, rows * factor, cols * factor)
    pixels = None if shape is None else np.zeros((*shape, 3), np.uint8)
    built = encode(counter.processor, [PROBLEM], [pixels], [data_type], [fps])
    counted = counter.count(PROBLEM, data_type, shape, fps)
    assert counted.prompt_tokens == built["input_ids"].shape[1]
    assert counted.vision_tokens == (0 if shape is None else
                                     -(-frames // 2) * rows * cols)  # merged 2x2 per group


def test_batched_counts_equal_the_processors_prompts(counter):
    """count_many renders the template once per data type: problems of other lengths, with
    surrounding whitespace and line breaks, still count as encode() builds them."""
    factor = counter.video.factor
    problems = [PROBLEM, "  Is it red?\n", "How many shapes?\n\nA. 1\nB. 2 ", "x"]
    shape = (4, factor, 2 * factor)
    counted = counter.count_many([(p, "video", shape, 2.0) for p in problems] +
                                 [(p, "text", None, 2.0) for p in problems])
    pixels = np.zeros((*shape, 3), np.uint8)
    for i, problem in enumerate(problems):
        video = encode(counter.processor, [problem], [pixels], ["video"], [2.0])
        text = encode(counter.processor, [problem], [None], ["text"])
        assert counted[i].prompt_tokens == video["input_ids"].shape[1]
        assert counted[len(problems) + i].prompt_tokens == text["input_ids"].shape[1]


# --------------------------------------------------------------------------- refusals


def write_data(root: Path) -> tuple[Path, Path]:
    """Shards with a short clip (4 frames, 28 x 56) and a long one (64 frames, 56 x 56); a
    JSONL asking about both, plus a text question."""
    shards = root / "shards"
    write_task(shards, 0, 1, {"short": clip(0), "long": clip(1, t=64, h=56, w=56)})
    merge_manifests(shards, 1)
    jsonl = root / "data.jsonl"
    records = [{"id": i, "problem_type": "multiple_choice", "problem": PROBLEM,
                "options": ["red", "blue"], "solution": "A", "data_type": "video",
                "path": f"{i}.mp4"} for i in ("short", "long")]
    records.append({"id": "words", "problem_type": "multiple_choice", "problem": PROBLEM,
                    "options": ["red", "blue"], "solution": "B", "data_type": "text"})
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    return jsonl, shards


def _inputs(jsonl: Path, shards: Path) -> list[PreflightInput]:
    return [PreflightInput(str(jsonl), load_samples(jsonl, check_media=False),
                           ShardReader(shards))]


def test_refuses_a_prompt_over_max_prompt_length_naming_the_sample(tmp_path, qwen25):
    jsonl, shards = write_data(tmp_path)
    ok = check_prompts(qwen25, _inputs(jsonl, shards), Limits(0, 8, "eval.max_new_tokens",
                                                                 qwen25.context))
    lengths = {c.sample_id: c.prompt_tokens for c in ok.counts}
    # long: 32 temporal patches x (2 x 2 merged tokens) = 128 vision tokens, short: 2 x 1 x 2.
    assert {c.sample_id: c.vision_tokens for c in ok.counts} == {"short": 4, "long": 128,
                                                                 "words": 0}
    limit = lengths["long"] - 1  # the long clip's prompt is one token too many
    with pytest.raises(PreflightError) as refused:
        run_checks(qwen25, _inputs(jsonl, shards), Limits(limit, 8, "eval.max_new_tokens",
                                                          qwen25.context))
    message = str(refused.value)
    assert f"{jsonl}: sample 'long': {lengths['long']} prompt tokens (128 for 64 frames of " \
           f"56x56) > data.max_prompt_length {limit}" in message
    assert "'short'" not in message.split("\n", 1)[1].split("pre-flight (")[0]


def test_refuses_a_response_that_would_run_past_the_context(tmp_path, qwen25):
    jsonl, shards = write_data(tmp_path)
    assert qwen25.context == 8192  # the tiny model's max_position_embeddings
    report = check_prompts(qwen25, _inputs(jsonl, shards),
                           Limits(0, 8192 - 60, "rollout.max_new_tokens", qwen25.context))
    lengths = {c.sample_id: c.prompt_tokens for c in report.counts}
    refused = {sid for sid, n in lengths.items() if n + 8192 - 60 > 8192}
    assert refused == {"long"}  # the others are under 60 tokens, the long clip over
    assert len(report.problems) == 1
    assert report.problems[0].startswith(f"{jsonl}: sample 'long': ")
    assert "> the model's context 8192" in report.problems[0]


def test_shards_for_another_family_are_refused(tmp_path, qwen3):
    jsonl, shards = write_data(tmp_path)  # 28 x 56 and 56 x 56 frames: Qwen2.5-VL's grid
    report = check_prompts(qwen3, _inputs(jsonl, shards), Limits(0, 8, "x", qwen3.context))
    assert [p.split(" (")[0] for p in report.problems] == [f"{jsonl}: sample 'short'",
                                                           f"{jsonl}: sample 'long'"]
    assert all("not multiples of 32" in p for p in report.problems)


def test_training_cli_passes_with_a_budget_summary_and_refuses(tmp_path, qwen25, capsys):
    jsonl, shards = write_data(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text(f"run_dir: {tmp_path}\ndata: {{train_jsonl: {jsonl}}}\n"
                      f"preprocess: {{out_dir: {shards}}}\nmodel: {{path: {qwen25.model_dir}}}\n")
    assert main(["--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"{jsonl}: 3 prompts; vision tokens 0 / 4 / 128" in out
    assert "prompt + rollout.max_new_tokens" in out
    assert main(["--config", str(config), "data.max_prompt_length=100"]) == 1
    err = capsys.readouterr().err
    assert "sample 'long'" in err and "data.max_prompt_length 100" in err


def test_eval_preflight_checks_each_benchmark(tmp_path, qwen25):
    jsonl, shards = write_data(tmp_path)
    cfg = load_config(None, [f"run_dir={tmp_path}", f"data.eval_jsonl={jsonl}",
                             f"preprocess.out_dir={shards}", f"eval.models=[{qwen25.model_dir}]",
                             "eval.max_new_tokens=8150"])
    prepared = eval_dir(cfg) / "prepared" / "synthetic.jsonl"
    prepared.parent.mkdir(parents=True)
    prepared.write_text(jsonl.read_text())
    with pytest.raises(PreflightError) as refused:
        preflight_eval(cfg)
    assert f"synthetic ({prepared}): sample 'long': " in str(refused.value)
    cfg.eval.max_new_tokens = 64
    (report,) = preflight_eval(cfg)
    assert report.ok and len(report.counts) == 3
    assert f"synthetic ({prepared}): 3 prompts" in report.summary()
