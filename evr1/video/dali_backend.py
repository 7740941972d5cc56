"""NVIDIA DALI backend: decode chosen frame indices on CPU (VP8/VP9/MJPEG) or GPU (NVDEC).

DALI 2.x removed software decoding of H.264/HEVC/MPEG-4 from its CPU operator, so what each
device can decode differs (see ``CPU_CODECS`` / ``GPU_CODECS``); ``evr1.video.decode`` picks
PyAV for everything else.

Frame selection uses ``fn.decoders.video(encoded, frames=...)``: the operator demuxes an
in-memory file, builds a keyframe index, and decodes only what the listed indices need (any
order, repeats allowed). Both the file bytes and the index list come in through
``fn.external_source``, so one pipeline per (device, GPU id) serves every file, resolution and
frame count: nothing is rebuilt per video or per frame. ``pad_mode="none"`` turns an index past
the end into an error instead of DALI's default of silently returning black frames.

Frame index ``i`` is the ``i``-th frame in presentation order, which equals PyAV's
timestamp-derived index for constant-frame-rate video. The CPU operator converts YUV to RGB with
swscale's accurate, chroma-interpolating path (PyAV's backend uses the same flags), so CPU
frames match PyAV's bit for bit; NVDEC frames are converted by DALI's CUDA kernel (BT.601
limited range, bilinear chroma too, its own rounding) and differ by a level or two.

The whole file is read into host memory for the operator: fine for clips up to a few GB.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any

import numpy as np

from evr1.video.types import DecodeError

CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
# NVDEC ("mixed" operator); whether AV1 works depends on the GPU generation (Ampere and later).
GPU_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mjpeg"})

# Threads of the DALI executor; a batch is one file, so more than a couple only idle.
NUM_THREADS = max(1, min(2, os.cpu_count() or 1))


@functools.lru_cache(maxsize=1)
def cuda_device_count() -> int:
    """GPUs DALI can see (0 on a machine without CUDA driver); never initialises torch."""
    try:
        # optional heavy dependency: DALI is imported only when it decodes
        from nvidia.dali import backend
        return int(backend.GetCUDADeviceCount())
    except Exception:  # no driver / library: DALI raises several kinds of errors here
        return 0


@functools.lru_cache(maxsize=1)
def installed() -> bool:
    """Whether DALI imports here. A setup.py install has it; a machine with its own image (the
    GPU test machine, where DALI's ~800 MB do not travel) may not."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def can_decode(codec: str, device: str) -> bool:
    """Whether DALI on ``device`` ("cpu" or "gpu") decodes ``codec`` (an FFmpeg codec name)."""
    if not installed():
        return False  # backend "auto" then takes PyAV
    if device == "gpu":
        return cuda_device_count() > 0 and codec in GPU_CODECS
    return codec in CPU_CODECS


class _Decoder:
    """One built pipeline: file bytes + index list in, frames out. Not re-entrant: locked."""

    def __init__(self, device: str, device_id: int | None) -> None:
        # optional heavy dependency: DALI is imported only when it decodes
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=1, num_threads=NUM_THREADS, device_id=device_id,
                      prefetch_queue_depth=1, exec_dynamic=True)
        def pipeline() -> Any:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            indices = fn.external_source(name="indices", dtype=types.INT32, ndim=1)
            if device == "gpu":
                # affine=False: don't pin DALI threads to cores; a Slurm job's cpuset may not
                # include the cores DALI would pick.
                return fn.decoders.video(encoded, device="mixed", frames=indices,
                                         pad_mode="none", affine=False)
            return fn.decoders.video(encoded, device="cpu", frames=indices, pad_mode="none")

        self.device = device
        self.pipe = pipeline()
        self.pipe.build()
        self.lock = threading.Lock()

    def decode(self, data: np.ndarray, indices: list[int]) -> np.ndarray:
        with self.lock:
            self.pipe.feed_input("encoded", [data])
            self.pipe.feed_input("indices", [np.asarray(indices, dtype=np.int32)])
            (out,) = self.pipe.run()
        if self.device == "gpu":
            out = out.as_cpu()
        return np.ascontiguousarray(np.array(out[0], dtype=np.uint8))


_decoders: dict[tuple[str, int | None, int], _Decoder] = {}
_decoders_lock = threading.Lock()


def _decoder(device: str) -> _Decoder:
    device_id = _current_gpu() if device == "gpu" else None
    # The pid is part of the key: a pipeline built before a fork is unusable in the child.
    key = (device, device_id, os.getpid())
    with _decoders_lock:
        if key not in _decoders:
            _decoders[key] = _Decoder(device, device_id)
        return _decoders[key]


def _current_gpu() -> int:
    # optional heavy dependency: DALI is imported only when it decodes
    from nvidia.dali import backend
    return int(backend.GetCUDACurrentDevice())


def _forget(decoder: _Decoder) -> None:
    # DALI marks a pipeline invalid after an operator error: build a fresh one next time.
    with _decoders_lock:
        for key, cached in list(_decoders.items()):
            if cached is decoder:
                del _decoders[key]


def decode_frames(path: str, indices: list[int], codec: str, device: str) -> np.ndarray:
    """RGB uint8 ``[len(indices), H, W, 3]`` decoded by DALI on ``device`` ("cpu" | "gpu")."""
    if device not in ("cpu", "gpu"):
        raise ValueError(f"DALI device must be 'cpu' or 'gpu', got {device!r}")
    if not installed():
        raise DecodeError(path, "NVIDIA DALI is not installed (pip install "
                                "nvidia-dali-cuda120); use backend='pyav' or 'auto'")
    if device == "gpu" and cuda_device_count() == 0:
        raise DecodeError(path, "DALI GPU decoding needs CUDA, and no GPU is visible; use "
                                "dali_device='cpu' or backend='pyav'")
    if not can_decode(codec, device):
        supported = ", ".join(sorted(GPU_CODECS if device == "gpu" else CPU_CODECS))
        raise DecodeError(path, f"DALI on {device} cannot decode {codec} (it decodes "
                                f"{supported}); use backend='pyav' or 'auto'")
    data = np.fromfile(path, dtype=np.uint8)
    decoder = _decoder(device)
    try:
        frames = decoder.decode(data, indices)
    except RuntimeError as exc:
        _forget(decoder)
        raise DecodeError(path, f"DALI ({device}) failed: {_dali_reason(exc)}") from exc
    if frames.ndim != 4 or frames.shape[0] != len(indices) or frames.shape[-1] != 3:
        raise DecodeError(path, f"DALI returned frames of shape {list(frames.shape)} for "
                                f"{len(indices)} indices")
    return frames


def _dali_reason(exc: RuntimeError) -> str:
    """The operator's own message, without DALI's pipeline-traceback preamble."""
    text = str(exc)
    tail = text.split("encountered:", 1)[-1]
    lines = [ln.strip() for ln in tail.splitlines()
             if ln.strip() and not ln.startswith(("C++ context", "Current pipeline"))]
    return " ".join(lines)[:500] or text[:500]
