"""Train: GRPO on the preprocessed shards.

    python launchers/train.py --config configs/demo_cpu.yaml            # in this process
    python launchers/train.py --config C --submit                       # one submitit job
    python launchers/train.py --config C train.steps=20 train.resume=never

Resumes from the newest complete checkpoint in <run_dir>/checkpoints (train.resume=auto).
"""

from __future__ import annotations

import sys

from evr1.launch.cli import base_parser, load_from_args, setup_logging
from evr1.launch.stages import train_job


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--submit", action="store_true",
                        help="run as a submitit job (Slurm when present, else local)")
    args = parser.parse_args(argv)
    setup_logging()
    cfg = load_from_args(args)
    return train_job(cfg, submit=args.submit)


if __name__ == "__main__":
    sys.exit(main())
