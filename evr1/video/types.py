"""The types every video module shares: decoder errors, stream facts, the decoded ``Visual``.

Kept apart from ``evr1.video.decode`` (the dispatcher) so that the backends
(``pyav_backend``, ``dali_backend``) and the dispatcher import them from below, not from each
other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import numpy as np

Backend = Literal["auto", "pyav", "dali"]
DaliDevice = Literal["auto", "cpu", "gpu"]


class DecodeError(RuntimeError):
    """A media file cannot be turned into frames; ``reason`` says why and what to do."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path = os.fspath(path)
        self.reason = reason


@dataclass(frozen=True)
class VideoInfo:
    codec: str  # FFmpeg codec name: h264, hevc, vp9, mjpeg, ...
    num_frames: int
    fps: float
    duration_s: float
    width: int
    height: int


@dataclass
class Visual:
    """Model-ready frames of one media file, and where they came from."""

    frames: np.ndarray  # uint8 [T, H, W, 3], resized; images have T = 1
    indices: list[int]  # source frame index of each frame
    timestamps_s: list[float]  # index / source_fps (constant frame rate); [0.0] for images
    source_fps: float  # 0.0 for images
    source_num_frames: int
    source_size: tuple[int, int]  # (height, width) before resizing
    backend: str  # pyav | dali-cpu | dali-gpu | pil


def check_file(path: str) -> None:
    """DecodeError for the failures visible before opening: missing, directory, empty."""
    if not os.path.exists(path):
        raise DecodeError(path, "file not found (check the path and data.media_root)")
    if os.path.isdir(path):
        raise DecodeError(path, "is a directory, not a media file")
    if os.path.getsize(path) == 0:
        raise DecodeError(path, "file is empty (0 bytes): the copy or download did not "
                                "finish; fetch it again")


@dataclass
class Prompt:
    """One prompt: the problem text and its (already sampled, resized) frames; what the
    rollout engines take. Here, in the media layer, so that a text-only engine environment
    (the CPU vLLM venv) imports it without h5py or the decoders."""

    sample_id: str
    problem: str
    data_type: str  # video | image | text
    frames: np.ndarray | None = None  # uint8 [T, H, W, 3]; None for text
    fps: float = 2.0  # sampling rate of the frames (video only)
