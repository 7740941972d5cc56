"""Tiny random-init Qwen-VL models, built locally, for CPU runs and tests.

``build_tiny_model`` writes one folder (model, tokenizer, processor, chat template, generation
config) that loads through the same ``from_pretrained`` / ``AutoProcessor.from_pretrained``
path as a real Qwen2.5-VL or Qwen3-VL checkpoint, so everything downstream is exercised with
the real classes; only the sizes differ.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import transformers

from evr1.config import FAMILY_PATCH_SIZE
from evr1.models.tokenizer import (
    CHAT_TEMPLATE,
    ENDOFTEXT,
    IM_END,
    IMAGE_PAD,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    train_tokenizer,
)

Family = Literal["qwen2_5_vl", "qwen3_vl"]
FAMILIES: tuple[str, ...] = ("qwen2_5_vl", "qwen3_vl")


@dataclass
class TinySizes:
    """Sizes of a tiny model. head_dim = hidden_size / num_heads stays 64 by default because
    vLLM's CPU attention kernel refuses smaller heads."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 2
    intermediate_size: int = 256
    vision_depth: int = 2
    vision_hidden: int = 64
    vision_heads: int = 2
    vision_intermediate: int = 128
    patch_size: int | None = None  # None: the family's own (14 for Qwen2.5-VL, 16 for Qwen3-VL)
    merge_size: int = 2
    temporal_patch_size: int = 2
    max_position_embeddings: int = 8192
    tokenizer_vocab: int = 4096  # cap on the learned BPE vocabulary
    vocab_multiple: int = 1  # round the embedding rows up (e.g. 64 for tensor-parallel splits)
    # At least this many embedding rows (the real 151,936: the output layer's cost and the
    # log-prob work over a real vocabulary); ids past the tokenizer's decode to nothing.
    vocab_size: int | None = None
    deepstack_levels: int = 1  # Qwen3-VL: the last n vision blocks feed decoder layers 0..n-1
    tie_embeddings: bool = False  # output matrix = embedding (Qwen2.5-VL-3B, Qwen3-VL-2B/4B)
    # Qwen3-VL stores head_dim; heads x head_dim may differ from hidden_size (Qwen3-VL-4B).
    attention_head_dim: int | None = None  # None: hidden_size / num_heads

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.hidden_size // self.num_heads

    def validate(self) -> None:
        if (self.attention_head_dim is None and self.hidden_size % self.num_heads) or \
                self.num_heads % self.num_kv_heads:
            raise ValueError(f"tiny model: need hidden_size % num_heads == 0 (or an "
                             f"attention_head_dim) and num_heads % num_kv_heads == 0, got "
                             f"{self.hidden_size}, {self.num_heads}, {self.num_kv_heads}")
        if self.head_dim % 4:
            raise ValueError(f"tiny model: head_dim {self.head_dim} must be a multiple of 4 "
                             "(it is split into temporal/height/width rotary sections)")
        if self.vision_hidden % self.vision_heads:
            raise ValueError("tiny model: vision_hidden must be a multiple of vision_heads")
        if not 1 <= self.deepstack_levels <= self.vision_depth:
            raise ValueError(f"tiny model: deepstack_levels {self.deepstack_levels} must be "
                             f"between 1 and vision_depth {self.vision_depth}")


# Named shapes for build_tiny_model(shape=...). "tiny" is the CPU default. "qwen2_5_vl_1b" is
# random-init at a realistic size (~1.2B parameters), for GPU timings: the vision tower of the
# released Qwen2.5-VL (depth 32, hidden 1280, 16 heads, MLP 3420, patch 14, window attention
# with full attention in blocks 7/15/23/31) and the language model of Qwen2.5-0.5B (hidden 896,
# 24 layers, 14 heads, 2 KV heads, MLP 4864, tied embeddings, vocabulary 151,936).
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {},
    "qwen2_5_vl_1b": dict(
        hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864,
        vision_depth=32, vision_hidden=1280, vision_heads=16, vision_intermediate=3420,
        max_position_embeddings=128_000, vocab_size=151_936, tie_embeddings=True),
}


def _sizes(family: str, overrides: dict[str, Any], shape: str = "tiny") -> TinySizes:
    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; choose one of {', '.join(SHAPES)}")
    known = {f.name for f in dataclasses.fields(TinySizes)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown tiny-model size {unknown[0]!r}; "
                        f"valid: {', '.join(sorted(known))}")
    sizes = TinySizes(**{**SHAPES[shape], **overrides})
    if family != "qwen3_vl" and sizes.attention_head_dim is not None:
        raise ValueError("tiny model: attention_head_dim is a Qwen3-VL setting (Qwen2.5-VL "
                         "derives head_dim from hidden_size / num_heads)")
    if sizes.patch_size is None:
        sizes.patch_size = FAMILY_PATCH_SIZE[family]
    sizes.validate()
    return sizes


def _mrope_section(family: str, head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies into (temporal, height, width) like the real models:
    Qwen2.5-VL uses [16, 24, 24] of 64, Qwen3-VL [24, 20, 20] of 64."""
    half = head_dim // 2
    if family == "qwen2_5_vl":
        t = half // 4
        hw = (half - t) // 2
        return [half - 2 * hw, hw, hw]
    hw = half * 5 // 16
    return [half - 2 * hw, hw, hw]


def _token_ids(tokenizer: Any) -> dict[str, int]:
    names = {"image_token_id": IMAGE_PAD, "video_token_id": VIDEO_PAD,
             "vision_start_token_id": VISION_START, "vision_end_token_id": VISION_END,
             "eos": IM_END, "pad": ENDOFTEXT}
    return {key: tokenizer.convert_tokens_to_ids(tok) for key, tok in names.items()}


def _text_config(family: str, s: TinySizes, vocab: int, ids: dict[str, int]) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": "default",
                            "mrope_section": _mrope_section(family, s.head_dim)}
    if family == "qwen2_5_vl":
        rope["rope_theta"] = 1_000_000.0
    else:
        rope.update(rope_theta=5_000_000.0, mrope_interleaved=True)
    cfg: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
        num_key_value_heads=s.num_kv_heads, max_position_embeddings=s.max_position_embeddings,
        rope_parameters=rope, bos_token_id=ids["pad"], eos_token_id=ids["eos"],
        pad_token_id=ids["pad"])
    if family == "qwen3_vl":
        cfg["head_dim"] = s.head_dim  # Qwen3 stores it; Qwen2.5 derives it from hidden/heads
    return cfg


def _vision_config(family: str, s: TinySizes) -> dict[str, Any]:
    cfg: dict[str, Any] = dict(
        depth=s.vision_depth, hidden_size=s.vision_hidden, num_heads=s.vision_heads,
        intermediate_size=s.vision_intermediate, patch_size=s.patch_size,
        spatial_merge_size=s.merge_size, temporal_patch_size=s.temporal_patch_size,
        out_hidden_size=s.hidden_size)
    if family == "qwen2_5_vl":
        # Window attention except in every 8th block (7, 15, 23, 31 at the real depth 32), and
        # at least in the last one, as in the real model.
        cfg.update(window_size=112,
                   fullatt_block_indexes=list(range(7, s.vision_depth, 8)) or
                   [s.vision_depth - 1],
                   tokens_per_second=2)
    else:
        # A 16x16 learned position grid (interpolated to any frame size).
        cfg.update(num_position_embeddings=256, deepstack_visual_indexes=list(
            range(s.vision_depth - s.deepstack_levels, s.vision_depth)))
    return cfg


def _build_model(family: str, s: TinySizes, tokenizer: Any, seed: int) -> torch.nn.Module:
    ids = _token_ids(tokenizer)
    vocab = max(len(tokenizer), s.vocab_size or 0)
    vocab = -(-vocab // s.vocab_multiple) * s.vocab_multiple
    config_cls, model_cls = {
        "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
        "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration"),
    }[family]
    config = getattr(transformers, config_cls)(
        text_config=_text_config(family, s, vocab, ids),
        vision_config=_vision_config(family, s),
        image_token_id=ids["image_token_id"], video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"], tie_word_embeddings=s.tie_embeddings)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    # Qwen chat models stop on <|im_end|> and on <|endoftext|>.
    model.generation_config = transformers.GenerationConfig(
        eos_token_id=[ids["eos"], ids["pad"]], pad_token_id=ids["pad"], bos_token_id=ids["pad"])
    return model


def _build_processor(family: str, s: TinySizes, tokenizer: Any) -> Any:
    """The real Qwen image/video processors, with the tiny model's patch geometry."""
    # Local: the video/image processors import torchvision, which the text-only CPU vLLM
    # venv (tools/setup_vllm_cpu_env.sh) does not have; it imports evr1.models all the same.
    from transformers import Qwen2_5_VLProcessor, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    geometry = dict(patch_size=s.patch_size, merge_size=s.merge_size,
                    temporal_patch_size=s.temporal_patch_size)
    factor = s.patch_size * s.merge_size
    # Pixel bounds as in the released checkpoints; evr1 passes pre-resized frames anyway.
    image_size = {"shortest_edge": 4 * factor * factor, "longest_edge": 16384 * factor * factor}
    video_size = {"shortest_edge": 4 * factor * factor, "longest_edge": 768 * factor * factor}
    if family == "qwen2_5_vl":
        image = Qwen2VLImageProcessor(size=image_size, **geometry)
        video = Qwen2VLVideoProcessor(size=video_size, cap_pixels_per_frame=False, **geometry)
        return Qwen2_5_VLProcessor(image_processor=image, tokenizer=tokenizer,
                                   video_processor=video, chat_template=CHAT_TEMPLATE)
    half = [0.5, 0.5, 0.5]  # Qwen3-VL normalises to [-1, 1]
    image = Qwen2VLImageProcessor(size=image_size, image_mean=half, image_std=half, **geometry)
    video = Qwen3VLVideoProcessor(size=video_size, image_mean=half, image_std=half,
                                  cap_pixels_per_frame=False, **geometry)
    return Qwen3VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                            chat_template=CHAT_TEMPLATE)


def build_tiny_model(out_dir: str | Path, corpus: list[str], family: Family = "qwen2_5_vl",
                     seed: int = 0, *, shape: str = "tiny", dtype: str = "float32",
                     device: str = "cpu", **sizes: Any) -> Path:
    """Train a tokenizer on ``corpus``, build a random-init tiny Qwen-VL model of ``family``
    and save model + tokenizer + processor into ``out_dir``. Returns the folder.

    ``shape`` names one of :data:`SHAPES`; ``sizes`` override fields of :class:`TinySizes`
    (e.g. ``hidden_size=64``). ``dtype`` is the saved weights' dtype; ``device`` where the
    random init runs (``cuda`` initialises a 1B model in a second instead of a minute).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny-model family {family!r}; "
                         f"choose one of {', '.join(FAMILIES)}")
    s = _sizes(family, sizes, shape)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Saved in a sibling folder, then renamed into place: a folder with config.json is whole
    # (a kill mid-save leaves only the hidden staging folder), and the ranks of one job that
    # all build the same model do not write into each other's files (the first rename wins).
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        tokenizer = train_tokenizer(corpus, vocab_size=s.tokenizer_vocab)
        with torch.device(device):
            model = _build_model(family, s, tokenizer, seed)
        model = model.to(getattr(torch, dtype))
        processor = _build_processor(family, s, tokenizer)
        model.save_pretrained(staging)
        processor.save_pretrained(staging)  # also writes the tokenizer and the chat template
        try:
            staging.rename(out)  # onto a missing or empty folder
        except OSError as exc:
            if not (out / "config.json").is_file():
                raise FileExistsError(f"{out} exists and is not empty, but holds no model "
                                      "(config.json): empty it or choose another "
                                      "folder") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def corpus_from_jsonl(paths: Iterable[str | Path]) -> list[str]:
    """Tokenizer training text from sample JSONL files: each record's problem, options and
    solution (the schema of docs/architecture.md). Lines that are not JSON objects are skipped:
    a tokenizer corpus needs no validation, only text."""
    texts: list[str] = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict):
                    texts.extend(_record_text(record))
    return texts


def _record_text(record: dict[str, Any]) -> list[str]:
    texts = [str(record.get("problem") or "")]
    options = record.get("options") or []
    if isinstance(options, list):
        texts.extend(str(o) for o in options)
    solution = record.get("solution")
    if solution is not None:
        texts.append(solution if isinstance(solution, str) else json.dumps(solution))
    return [t for t in texts if t]
