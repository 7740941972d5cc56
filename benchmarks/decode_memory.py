"""Peak memory of decoding one oversized video, with and without ``data.max_source_pixels``.

Makes an 8192x4320 H.264 clip (``--frames`` frames at 8 fps, a moving gradient, libx264
ultrafast) with PyAV, then loads it the way the preprocessing stage does
(``evr1.video.decode.load_visual`` under the default video budget, sampling ``--frames``
frames) in a fresh child process per setting, and reports the child's resident memory before
the call and its peak during the call (``VmHWM`` after resetting it through
``/proc/self/clear_refs``, so the imports' own peak does not hide the decode's), and the wall
time. Settings: no limit (``max_source_pixels`` above the clip: every sampled frame is
converted to full-size RGB, stacked, then resized) and the default limit (8K UHD, 7680x4320:
the clip is over it, so PyAV scales each frame to the model's size while converting it).

    python benchmarks/decode_memory.py [--frames 16] [--width 8192 --height 4320]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
from evr1.config import DataConfig
from evr1.video.decode import load_visual
import evr1.video.pyav_backend  # imported before the measurement in every child
import torchvision.transforms.functional  # noqa: F401  (resize_frames imports it on first use)


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB -> MiB


limit = {limit!r}
cfg = DataConfig()
if hasattr(cfg, "max_source_pixels"):  # a checkout from before the limit (--root) has none
    cfg.max_source_pixels = limit
cfg.video.min_frames = cfg.video.max_frames = {frames}
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS: the imports' peak is not ours
t0 = time.perf_counter()
visual = load_visual({path!r}, "video", cfg, backend="pyav")
print(json.dumps({{"shape": list(visual.frames.shape), "seconds": time.perf_counter() - t0,
                  "before_mib": before, "peak_mib": status("VmHWM")}}))
"""

def make_clip(path: Path, width: int, height: int, frames: int) -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "28"}
        stream.time_base = Fraction(1, 8)
        x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
        y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
        for i in range(frames):
            rgb = np.empty((height, width, 3), np.uint8)
            rgb[..., 0] = (x + 8 * i) % 256
            rgb[..., 1] = y
            rgb[..., 2] = (x + y + 16 * i) % 256
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def run_child(path: Path, limit: int | None, frames: int, root: Path = ROOT) -> dict:
    code = CHILD.format(root=str(root), path=str(path), limit=limit, frames=frames)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--height", type=int, default=4320)
    parser.add_argument("--root", type=Path, default=ROOT,
                        help="the evr1 checkout the children import (e.g. an older commit)")
    args = parser.parse_args()
    sys.path.insert(0, str(args.root))
    from evr1.config import DataConfig

    default_limit = getattr(DataConfig(), "max_source_pixels", None)
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "big.mp4"
        t0 = time.perf_counter()
        make_clip(clip, args.width, args.height, args.frames)
        print(f"{args.width}x{args.height} H.264, {args.frames} frames, "
              f"{clip.stat().st_size / 2**20:.1f} MiB, made in {time.perf_counter() - t0:.0f} s; "
              f"{platform.processor() or platform.machine()}, PyAV {av.__version__}")
        rows = [("no limit (max_source_pixels above the clip)", args.width * args.height + 1),
                (f"default limit ({default_limit} px)", default_limit)]
        if default_limit is None:  # a checkout without the limit: one row
            rows = rows[:1]
        print("| setting | frames out | RSS before (MiB) | peak during (MiB) | growth (MiB) | "
              "seconds |")
        print("|---|---|---|---|---|---|")
        for name, limit in rows:
            r = run_child(clip, limit, args.frames, args.root)
            print(f"| {name} | {'x'.join(map(str, r['shape']))} | {r['before_mib']:.0f} | "
                  f"{r['peak_mib']:.0f} | {r['peak_mib'] - r['before_mib']:.0f} | "
                  f"{r['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
