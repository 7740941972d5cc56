"""Qwen-VL model and processor loading, prompt encoding, and the tiny-model factory."""

from evr1.models.inputs import build_prompt_messages, encode, vision_token_ids
from evr1.models.loading import ModelLoadError, load_model, load_processor, read_model_type
from evr1.models.tiny import TinySizes, build_tiny_model, corpus_from_jsonl

__all__ = [
    "ModelLoadError",
    "TinySizes",
    "build_prompt_messages",
    "build_tiny_model",
    "corpus_from_jsonl",
    "encode",
    "load_model",
    "load_processor",
    "read_model_type",
    "vision_token_ids",
]
