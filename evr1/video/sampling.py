"""Qwen-VL vision input conventions: which frames to take and what size to give them.

These follow the conventions of the Qwen-VL processors (qwen-vl-utils / transformers), written
here from their description so the preprocessing stage can apply them once, offline:

- frames are sampled at a target fps, the count clamped to ``[min_frames, max_frames]`` and to
  the clip length, then rounded down to a multiple of the temporal patch (2 for Qwen2.5-VL and
  Qwen3-VL), and spread over the clip by ``linspace`` with indices rounded to the nearest frame;
- each frame is resized so that H and W are multiples of ``patch_size * merge_size`` (28 for
  Qwen2.5-VL, 32 for Qwen3-VL) and ``min_pixels <= H * W <= max_pixels``, keeping the aspect
  ratio as closely as the grid allows; an optional per-video ``total_pixels`` budget lowers the
  per-frame maximum for long clips.

Rounding ties use numpy's round-half-to-even, as Python's ``round`` and ``torch.round`` do.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as tvf

from evr1.config import VisionBudget

# Qwen-VL refuses extreme panoramas: the patch grid would be one token thick.
MAX_ASPECT_RATIO = 200


# --------------------------------------------------------------------------- sizes


def _round_to(value: float, factor: int) -> int:
    return round(value / factor) * factor


def _floor_to(value: float, factor: int) -> int:
    return math.floor(value / factor) * factor


def _ceil_to(value: float, factor: int) -> int:
    return math.ceil(value / factor) * factor


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: float = 56 * 56,
                 max_pixels: float = 28 * 28 * 1280) -> tuple[int, int]:
    """Return (H, W): multiples of ``factor`` with about ``min_pixels <= H*W <= max_pixels``,
    aspect ratio kept as closely as the grid allows.

    Each side is first rounded to the nearest multiple of ``factor``; if the area is then out
    of range, both sides are scaled by one common factor, then floored (shrinking) or ceiled
    (growing) to the grid. As in Qwen-VL, ``max_pixels`` is a hard cap but a shrunk size may
    fall slightly under ``min_pixels`` when the range is narrower than one grid step.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio of {height}x{width} is over {MAX_ASPECT_RATIO}: "
                         "crop or pad the media before using it")
    h = max(factor, _round_to(height, factor))
    w = max(factor, _round_to(width, factor))
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, _floor_to(height / scale, factor))
        w = max(factor, _floor_to(width / scale, factor))
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = _ceil_to(height * scale, factor)
        w = _ceil_to(width * scale, factor)
    return h, w


def image_size(height: int, width: int, budget: VisionBudget, factor: int) -> tuple[int, int]:
    """Target (H, W) of one image under the image budget."""
    return smart_resize(height, width, factor, budget.min_pixels, budget.max_pixels)


def video_max_pixels(num_frames: int, budget: VisionBudget, temporal_patch: int) -> float:
    """Per-frame pixel cap: ``max_pixels``, lowered by ``total_pixels`` spread over the clip.

    The total budget counts one frame per temporal patch (frames of a patch share tokens), and
    the cap never drops below ``min_pixels * 1.05`` so a long clip still gets legible frames.
    """
    if budget.total_pixels is None:
        return float(budget.max_pixels)
    per_frame = budget.total_pixels / max(num_frames, 1) * temporal_patch
    return max(min(budget.max_pixels, per_frame), int(budget.min_pixels * 1.05))


def video_frame_size(height: int, width: int, num_frames: int, budget: VisionBudget,
                     factor: int, temporal_patch: int) -> tuple[int, int]:
    """Target (H, W) of every frame of a clip of ``num_frames`` sampled frames."""
    cap = video_max_pixels(num_frames, budget, temporal_patch)
    return smart_resize(height, width, factor, budget.min_pixels, cap)


# --------------------------------------------------------------------------- frames


def num_sampled_frames(num_frames: int, video_fps: float, budget: VisionBudget,
                       temporal_patch: int) -> int:
    """How many frames to take from a clip of ``num_frames`` at ``video_fps``."""
    if num_frames < 1:
        raise ValueError(f"clip has no frames (num_frames={num_frames})")
    if not video_fps > 0:
        raise ValueError(f"clip frame rate must be > 0, got {video_fps}")
    if temporal_patch < 1:
        raise ValueError(f"temporal_patch must be >= 1, got {temporal_patch}")
    wanted = round(num_frames / video_fps * budget.fps)
    wanted = min(max(wanted, budget.min_frames), budget.max_frames, num_frames)
    # At least one temporal patch, even when the clip is shorter than that.
    return max(temporal_patch, wanted // temporal_patch * temporal_patch)


def sample_frame_indices(num_frames: int, video_fps: float, budget: VisionBudget,
                         temporal_patch: int) -> list[int]:
    """Source frame indices to decode: evenly spread, a multiple of ``temporal_patch`` long.

    A clip shorter than one temporal patch repeats its last frame to fill the patch.
    """
    count = num_sampled_frames(num_frames, video_fps, budget, temporal_patch)
    if num_frames < count:
        return list(range(num_frames)) + [num_frames - 1] * (count - num_frames)
    return [int(i) for i in np.round(np.linspace(0, num_frames - 1, count))]


# --------------------------------------------------------------------------- resizing


def resize_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize uint8 frames ``[T, H, W, 3]`` to ``size = (H', W')``, returning uint8.

    Bicubic with antialiasing (torchvision's ``resize`` on a uint8 tensor, which rounds and
    clamps back to uint8): the interpolation the Qwen-VL video utilities use, so a model sees
    the same pixels whether frames come from this cache or from its own processor. Antialias
    matters when shrinking (720p to ~500x280): without it fine texture aliases into moire.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} "
                         f"{list(frames.shape)}")
    height, width = size
    if frames.shape[1:3] == (height, width):
        return frames
    if not frames.flags.writeable:  # torch refuses to wrap read-only memory without a copy
        frames = frames.copy()
    tensor = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    out = tvf.resize(tensor, [height, width], interpolation=InterpolationMode.BICUBIC,
                     antialias=True)
    return np.ascontiguousarray(out.permute(0, 2, 3, 1).numpy())
