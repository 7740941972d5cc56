"""evr1.models: tiny-model factory, loading, prompt encoding, placeholder suppression."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import script_module
from transformers import AutoModelForImageTextToText, AutoProcessor

from evr1.models import (
    ModelLoadError,
    build_tiny_model,
    encode,
    load_model,
    load_processor,
    vision_token_ids,
)
from evr1.models.tokenizer import ANSWER_WORDS, IMAGE_PAD, VIDEO_PAD


def _frames(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def processor(tiny_model_dir: Path):
    return load_processor(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):
    return load_model(tiny_model_dir, torch.float32, "cpu")


def _joint_batch(processor, size: int):
    """One video (4 frames), one image and one text prompt."""
    return encode(processor,
                  ["What colour is the shape?", "What is shown?", "Say yes or no."],
                  [_frames(4, size, size), _frames(1, size, size, seed=1), None],
                  ["video", "image", "text"], fps=[2.0, 0.0, 0.0])


# --------------------------------------------------------------------------- the tiny folder


def test_tiny_folder_reloads_through_auto_classes(tiny_model_dir: Path) -> None:
    auto_processor = AutoProcessor.from_pretrained(tiny_model_dir)
    auto_model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    assert type(auto_processor).__name__ == "Qwen2_5_VLProcessor"
    assert type(auto_processor.video_processor).__name__ == "Qwen2VLVideoProcessor"
    assert type(auto_processor.tokenizer).__name__ == "Qwen2Tokenizer"
    assert type(auto_model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    tokenizer, config = auto_processor.tokenizer, auto_model.config
    assert config.text_config.vocab_size == len(tokenizer)
    assert config.video_token_id == tokenizer.convert_tokens_to_ids(VIDEO_PAD)
    assert config.image_token_id == tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    assert config.text_config.hidden_size // config.text_config.num_attention_heads == 64


def test_answer_format_is_a_few_tokens(processor) -> None:
    tokenizer = processor.tokenizer
    ids = tokenizer("<answer>B</answer>").input_ids
    assert len(ids) <= 5
    # The tags are not special tokens: decoding for the reward must keep them.
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<answer>B</answer>"
    for word in ANSWER_WORDS:
        assert len(tokenizer(word).input_ids) == 1, word
        if not word.isdigit():
            assert len(tokenizer(" " + word).input_ids) == 1, word


def test_chat_template_has_qwen_layout(processor) -> None:
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Hi"}]}],
        tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Hi"
                    "<|im_end|>\n<|im_start|>assistant\n")


# --------------------------------------------------------------------------- encoding


def test_joint_batch_has_expected_grids_and_left_padding(processor) -> None:
    batch = _joint_batch(processor, 56)
    assert batch["video_grid_thw"].tolist() == [[2, 4, 4]]
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert batch["pixel_values_videos"].shape[0] == 2 * 4 * 4
    assert bool(batch["attention_mask"][:, -1].all())  # left padding: prompts end together
    video_id = processor.tokenizer.convert_tokens_to_ids(VIDEO_PAD)
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    counts = [((row == video_id).sum().item(), (row == image_id).sum().item())
              for row in batch["input_ids"]]
    assert counts == [(8, 0), (0, 4), (0, 0)]  # grid / merge^2 placeholders per visual


def test_frames_are_not_resized_again(processor) -> None:
    # 28x56 is below the processor's minimum pixel count: any resize would enlarge it.
    batch = encode(processor, ["a", "b"], [_frames(2, 28, 56), _frames(1, 28, 28)],
                   ["video", "image"])
    assert batch["video_grid_thw"].tolist() == [[1, 2, 4]]
    assert batch["image_grid_thw"].tolist() == [[1, 2, 2]]
    assert batch["second_per_grid_ts"].tolist() == [1.0]  # temporal patch 2 / default 2 fps


def test_text_only_batch(processor) -> None:
    batch = encode(processor, ["one", "two words"], [None, None], ["text", "text"])
    assert "pixel_values" not in batch and "pixel_values_videos" not in batch
    assert batch["input_ids"].shape[0] == 2


@pytest.mark.parametrize("frames, data_type, message", [
    (_frames(4, 50, 56), "video", "multiple of 28"),
    (_frames(3, 56, 56), "video", "temporal patch"),
    (_frames(2, 56, 56), "image", "one frame"),
    (_frames(4, 56, 56).astype(np.float32), "video", "uint8"),
    (_frames(1, 56, 56), "text", "no frames"),
])
def test_bad_frames_are_rejected(processor, frames, data_type, message) -> None:
    with pytest.raises(ValueError, match=message):
        encode(processor, ["q"], [frames], [data_type])


# --------------------------------------------------------------------------- generation


def _generated_ids(model, batch, suppress: list[int] | None, runs: int) -> torch.Tensor:
    prompt_len = batch["input_ids"].shape[1]
    outs = []
    for seed in range(runs):
        torch.manual_seed(seed)
        out = model.generate(**batch, max_new_tokens=12, do_sample=True, temperature=1.0,
                             suppress_tokens=suppress)
        outs.append(out[:, prompt_len:].flatten())
    return torch.cat(outs)


def test_generation_never_emits_vision_placeholders(processor, model) -> None:
    batch = _joint_batch(processor, 56)
    banned = vision_token_ids(processor.tokenizer)
    assert len(banned) == 4  # image/video pad, vision start/end (no <|vision_pad|> here)
    eos = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert eos not in banned
    tokens = _generated_ids(model, batch, banned, runs=4)
    assert not torch.isin(tokens, torch.tensor(banned)).any()


def test_suppression_holds_against_a_model_that_prefers_placeholders(
        tiny_model_dir: Path, processor) -> None:
    # A model whose output head strongly favours the placeholders: without suppression it
    # emits them (so the check below can fail), with suppression it never does.
    model = load_model(tiny_model_dir, "float32", "cpu")
    banned = vision_token_ids(processor.tokenizer)
    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[banned] = 8.0
    model.lm_head = biased
    batch = _joint_batch(processor, 56)
    banned_t = torch.tensor(banned)
    assert torch.isin(_generated_ids(model, batch, None, runs=1), banned_t).any()
    assert not torch.isin(_generated_ids(model, batch, banned, runs=3), banned_t).any()


def test_tiny_model_folder_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    """build_tiny_model saves into a hidden sibling and renames it into place: nothing is left
    beside the folder; a second build into it (another rank of the same job) keeps the first
    one's files; a non-empty folder without a model is refused, naming it, and left alone."""
    corpus = ["What colour is it?"]
    out = tmp_path / "models" / "tiny"
    build_tiny_model(out, corpus, seed=0)
    assert [p.name for p in out.parent.iterdir()] == ["tiny"]  # no staging folder left
    assert "staging" not in (out / "config.json").read_text()
    first = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    build_tiny_model(out, corpus, seed=0)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == first
    other = tmp_path / "models" / "notes"
    other.mkdir()
    (other / "readme.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=f"{other} exists and is not empty"):
        build_tiny_model(other, corpus, seed=0)
    assert [p.name for p in other.iterdir()] == ["readme.txt"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["notes", "tiny"]


# --------------------------------------------------------------------------- Qwen3-VL, loader


def test_qwen3_vl_tiny_model_encodes_and_generates(tmp_path: Path) -> None:
    folder = build_tiny_model(tmp_path / "qwen3", ["What colour is it?"], family="qwen3_vl")
    processor = load_processor(folder)
    model = load_model(folder, "float32", "cpu")
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    batch = _joint_batch(processor, 64)  # Qwen3-VL: patch 16 x merge 2
    assert batch["video_grid_thw"].tolist() == [[2, 4, 4]]
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]]
    banned = vision_token_ids(processor.tokenizer)
    tokens = _generated_ids(model, batch, banned, runs=1)
    assert not torch.isin(tokens, torch.tensor(banned)).any()


def test_loader_names_what_a_non_qwen_folder_is(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    for load in (load_model, load_processor):
        with pytest.raises(ModelLoadError, match="not a Qwen-VL model") as info:
            load(tmp_path)
        assert "llama" in str(info.value) and "LlamaForCausalLM" in str(info.value)


def test_loader_errors_for_missing_folder_and_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"no config.json.*weights.bin"):
        load_processor(tmp_path)


def test_cli_builds_a_folder_from_jsonl(tmp_path: Path, capsys) -> None:
    tool = script_module("tools/make_tiny_model.py")
    jsonl = tmp_path / "train.jsonl"
    record = {"id": "s1", "problem_type": "multiple_choice", "problem": "Which way?",
              "options": ["A. left", "B. right"], "solution": "A", "data_type": "text"}
    jsonl.write_text(json.dumps(record) + "\n")
    assert tool.main(["--out", str(tmp_path / "m"), "--corpus", str(jsonl),
                      "--size", "num_layers=1"]) == 0
    assert "'<answer>B</answer>' = 3 tokens" in capsys.readouterr().out
    assert load_model(tmp_path / "m").config.text_config.num_hidden_layers == 1


def test_realistic_shape_has_the_released_dimensions() -> None:
    """The qwen2_5_vl_1b preset: Qwen2.5-VL's vision tower and Qwen2.5-0.5B's language model,
    counted on the meta device (no memory). Reference counts, by hand from the dimensions:
    vision 32 blocks x (qkv 1280x3840+3840, proj 1280^2+1280, MLP 3x1280x3420+2x3420+1280,
    2 RMSNorm 2x1280) + patch embed 3x2x14x14x1280 + merger (ln 1280, 5120^2+5120, 5120x896+896)
    = 662.8M; LM 24 x (q 896^2+896, kv 2x(896x128+128), o 896^2, MLP 3x896x4864, 2x896 norms)
    + embed 151936x896 (tied) + final norm 896 = 494.0M."""
    from evr1.models.tiny import _build_model, _sizes, _vision_config
    from evr1.models.tokenizer import train_tokenizer

    sizes = _sizes("qwen2_5_vl", {}, "qwen2_5_vl_1b")
    assert _vision_config("qwen2_5_vl", sizes)["fullatt_block_indexes"] == [7, 15, 23, 31]
    with torch.device("meta"):
        model = _build_model("qwen2_5_vl", sizes, train_tokenizer(["What colour?"], 300), 0)
    vision = sum(p.numel() for p in model.model.visual.parameters())
    language = sum(p.numel() for p in model.model.language_model.parameters())
    block = 1280 * 3840 + 3840 + 1280 ** 2 + 1280 + 3 * 1280 * 3420 + 2 * 3420 + 1280 + 2 * 1280
    merger = 1280 + 5120 ** 2 + 5120 + 5120 * 896 + 896
    assert vision == 32 * block + 3 * 2 * 14 * 14 * 1280 + merger
    layer = 896 ** 2 + 896 + 2 * (896 * 128 + 128) + 896 ** 2 + 3 * 896 * 4864 + 2 * 896
    assert language == 24 * layer + 151_936 * 896 + 896
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # tied
    with pytest.raises(ValueError, match="unknown model shape 'huge'"):
        _sizes("qwen2_5_vl", {}, "huge")
