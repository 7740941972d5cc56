"""One decoding interface over two backends, and the model-ready ``Visual`` of a media file.

- ``probe(path)``: codec, frame count, fps, duration and size of a video (through PyAV, so
  every backend samples from the same frame count).
- ``decode_frames(path, indices, backend)``: RGB uint8 frames for source frame indices.
- ``load_visual(path, data_type, data_cfg)``: probe, sample frames (Qwen-VL conventions of
  ``evr1.video.sampling``), decode, resize: what the preprocessing stage stores in a shard.

Backends: ``pyav`` (FFmpeg; any codec), ``dali`` (``dali_device`` "cpu": VP8/VP9/MJPEG;
"gpu": NVDEC, H.264/HEVC/VP9/...; "auto": GPU when CUDA is visible, else CPU) and ``auto``:
DALI where it can decode the file, else PyAV; if DALI fails on a file, ``auto`` retries it with
PyAV rather than losing the sample. DALI-CPU and PyAV return identical frames; see the backend
modules for why.

Every failure a user can fix (missing, empty, truncated or corrupt file, no video stream,
unsupported codec) raises ``DecodeError`` whose message names the file and what to do.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from evr1.config import DataConfig
from evr1.video import dali_backend, pyav_backend, sampling
from evr1.video.types import Backend, DaliDevice, DecodeError, VideoInfo, Visual, check_file

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- videos


def probe(path: str | os.PathLike[str]) -> VideoInfo:
    """Stream facts of a video file; DecodeError if it cannot be read."""
    return pyav_backend.probe(os.fspath(path))


def choose_backend(codec: str, backend: Backend = "auto",
                   dali_device: DaliDevice = "auto") -> tuple[str, str | None]:
    """("pyav", None) or ("dali", "cpu" | "gpu") for a file of ``codec``."""
    if backend not in ("auto", "pyav", "dali"):
        raise ValueError(f"backend must be auto, pyav or dali, got {backend!r}")
    if dali_device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"dali_device must be auto, cpu or gpu, got {dali_device!r}")
    if backend == "pyav":
        return "pyav", None
    devices = ["gpu", "cpu"] if dali_device == "auto" else [dali_device]
    for device in devices:
        if dali_backend.can_decode(codec, device):
            return "dali", device
    if backend == "dali":  # asked for explicitly: let dali_backend explain the refusal
        return "dali", devices[-1]
    return "pyav", None


def decode_frames(path: str | os.PathLike[str], indices: list[int], backend: Backend = "auto",
                  *, dali_device: DaliDevice = "auto", info: VideoInfo | None = None,
                  size: tuple[int, int] | None = None) -> tuple[np.ndarray, str]:
    """RGB uint8 ``[len(indices), H, W, 3]`` for source frame ``indices``, and the backend name
    that produced them (``pyav``, ``dali-cpu`` or ``dali-gpu``).

    ``size`` (H, W): scale every frame to it while decoding, one frame at a time (sources over
    ``data.max_source_pixels``). Only PyAV does that: DALI returns all frames at full size in
    one tensor, so ``auto`` uses PyAV and ``dali`` refuses with a DecodeError.
    """
    path = os.fspath(path)
    info = info or probe(path)
    indices = [int(i) for i in indices]
    bad = [i for i in indices if not 0 <= i < info.num_frames]
    if bad or not indices:
        raise ValueError(f"{path}: need frame indices in [0, {info.num_frames}), got "
                         f"{bad[:5] or 'none'}")
    name, device = ("pyav", None) if size is not None and backend != "dali" else \
        choose_backend(info.codec, backend, dali_device)
    if name == "dali" and size is not None:
        raise DecodeError(path, f"the source is {info.width}x{info.height}, over "
                                "data.max_source_pixels, and DALI decodes whole frames at full "
                                "size; use backend 'auto' or 'pyav' (they scale each frame "
                                "while decoding) or raise the limit")
    if name == "dali":
        assert device is not None
        try:
            return dali_backend.decode_frames(path, indices, info.codec, device), f"dali-{device}"
        except DecodeError as exc:
            if backend == "dali":
                raise
            log.warning("%s; decoding it with PyAV instead", exc)
    return pyav_backend.decode_frames(path, indices, info, size), "pyav"


def load_video(path: str, data_cfg: DataConfig, backend: Backend = "auto",
               dali_device: DaliDevice = "auto") -> Visual:
    """A source over ``data_cfg.max_source_pixels`` is scaled to the model's frame size while
    each frame is decoded (peak memory: the codec's own frames plus small output frames,
    docs/performance.md); a smaller one is decoded at full size and resized as a batch."""
    info = probe(path)
    budget = data_cfg.video
    tp = data_cfg.temporal_patch_size
    indices = sampling.sample_frame_indices(info.num_frames, info.fps, budget, tp)

    def target(height: int, width: int) -> tuple[int, int]:
        return _checked(path, lambda: sampling.video_frame_size(
            height, width, len(indices), budget, data_cfg.resize_factor, tp))

    scale_to = None
    if info.width * info.height > data_cfg.max_source_pixels:
        scale_to = target(info.height, info.width)
        log.info("%s: %dx%d is over data.max_source_pixels=%d: scaling each frame to %dx%d "
                 "while decoding", path, info.width, info.height, data_cfg.max_source_pixels,
                 scale_to[1], scale_to[0])
    frames, used = decode_frames(path, indices, backend, dali_device=dali_device, info=info,
                                 size=scale_to)
    height, width = frames.shape[1:3] if scale_to is None else (info.height, info.width)
    size = scale_to or target(height, width)
    return Visual(frames=sampling.resize_frames(frames, size), indices=indices,
                  timestamps_s=[i / info.fps for i in indices], source_fps=info.fps,
                  source_num_frames=info.num_frames, source_size=(height, width), backend=used)


# --------------------------------------------------------------------------- images


def read_image(path: str, max_pixels: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """RGB uint8 ``[H, W, 3]`` of an image file, and the file's own (height, width).

    Transparency is flattened onto white (as the Qwen-VL utilities do), so a transparent
    background does not turn black. An image over ``max_pixels`` is read at the JPEG decoder's
    1/2, 1/4 or 1/8 scale (never held at full size) when that brings it under, else refused
    with a DecodeError: other formats cannot be decoded smaller than they are.
    """
    check_file(path)
    try:
        with Image.open(path) as img:
            source = (img.height, img.width)
            if max_pixels is not None and img.width * img.height > max_pixels:
                _read_reduced(img, max_pixels, path)
            img.load()
            if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                rgba = img.convert("RGBA")
                flat = Image.new("RGB", rgba.size, (255, 255, 255))
                flat.paste(rgba, mask=rgba.getchannel("A"))
                return np.asarray(flat, dtype=np.uint8), source
            return np.asarray(img.convert("RGB"), dtype=np.uint8), source
    except Image.DecompressionBombError as exc:  # PIL's own cap (~179 MP), before ours
        raise DecodeError(path, f"image too large to decode ({exc}); downscale the file") \
            from exc
    except UnidentifiedImageError as exc:
        raise DecodeError(path, "not a readable image (unknown format or corrupt)") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # PIL reports truncation as OSError
        raise DecodeError(path, f"corrupt or truncated image ({exc}); fetch it again") from exc


def _read_reduced(img, max_pixels: int, path: str) -> None:
    """Make ``img`` (opened, not loaded) decode at the first JPEG scale under ``max_pixels``."""
    width, height = img.size
    for k in (2, 4, 8):
        if -(-width // k) * -(-height // k) <= max_pixels:
            # draft() returns the configured scale for JPEG, and None for formats without one.
            if img.draft("RGB", (-(-width // k), -(-height // k))) is not None and \
                    img.width * img.height <= max_pixels:
                return
            break
    raise DecodeError(path, f"image of {width}x{height} = {width * height} pixels is over "
                            f"data.max_source_pixels={max_pixels} and its format cannot be "
                            "decoded at a smaller scale; downscale the file or raise the limit")


def load_image(path: str, data_cfg: DataConfig) -> Visual:
    rgb, (height, width) = read_image(path, data_cfg.max_source_pixels)
    size = _checked(path, lambda: sampling.image_size(height, width, data_cfg.image,
                                                      data_cfg.resize_factor))
    return Visual(frames=sampling.resize_frames(rgb[None], size), indices=[0],
                  timestamps_s=[0.0], source_fps=0.0, source_num_frames=1,
                  source_size=(height, width), backend="pil")


# --------------------------------------------------------------------------- entry point


def load_visual(path: str | os.PathLike[str], data_type: str, data_cfg: DataConfig,
                backend: Backend = "auto", dali_device: DaliDevice = "auto") -> Visual:
    """Decode, sample and resize one media file under ``data_cfg``'s budget for its type."""
    path = os.fspath(path)
    if data_type == "video":
        return load_video(path, data_cfg, backend, dali_device)
    if data_type == "image":
        return load_image(path, data_cfg)
    raise ValueError(f"{path}: data_type {data_type!r} has no media to load "
                     "(expected 'video' or 'image')")


def _checked(path: str, compute: Callable[[], tuple[int, int]]) -> tuple[int, int]:
    """Run a size computation, reporting an unusable geometry as a DecodeError."""
    try:
        return compute()
    except ValueError as exc:
        raise DecodeError(path, str(exc)) from exc
