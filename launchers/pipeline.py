"""The whole pipeline for one config: (synthetic data) -> preprocess array -> ...

    python launchers/pipeline.py --config configs/demo_cpu.yaml

Stages run in order; each is the same code its own launcher runs, and each skips work that is
already complete, so re-running the pipeline after an interruption picks up where it stopped.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from evr1.config import Config
from evr1.data.synthetic import make_synthetic
from evr1.launch import stages
from evr1.launch.cli import base_parser, load_from_args, setup_logging


def main(argv: list[str] | None = None) -> int:
    args = base_parser(__doc__.splitlines()[0]).parse_args(argv)
    setup_logging()
    cfg = load_from_args(args)
    start = time.perf_counter()
    make_synthetic_if_configured(cfg)
    print("== preprocess ==")
    status = stages.preprocess_array(cfg, wait=True)
    if status:
        return status
    print(f"pipeline done in {time.perf_counter() - start:.0f} s; shards in {cfg.shard_dir}")
    return 0


def make_synthetic_if_configured(cfg: Config) -> None:
    """The demo's data: made once, when the config names a synthetic folder that is empty."""
    if not cfg.synthetic.out_dir:
        return
    train = Path(cfg.synthetic.out_dir) / "train.jsonl"
    if train.exists():
        print(f"== synthetic data: {train.parent} exists, kept ==")
        return
    print(f"== synthetic data -> {cfg.synthetic.out_dir} ==")
    made = make_synthetic(cfg.synthetic)
    print(f"{made.num_videos} videos, {made.num_images} images; {made.num_train} train and "
          f"{made.num_heldout} held-out questions ({', '.join(made.problem_types)})")


if __name__ == "__main__":
    sys.exit(main())
