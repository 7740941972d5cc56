"""The whole pipeline for one config: (synthetic data) -> preprocess -> train -> eval -> collect.

    python launchers/pipeline.py --config configs/demo_cpu.yaml
    python launchers/pipeline.py --config C --stages preprocess        # some stages only

Without Slurm the stages run one after another (submitit's local executor, then training in
this process) and the command returns when all are done. With Slurm every stage is submitted
at once, each job starting only when the one before it succeeded (``--dependency=afterok``);
the command prints the job ids and returns. A failed job cancels the ones waiting for it
(a collect job fails while a prediction shard is missing). Training runs as launch.nodes x
launch.tasks_per_node ranks (multi-node: train.backend=megatron).
Each stage skips work that is already complete, so re-running the pipeline after an
interruption picks up where it stopped.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from evr1.cli.launcher import base_parser, load_from_args, setup_logging
from evr1.config import Config
from evr1.data.schema import DatasetError
from evr1.data.synthetic import make_synthetic
from evr1.pipeline import stages, training
from evr1.pipeline.executor import dependency, resolve_cluster

STAGES = ("preprocess", "train", "eval", "collect")


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated subset of {','.join(STAGES)} (default: all)")
    args = parser.parse_args(argv)
    setup_logging()
    cfg = load_from_args(args)
    wanted = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(wanted) - set(STAGES))
    if unknown or not wanted:
        parser.error(f"--stages: unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    make_synthetic_if_configured(cfg)
    try:  # every sample file the stages read, before any of them is submitted or run
        for stage in ("preprocess", "train"):
            if stage in wanted:
                stages.check_data(cfg, stage)
    except DatasetError as exc:
        sys.exit(f"data error: {exc}")
    if resolve_cluster(cfg.launch) == "slurm":
        return submit_stages(cfg, wanted)
    return run_stages(cfg, wanted)


def run_stages(cfg: Config, wanted: list[str]) -> int:
    """Run the stages here, one after another; stop at the first that fails."""
    start = time.perf_counter()
    if "preprocess" in wanted:
        print("== preprocess ==")
        status = stages.preprocess_array(cfg, wait=True)
        if status:
            return status
    if "train" in wanted:
        print("== train ==")
        status = training.train_and_wait(cfg)
        if status:
            return status
    if "eval" in wanted:
        print("== eval ==")
        status = stages.run_evaluation(cfg, submit=True)
        if status:
            return status
    if "collect" in wanted:
        print("== collect ==")
        status = stages.collect_results(cfg)
        if status:
            return status
    print(f"pipeline done in {time.perf_counter() - start:.0f} s; shards in {cfg.shard_dir}"
          + (f", checkpoints in {cfg.checkpoint_dir}" if "train" in wanted else ""))
    return 0


def submit_stages(cfg: Config, wanted: list[str]) -> int:
    """Submit every stage to Slurm at once, chained by afterok dependencies; don't wait."""
    after: list[str] = []
    if "preprocess" in wanted:
        after = stages.submit_preprocess(cfg)
        print(f"preprocess: Slurm array, job ids {' '.join(after)}")
    if "train" in wanted:
        train_id = training.submit_training_job(cfg, after=after)
        print(f"train: Slurm job {train_id}"
              + (f" (--dependency={dependency(after)})" if after else ""))
        after = [train_id]
    if "eval" in wanted:
        after = stages.submit_eval(cfg, after=after)
        print(f"eval: Slurm array, job ids {' '.join(after)}")
    if "collect" in wanted:
        collect_id = stages.submit_collect(cfg, after=after)
        print(f"collect: Slurm job {collect_id}")
    print(f"submitted; follow with `squeue --me`; job logs in {cfg.submitit_dir}/<stage>/")
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
