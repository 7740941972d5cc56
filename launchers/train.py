"""Train: GRPO on the preprocessed shards.

    python launchers/train.py --config configs/demo_cpu.yaml            # in this process
    python launchers/train.py --config C --submit                       # one submitit job
    python launchers/train.py --config C --slurm launch.nodes=2 launch.tasks_per_node=4 \
        launch.gpus_per_node=4 train.backend=megatron ...        # one multi-node Slurm job
    python launchers/train.py --config C train.steps=20 train.resume=never

Resumes from the newest complete checkpoint in <run_dir>/checkpoints (train.resume=auto).
A stop signal (SIGTERM; SIGUSR1 outside Slurm) checkpoints after the current step and exits
with status 3; the same command then resumes.
``--slurm`` submits through submitit's SlurmExecutor and waits: launch.nodes x
launch.tasks_per_node ranks (one per GPU), each started by srun, which find each other from the
SLURM_* variables (evr1.pipeline.rendezvous; the same rules as slurm/train_8node.sh).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from evr1.cli.launcher import run_launcher
from evr1.config import Config
from evr1.pipeline.stages import check_data
from evr1.pipeline.training import train_and_wait


def main(argv: list[str] | None = None) -> int:
    return run_launcher(__doc__.splitlines()[0], add_arguments, run, argv)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--submit", action="store_true",
                        help="run as a submitit job (Slurm when present, else local)")
    parser.add_argument("--slurm", action="store_true",
                        help="run as one Slurm job of launch.nodes x launch.tasks_per_node "
                             "ranks (submitit); an error without Slurm")


def run(cfg: Config, args: argparse.Namespace) -> int:
    if args.slurm:
        cfg = dataclasses.replace(cfg, launch=dataclasses.replace(cfg.launch, cluster="slurm"))
    check_data(cfg, "train")  # before a job is submitted or a model built
    return train_and_wait(cfg, submit=args.submit or args.slurm)


if __name__ == "__main__":
    sys.exit(main())
