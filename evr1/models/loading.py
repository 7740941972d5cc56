"""Load Qwen-VL models and processors from local Hugging Face folders.

Real checkpoints (Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE) and the tiny models of
``evr1.models.tiny`` go through the same code. A wrong path is caught here, before a cluster
job spends its time importing and allocating, with a message that says what was found.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoProcessor

from evr1.config import Config
from evr1.models.tiny import build_tiny_model, corpus_from_jsonl

log = logging.getLogger("evr1.models")

# model_type in config.json -> transformers class that loads it.
MODEL_CLASSES: dict[str, str] = {
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
}


class ModelLoadError(ValueError):
    """A model folder is missing, unreadable, or not a supported Qwen-VL model."""


def read_model_type(path: str | Path) -> str:
    """The ``model_type`` of a Qwen-VL folder; raises :class:`ModelLoadError` otherwise."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist (or is not a folder)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        found = ", ".join(sorted(p.name for p in folder.iterdir())[:10]) or "nothing"
        raise ModelLoadError(f"{folder} has no config.json, so it is not a Hugging Face model "
                             f"folder (found: {found})")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {config_file}: {exc}") from exc
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in MODEL_CLASSES:
        architectures = config.get("architectures") if isinstance(config, dict) else None
        raise ModelLoadError(
            f"{folder} is not a Qwen-VL model: config.json has model_type={model_type!r}, "
            f"architectures={architectures!r}; supported model types: "
            f"{', '.join(MODEL_CLASSES)}")
    return model_type


def _torch_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ModelLoadError(f"unknown dtype {dtype!r}; use e.g. 'bfloat16', 'float32' or 'auto'")
    return resolved


def resolve_device(device: str, where: str = "device") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; an explicit ``cuda`` (or
    ``cuda:N``) without a visible GPU is an error naming ``where`` (the config field), raised
    before anything is loaded, rather than a fall-back that would run a GPU recipe on CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.split(":")[0] == "cuda" and not torch.cuda.is_available():
        hidden = os.environ.get("CUDA_VISIBLE_DEVICES") == ""
        raise ModelLoadError(
            f"{where}={device} but torch sees no CUDA device (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda})"
            + ("; CUDA_VISIBLE_DEVICES is empty: a job started without GPUs (set "
               "launch.gpus_per_node)" if hidden else "") + f"; or use {where}=auto or cpu")
    return device


def load_model(path: str | Path, dtype: torch.dtype | str = "auto",
               device: str | torch.device = "cpu", *,
               attn_implementation: str | None = None) -> torch.nn.Module:
    """Load a Qwen-VL ``...ForConditionalGeneration`` from a local folder onto ``device``.

    ``dtype`` is a torch dtype, its name ('bfloat16') or 'auto' (the dtype saved in the folder).
    """
    model_type = read_model_type(path)
    model_cls = getattr(transformers, MODEL_CLASSES[model_type])
    kwargs: dict[str, Any] = {"dtype": _torch_dtype(dtype), "device_map": str(device)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    return model_cls.from_pretrained(str(Path(path).expanduser()), **kwargs)


def load_processor(path: str | Path) -> Any:
    """Load the processor (tokenizer + image and video processors) of a Qwen-VL folder."""
    read_model_type(path)
    try:
        processor = AutoProcessor.from_pretrained(str(Path(path).expanduser()))
    except ImportError as exc:
        raise ModelLoadError(f"cannot load the processor of {path}: {exc}. The Qwen-VL video "
                             "processors need torchvision built for the installed torch") from exc
    missing = [name for name in ("tokenizer", "image_processor", "video_processor")
               if getattr(processor, name, None) is None]
    if missing:
        raise ModelLoadError(f"the processor in {path} ({type(processor).__name__}) has no "
                             f"{', '.join(missing)}; a Qwen-VL folder needs all three")
    return processor


def ensure_model(cfg: Config) -> Path:
    """The model folder; with ``model.tiny`` a random-init tiny model is built once."""
    path = cfg.model_path
    if (path / "config.json").exists():
        return path
    if not cfg.model.tiny:
        raise FileNotFoundError(f"model.path {path} has no config.json (set model.tiny=true "
                                "to build a tiny random-init model there)")
    corpus = corpus_from_jsonl([p for p in (cfg.data.train_jsonl, cfg.data.eval_jsonl) if p])
    log.info("building a tiny %s model in %s", cfg.model.family, path)
    return build_tiny_model(path, corpus, family=cfg.model.family, seed=cfg.seed)
