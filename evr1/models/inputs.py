"""Turn prompts plus already sampled, already resized frames into Qwen-VL model inputs.

evr1 samples and resizes frames once, in preprocessing (``evr1.video``), and caches them. The
processor must therefore not touch them again: a second resize would change the pixels (and,
with a different rounding, the token count) and a second frame sampling would drop frames.
Frames are passed with ``do_resize=False`` and ``do_sample_frames=False`` and the resulting
grid is checked against the frame shape, so a silent change in the processor fails loudly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from transformers import BatchFeature

from evr1.models.tokenizer import (
    ENDOFTEXT,
    IM_END,
    IMAGE_PAD,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
)

DATA_TYPES = ("video", "image", "text")
# evr1's default sampling rate (data.video.fps); used when the caller gives no fps.
DEFAULT_VIDEO_FPS = 2.0

# Tokens a response must never contain: the training forward would look for vision features
# for them ("Video features and video tokens do not match"). <|vision_pad|> exists in the real
# Qwen tokenizers only.
_VISION_TOKENS = (IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END, "<|vision_pad|>")


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Ids that end a response: the chat turn end first, then end-of-text."""
    vocab = tokenizer.get_vocab()
    return [vocab[t] for t in (IM_END, ENDOFTEXT) if t in vocab]


def vision_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the vision placeholder tokens, to suppress at generation time."""
    # get_vocab includes added tokens; convert_tokens_to_ids would map an absent token to the
    # unk id, which for Qwen is <|endoftext|>, and suppressing that would forbid stopping.
    vocab = tokenizer.get_vocab()
    return sorted({vocab[t] for t in _VISION_TOKENS if t in vocab})


def build_prompt_messages(problem: str, data_type: str,
                          system: str | None = None) -> list[dict[str, Any]]:
    """Chat messages for one sample: the visual part (if any) first, then the problem text."""
    if data_type not in DATA_TYPES:
        raise ValueError(f"data_type must be one of {', '.join(DATA_TYPES)}, got {data_type!r}")
    content: list[dict[str, Any]] = []
    if data_type != "text":
        content.append({"type": data_type})
    content.append({"type": "text", "text": problem})
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": content})
    return messages


def _geometry(sub_processor: Any) -> tuple[int, int, int]:
    patch = int(sub_processor.patch_size)
    return patch, patch * int(sub_processor.merge_size), int(sub_processor.temporal_patch_size)


def _check_frames(i: int, frames: Any, data_type: str, factor: int, temporal: int) -> np.ndarray:
    where = f"sample {i} ({data_type})"
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        raise ValueError(f"{where}: frames must be a uint8 numpy array, got "
                         f"{type(frames).__name__} {getattr(frames, 'dtype', '')}")
    if data_type == "image" and frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{where}: frames must be [T, H, W, 3], got shape {frames.shape}")
    t, h, w, _ = frames.shape
    if h % factor or w % factor:
        raise ValueError(f"{where}: frame size {h}x{w} is not a multiple of {factor} "
                         "(patch x merge); resize in preprocessing, not here")
    if data_type == "image" and t != 1:
        raise ValueError(f"{where}: an image has one frame, got {t}")
    if data_type == "video" and t % temporal:
        raise ValueError(f"{where}: {t} frames is not a multiple of the temporal patch {temporal}")
    return frames


def _split_visuals(visuals: list[np.ndarray | None], data_types: list[str], processor: Any,
                   ) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    """Checked images ([H,W,3]) and videos ([T,H,W,3]) in batch order, plus the video rows."""
    _, image_factor, _ = _geometry(processor.image_processor)
    _, video_factor, temporal = _geometry(processor.video_processor)
    images, videos, video_rows = [], [], []
    for i, (visual, data_type) in enumerate(zip(visuals, data_types, strict=True)):
        if data_type not in DATA_TYPES:
            raise ValueError(f"sample {i}: data_type must be one of {', '.join(DATA_TYPES)}, "
                             f"got {data_type!r}")
        if data_type == "text":
            if visual is not None:
                raise ValueError(f"sample {i}: a text sample must have no frames")
        elif data_type == "image":
            images.append(_check_frames(i, visual, data_type, image_factor, temporal)[0])
        else:
            videos.append(_check_frames(i, visual, data_type, video_factor, temporal))
            video_rows.append(i)
    return images, videos, video_rows


def _video_metadata(videos: list[np.ndarray], fps: list[float]) -> list[dict[str, Any]]:
    # Every frame given is a sampled frame at the sampling rate: Qwen2.5-VL derives its
    # temporal position step (second_per_grid_ts) and Qwen3-VL its "<t seconds>" stamps from it.
    return [{"total_num_frames": len(v), "fps": float(f), "frames_indices": list(range(len(v))),
             "height": v.shape[1], "width": v.shape[2]} for v, f in zip(videos, fps, strict=True)]


def _expected_grid(frames: np.ndarray, patch: int, temporal: int) -> list[int]:
    t, h, w = frames.shape[:3]
    return [-(-t // temporal), h // patch, w // patch]


def _verify_grids(out: BatchFeature, key: str, items: list[np.ndarray], patch: int,
                  temporal: int) -> None:
    if not items:
        return
    got = out[key].tolist()
    want = [_expected_grid(x if x.ndim == 4 else x[None], patch, temporal) for x in items]
    if got != want:
        raise RuntimeError(f"processor produced {key}={got}, expected {want}: it resized or "
                           "resampled the frames although it was told not to")


def encode(processor: Any, problems: list[str], visuals: list[np.ndarray | None],
           data_types: list[str], fps: list[float] | None = None, *,
           system: str | None = None) -> BatchFeature:
    """Tokenize a batch of prompts with their frames, left-padded for generation.

    ``visuals[i]`` is uint8 ``[T, H, W, 3]`` for a video (T a multiple of the temporal patch,
    H and W multiples of patch x merge), ``[1, H, W, 3]`` or ``[H, W, 3]`` for an image, and
    None for text. ``fps`` gives each sample's sampling rate (entries of non-video samples are
    ignored); default :data:`DEFAULT_VIDEO_FPS`. Images, videos and text mix in one batch.
    """
    n = len(problems)
    if len(visuals) != n or len(data_types) != n or (fps is not None and len(fps) != n):
        raise ValueError(f"encode: got {n} problems, {len(visuals)} visuals, {len(data_types)} "
                         f"data types and {'no' if fps is None else len(fps)} fps values")
    images, videos, video_rows = _split_visuals(visuals, data_types, processor)
    rates = [DEFAULT_VIDEO_FPS if fps is None else fps[i] for i in video_rows]
    texts = [processor.apply_chat_template(build_prompt_messages(p, d, system), tokenize=False,
                                           add_generation_prompt=True)
             for p, d in zip(problems, data_types, strict=True)]
    out = processor(
        text=texts, images=images or None, videos=videos or None, return_tensors="pt",
        text_kwargs={"padding": True, "padding_side": "left"},
        images_kwargs={"do_resize": False},
        videos_kwargs={"do_resize": False, "do_sample_frames": False,
                       "cap_pixels_per_frame": False,
                       "video_metadata": _video_metadata(videos, rates) if videos else None},
    )
    out.pop("video_metadata", None)  # metadata objects are not model inputs
    image_patch, _, temporal = _geometry(processor.image_processor)
    video_patch, _, video_temporal = _geometry(processor.video_processor)
    _verify_grids(out, "image_grid_thw", images, image_patch, temporal)
    _verify_grids(out, "video_grid_thw", videos, video_patch, video_temporal)
    return out
