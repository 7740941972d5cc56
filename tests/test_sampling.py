"""Qwen-VL sampling and resizing: values worked out by hand (arithmetic in the comments)."""

from __future__ import annotations

import numpy as np
import pytest

from evr1.config import VisionBudget
from evr1.video.sampling import (
    image_size,
    num_sampled_frames,
    resize_frames,
    sample_frame_indices,
    smart_resize,
    video_frame_size,
    video_max_pixels,
)

VIDEO_MIN = 128 * 28 * 28  # 100_352, DataConfig's video default


# --------------------------------------------------------------------------- smart_resize


@pytest.mark.parametrize(("h", "w", "factor", "lo", "hi", "expected"), [
    # Already on the grid and in range: unchanged.
    (224, 224, 28, 3136, 10**7, (224, 224)),
    # In range after rounding: 100/28 = 3.57 -> 4 -> 112; 150/28 = 5.36 -> 5 -> 140.
    (100, 150, 28, 3136, 10**7, (112, 140)),
    # 720p under 262,144: 728*1288 is too big; beta = sqrt(921600/262144) = 1.875;
    # 720/1.875 = 384 -> floor to 28: 364; 1280/1.875 = 682.7 -> 672.
    (720, 1280, 28, VIDEO_MIN, 262_144, (364, 672)),
    # Qwen3-VL grid (32): same beta; 384 -> 384, 682.7 -> 672.
    (720, 1280, 32, VIDEO_MIN, 262_144, (384, 672)),
    # 1080p under the image default 1,048,576: beta = sqrt(2073600/1048576) = 1.40625;
    # 1080/beta = 768 -> 756; 1920/beta = 1365.3 -> 1344.
    (1080, 1920, 28, 3136, 1_048_576, (756, 1344)),
    # Tiny image grows to min_pixels: 10x10 -> beta = sqrt(3136/100) = 5.6 -> 56 -> 56.
    (10, 10, 28, 3136, 1_048_576, (56, 56)),
    # Aspect 200 is still allowed; the short side never goes below one factor.
    (1, 200, 28, 3136, 10**7, (28, 196)),
])
def test_smart_resize_known_values(h, w, factor, lo, hi, expected):
    assert smart_resize(h, w, factor, lo, hi) == expected


def test_smart_resize_rejects_extreme_aspect_ratio():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 201, 28, 3136, 10**7)
    with pytest.raises(ValueError, match="positive"):
        smart_resize(0, 100, 28, 3136, 10**7)


@pytest.mark.parametrize("factor", [28, 32])
def test_smart_resize_invariants_over_many_sizes(factor):
    rng = np.random.default_rng(0)
    for h, w in rng.integers(16, 4000, size=(300, 2)):
        out_h, out_w = smart_resize(int(h), int(w), factor, 3136, 262_144)
        assert out_h % factor == 0 and out_w % factor == 0
        assert out_h * out_w <= 262_144
        # aspect kept within one grid step of each side
        assert abs(out_h / out_w - h / w) <= (h / w) * (factor / out_h + factor / out_w) + 1e-9


def test_smart_resize_matches_transformers():
    qwen = pytest.importorskip("transformers.models.qwen2_vl.image_processing_qwen2_vl")
    rng = np.random.default_rng(1)
    for h, w in rng.integers(20, 3000, size=(200, 2)):
        for lo, hi in [(3136, 1_048_576), (VIDEO_MIN, 262_144)]:
            assert smart_resize(int(h), int(w), 28, lo, hi) == \
                tuple(qwen.smart_resize(int(h), int(w), 28, lo, hi))


def test_image_size_uses_the_image_budget():
    assert image_size(1080, 1920, VisionBudget(max_pixels=1_048_576), 28) == (756, 1344)


# --------------------------------------------------------------------------- frame indices


def test_indices_of_a_real_clip():
    # bigbuckbunny.mp4: 132 frames at 25 fps = 5.28 s; 5.28 * 2 = 10.56 -> 11 -> even 10;
    # linspace(0, 131, 10) step 14.56: 0, 14.6, 29.1, 43.7, 58.2, 72.8, 87.3, 101.9, 116.4, 131.
    assert sample_frame_indices(132, 25.0, VisionBudget(), 2) == \
        [0, 15, 29, 44, 58, 73, 87, 102, 116, 131]


def test_long_clip_is_capped_at_max_frames():
    # 3600 frames at 30 fps = 120 s -> 240 frames -> capped at 128; step 3599/127 = 28.34.
    indices = sample_frame_indices(3600, 30.0, VisionBudget(), 2)
    assert len(indices) == 128
    assert indices[:3] == [0, 28, 57] and indices[-1] == 3599


def test_short_clip_is_raised_to_min_frames():
    # 10 frames at 10 fps = 1 s -> 2 frames -> min_frames 4; linspace(0, 9, 4) = 0, 3, 6, 9.
    assert sample_frame_indices(10, 10.0, VisionBudget(), 2) == [0, 3, 6, 9]


def test_count_is_rounded_down_to_the_temporal_patch():
    # 7 frames at 1 fps, target 2 fps -> 14 -> clip length 7 -> even 6;
    # linspace(0, 6, 6) = 0, 1.2, 2.4, 3.6, 4.8, 6.
    assert sample_frame_indices(7, 1.0, VisionBudget(), 2) == [0, 1, 2, 4, 5, 6]
    # min_frames 5 cannot be honoured exactly with patch 2: rounded down to 4.
    assert num_sampled_frames(100, 10.0, VisionBudget(fps=0.1, min_frames=5), 2) == 4


def test_clip_shorter_than_a_patch_repeats_its_last_frame():
    assert sample_frame_indices(1, 25.0, VisionBudget(), 2) == [0, 0]
    assert sample_frame_indices(3, 25.0, VisionBudget(), 4) == [0, 1, 2, 2]


def test_counts_are_always_whole_patches_inside_the_clip():
    rng = np.random.default_rng(2)
    budget = VisionBudget(fps=1.5, min_frames=4, max_frames=32)
    for n, fps in zip(rng.integers(1, 5000, 300), rng.uniform(5, 60, 300), strict=True):
        for tp in (1, 2, 4):
            idx = sample_frame_indices(int(n), float(fps), budget, tp)
            assert len(idx) % tp == 0 and len(idx) <= max(32, tp)
            assert idx == sorted(idx) and 0 <= idx[0] and idx[-1] == n - 1


def test_bad_clip_facts_are_errors():
    with pytest.raises(ValueError, match="no frames"):
        sample_frame_indices(0, 25.0, VisionBudget(), 2)
    with pytest.raises(ValueError, match="frame rate"):
        sample_frame_indices(10, 0.0, VisionBudget(), 2)


# --------------------------------------------------------------------------- total_pixels


def test_total_pixels_lowers_the_per_frame_cap():
    # 4,000,000 / 64 frames * 2 = 125,000 per frame; 720p: beta = sqrt(921600/125000) = 2.715;
    # 720/2.715 = 265.2 -> 252; 1280/2.715 = 471.4 -> 448.
    budget = VisionBudget(min_pixels=VIDEO_MIN, total_pixels=4_000_000)
    assert video_max_pixels(64, budget, 2) == 125_000
    assert video_frame_size(720, 1280, 64, budget, 28, 2) == (252, 448)


def test_total_pixels_never_exceeds_max_pixels():
    # 20,000,000 / 64 * 2 = 625,000 > max_pixels 262,144: max_pixels wins -> as without budget.
    budget = VisionBudget(min_pixels=VIDEO_MIN, total_pixels=20_000_000)
    assert video_frame_size(720, 1280, 64, budget, 28, 2) == (364, 672)


def test_total_pixels_floor_is_min_pixels_times_1_05():
    # 1,000,000 / 128 * 2 = 15,625 < 100,352 * 1.05 = 105,369 -> cap 105,369;
    # beta = sqrt(921600/105369) = 2.958; 720/beta = 243.4 -> 224; 1280/beta = 432.8 -> 420.
    budget = VisionBudget(min_pixels=VIDEO_MIN, total_pixels=1_000_000)
    assert video_max_pixels(128, budget, 2) == 105_369
    assert video_frame_size(720, 1280, 128, budget, 28, 2) == (224, 420)


def test_without_total_pixels_the_frame_count_does_not_matter():
    budget = VisionBudget(min_pixels=VIDEO_MIN)
    assert video_frame_size(720, 1280, 4, budget, 28, 2) == \
        video_frame_size(720, 1280, 128, budget, 28, 2) == (364, 672)


# --------------------------------------------------------------------------- resize_frames


def test_resize_frames_shape_dtype_and_content():
    frames = np.zeros((2, 60, 80, 3), np.uint8)
    frames[0, :, :40] = 255  # left half white in frame 0
    frames[1, :30] = (10, 200, 30)  # top half green in frame 1
    out = resize_frames(frames, (28, 56))
    assert out.shape == (2, 28, 56, 3) and out.dtype == np.uint8
    assert out[0, :, :24].min() >= 250 and out[0, :, 32:].max() <= 5
    assert np.abs(out[1, :10].astype(int) - (10, 200, 30)).max() <= 2
    assert out[1, 18:].max() <= 2


def test_resize_frames_antialiases_when_shrinking():
    # A one-pixel checkerboard shrunk 4x must average to grey, not alias to black/white.
    checker = ((np.indices((112, 112)).sum(0) % 2) * 255).astype(np.uint8)
    frames = np.repeat(checker[None, :, :, None], 3, axis=3)
    out = resize_frames(frames, (28, 28))
    assert np.abs(out.astype(int) - 127.5).max() < 20


def test_resize_frames_same_size_is_identity_and_bad_input_is_refused():
    frames = np.random.default_rng(3).integers(0, 256, (1, 28, 28, 3), dtype=np.uint8)
    assert resize_frames(frames, (28, 28)) is frames
    with pytest.raises(ValueError, match="uint8"):
        resize_frames(frames.astype(np.float32), (56, 56))
