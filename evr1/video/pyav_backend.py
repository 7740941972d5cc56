"""PyAV (FFmpeg) backend: probe any container, decode only the frames that were asked for.

Frame numbering assumes a constant frame rate: the index of a decoded frame is
``round((pts - stream_start) * time_base * fps)`` with ``fps`` the stream's average rate. That
is exact for the constant-rate video that cameras, encoders and datasets produce; for a
variable-rate file indices are the nearest constant-rate slot, so a frame may be skipped or
repeated, which is acceptable for sampling a few frames per second. A stream whose timestamps
are missing or do not increase is decoded front to back and its frames counted instead.

Decoding cost is kept to what the wanted frames need:
- frames are visited in increasing index order; before a wanted frame far ahead of the decoder
  (``SEEK_GAP`` frames, or the longest keyframe interval seen so far, whichever is larger) the
  demuxer seeks to the keyframe at or before it instead of decoding the whole gap;
- frames that are not wanted are decoded (the codec needs them as references) but never
  converted to RGB, which is most of the per-frame cost outside the codec;
- decoding stops right after the last wanted frame.

YUV to RGB uses swscale with full chroma interpolation and accurate rounding (bilinear chroma
upsampling). DALI's CPU decoder converts with the same settings, so the two backends return
bit-identical frames for the codecs both decode; FFmpeg's default fast path (nearest chroma)
would differ by up to ~60 levels on sharp colour edges.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
from av.video.reformatter import Interpolation

from evr1.video.types import DecodeError, VideoInfo, check_file

# Below this many frames of gap, decoding through is cheaper than a seek (which restarts at a
# keyframe that may lie before the current position anyway).
SEEK_GAP = 48

RGB_CONVERSION = Interpolation.BILINEAR | Interpolation.FULL_CHR_H_INT | Interpolation.ACCURATE_RND
# Scaling an oversized source down to the model's frame size in the same pass: area averaging
# (each output pixel the mean of the source pixels it covers) does not alias at large factors.
SCALED_CONVERSION = Interpolation.AREA | Interpolation.FULL_CHR_H_INT | Interpolation.ACCURATE_RND

# When only a demuxed packet count is available, a clip whose frames cover less than this share
# of the duration its header declares is treated as cut short.
MIN_DURATION_COVERAGE = 0.9


# --------------------------------------------------------------------------- opening / probing


def open_container(path: str) -> av.container.InputContainer:
    """Open ``path`` for reading, turning every failure into a DecodeError that says why."""
    check_file(path)
    try:
        return av.open(path, mode="r")
    except av.error.InvalidDataError as exc:
        raise DecodeError(path, "not a readable video container: corrupt or truncated "
                                f"(FFmpeg: {exc.strerror}); re-download or re-encode it") from exc
    except (av.error.FFmpegError, OSError) as exc:
        raise DecodeError(path, f"cannot open: {exc}") from exc


def video_stream(container: av.container.InputContainer, path: str) -> av.video.VideoStream:
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise DecodeError(path, "no video stream in the file (streams: "
                                f"{', '.join(kinds)}); is data_type right for this sample?")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        raise DecodeError(path, f"codec {stream.codec.name!r} cannot be decoded by this FFmpeg "
                                "build; re-encode the file to H.264 or VP9")
    return stream


def stream_fps(stream: av.video.VideoStream, path: str) -> Fraction:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return Fraction(rate)
    raise DecodeError(path, "the container does not state a frame rate; re-mux it with one")


def count_packets(container: av.container.InputContainer, stream: av.video.VideoStream,
                  path: str) -> int:
    """Frames by demuxing (no decoding): one packet per displayed frame for the containers that
    leave ``stream.frames`` at 0 (Matroska/WebM; VP9 superframes pack hidden frames)."""
    try:
        count = sum(1 for packet in container.demux(stream) if packet.size)
        container.seek(0)
    except av.error.FFmpegError as exc:
        raise DecodeError(path, f"corrupt container ({exc}); re-mux or re-encode it") from exc
    return count


def probe_container(container: av.container.InputContainer, path: str) -> VideoInfo:
    stream = video_stream(container, path)
    fps = stream_fps(stream, path)
    num_frames = stream.frames
    declared_s = None
    if stream.duration is not None and stream.time_base:
        declared_s = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        declared_s = container.duration / av.time_base
    if num_frames <= 0:
        num_frames = count_packets(container, stream, path)
        _check_not_cut_short(container, path, num_frames, fps, declared_s)
    if num_frames <= 0:
        raise DecodeError(path, "the video stream holds no frames")
    duration_s = declared_s if declared_s else num_frames / float(fps)
    return VideoInfo(codec=stream.codec_context.name, num_frames=int(num_frames),
                     fps=float(fps), duration_s=duration_s, width=stream.width,
                     height=stream.height)


def _check_not_cut_short(container: av.container.InputContainer, path: str, counted: int,
                         fps: Fraction, declared_s: float | None) -> None:
    # Only trust the header duration when the video is the only stream: a longer audio track
    # also makes the container duration exceed the video's.
    if declared_s is None or len(container.streams) != 1:
        return
    expected = declared_s * float(fps)
    if counted < MIN_DURATION_COVERAGE * expected - 1:
        raise DecodeError(path, f"truncated: the header declares {declared_s:.2f} s (~"
                                f"{expected:.0f} frames) but only {counted} frames are present; "
                                "the file was cut short, fetch it again")


def probe(path: str) -> VideoInfo:
    with open_container(path) as container:
        return probe_container(container, path)


# --------------------------------------------------------------------------- decoding


@dataclass
class _Clock:
    """Maps between frame index and stream timestamps under the constant-rate assumption."""

    start: int
    time_base: Fraction
    fps: Fraction

    def index(self, pts: int) -> int:
        return round((pts - self.start) * self.time_base * self.fps)

    def pts(self, index: int) -> int:
        return self.start + round(index / self.fps / self.time_base)


def decode_frames(path: str, indices: list[int], info: VideoInfo | None = None,
                  size: tuple[int, int] | None = None) -> np.ndarray:
    """RGB uint8 ``[len(indices), H, W, 3]`` for the given source frame indices (any order,
    repeats allowed). With ``size`` (H, W) each frame is scaled to it while it is converted,
    so no full-size RGB frame is ever held (for sources over ``data.max_source_pixels``)."""
    if not indices:
        raise ValueError("no frame indices to decode")
    with open_container(path) as container:
        info = info or probe_container(container, path)
        bad = [i for i in indices if not 0 <= i < info.num_frames]
        if bad:
            raise ValueError(f"{path}: frame indices {bad[:5]} outside [0, {info.num_frames})")
        wanted = sorted(set(indices))
        frames = _Frames(container, path)
        try:
            found = dict(_SparseDecoder(frames, size).decode(wanted))
        finally:
            frames.close()
    missing = [i for i in wanted if i not in found]
    if missing:
        raise DecodeError(path, f"truncated or corrupt: frames from {missing[0]} on (of "
                                f"{info.num_frames} declared) could not be decoded")
    return np.stack([found[i] for i in indices])


class _SparseDecoder:
    """Walks a stream once, front to back, seeking over long gaps between wanted frames."""

    def __init__(self, frames: _Frames, size: tuple[int, int] | None = None) -> None:
        self.frames = frames
        self.size = size  # (H, W) to scale each converted frame to; None: the source size
        stream = frames.stream
        self.clock = _Clock(stream.start_time or 0, stream.time_base,
                            stream_fps(stream, frames.path))
        self.position = -1  # index of the last decoded frame
        self.gop = 0  # longest keyframe interval seen: a seek shorter than that lands behind us
        self.last_key: int | None = None
        self.seeked_from: int | None = None  # set until the first frame after a seek arrives
        self.seeked = False
        self.can_seek = True
        self.counting = False  # timestamps proved useless: index = frames decoded so far

    def decode(self, wanted: list[int]) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (index, rgb) for each wanted index (sorted, unique)."""
        pending = iter(wanted)
        target = next(pending)
        if target > SEEK_GAP:
            self.seek(target)
        for frame in self.frames:
            index = self.locate(frame, target)
            if index is None or index < target:
                continue  # a restart, or a frame needed only as a reference: no RGB conversion
            # index > target only where the stream has a timestamp gap (dropped frames): the
            # next frame shown is the right stand-in for the missing ones.
            rgb = self.to_rgb(frame)
            while target is not None and target <= index:
                yield target, rgb
                target = next(pending, None)
            if target is None:
                return  # stop right after the last wanted frame
            if self.can_seek and target - self.position > max(SEEK_GAP, self.gop):
                self.seek(target)

    def to_rgb(self, frame: av.VideoFrame) -> np.ndarray:
        if self.size is None:
            return frame.reformat(format="rgb24", interpolation=RGB_CONVERSION).to_ndarray()
        height, width = self.size
        return frame.reformat(width=width, height=height, format="rgb24",
                              interpolation=SCALED_CONVERSION).to_ndarray()

    def locate(self, frame: av.VideoFrame, target: int) -> int | None:
        """Index of ``frame``; None when decoding had to restart from the beginning."""
        if self.counting:
            index = self.position + 1
        elif frame.pts is None or (self.seeked_from is None and
                                   self.clock.index(frame.pts) <= self.position):
            # Missing or non-increasing timestamps: count frames instead. Where we stand after
            # an earlier seek is then unknown, so start over.
            if self.seeked:
                return self.restart(counting=True)
            self.counting, self.can_seek = True, False
            index = self.position + 1
        else:
            index = self.clock.index(frame.pts)
        if self.seeked_from is not None:
            landed_from, self.seeked_from = self.seeked_from, None
            if index > target:  # landed after the wanted frame: seeking is unreliable here
                return self.restart(counting=False)
            if index <= landed_from:  # no keyframe between here and the target: remember
                self.gop = max(self.gop, target - index)
        if frame.key_frame:
            if self.last_key is not None:
                self.gop = max(self.gop, index - self.last_key)
            self.last_key = index
        self.position = index
        return index

    def seek(self, target: int) -> None:
        self.frames.seek(self.clock.pts(target))
        self.seeked_from, self.last_key, self.seeked = self.position, None, True

    def restart(self, counting: bool) -> None:
        """Decode again from the first frame, never seeking again."""
        self.frames.reopen()
        self.counting, self.can_seek = counting, False
        self.position, self.last_key, self.seeked_from = -1, None, None
        return None


class _Frames:
    """Decoded frames of one file's video stream; can seek, or reopen the file to start over
    (a seek to 0 is not reliable in a file whose timestamps are broken). FFmpeg errors while
    decoding become DecodeError."""

    def __init__(self, container: av.container.InputContainer, path: str) -> None:
        self.path = path
        self.owned: list[av.container.InputContainer] = []
        self._use(container)

    def _use(self, container: av.container.InputContainer) -> None:
        self.container = container
        self.stream = video_stream(container, self.path)
        self.stream.codec_context.thread_type = "AUTO"  # frame + slice threads
        self._it = self._decode()

    def _decode(self) -> Iterator[av.VideoFrame]:
        try:
            yield from self.container.decode(self.stream)
        except av.error.FFmpegError as exc:
            raise DecodeError(self.path, f"corrupt video data ({exc}); re-encode the file") \
                from exc

    def __iter__(self) -> _Frames:
        return self

    def __next__(self) -> av.VideoFrame:
        return next(self._it)

    def seek(self, pts: int) -> None:
        # backward=True: land on the keyframe at or before pts, then decode forward to it.
        # PyAV flushes the decoder on seek, so no stale frames come out afterwards.
        self.container.seek(pts, backward=True, any_frame=False, stream=self.stream)
        self._it = self._decode()

    def reopen(self) -> None:
        container = open_container(self.path)
        self.owned.append(container)
        self._use(container)

    def close(self) -> None:
        for container in self.owned:
            container.close()
