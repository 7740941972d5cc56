"""The learning check: does GRPO teach the tiny model, and is the offline slot what does it?

    OMP_NUM_THREADS=1 python tools/learning_check.py --out runs/lc          # ~20 min, 2 cores
    python tools/learning_check.py --out runs/lc --supervised-steps 300     # + a supervised run

Makes the synthetic task set (256 videos of one moving shape each: ``synthetic.distractors``
off), preprocesses it, then trains the tiny model from random init (vision tower frozen, as in
the demo config) on the colour question twice: with the expert answer in one slot of every
group (train.offline.mode=always) and without it (never). Prints held-out colour accuracy
before and after each run and writes one plot with both runs' curves.

The GRPO settings differ from the demo's (RECIPE below; every run is in docs/performance.md,
"Learning check"): groups of 2 (the expert answer + one sample) over 32 prompts, so each step
carries 32 expert answers; sampling at temperature 0.3, so the sampled answer's negative
advantage is a small push rather than noise that drowns the visual signal; Dr.GRPO advantages
(no division by the group's std, which turns a format-only difference of 0.05 into a full
+-0.7); and lr 3e-4 decaying linearly to 3e-5, so that the late phase, where nearly every group
is solved and the rare malformed sample draws large gradients after a quiet stretch, does not
undo what was learned. With the demo's 8 x 8 at temperature 1 the format is learned but not the
colour; at a constant lr 1e-3 one run in four learned it, and then lost it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from evr1.config import load_config
from evr1.data.synthetic import make_synthetic
from evr1.pipeline import stages
from evr1.train.build import trainer_from_config
from evr1.train.metrics import read_metrics
from evr1.train.plots import plot_runs
from evr1.train.sft import SFTTrainer, sft_config

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ["rollout.n=2", "train.prompts_per_step=32", "rollout.temperature=0.3",
          "train.grpo.estimator=drgrpo", "train.lr=3e-4", "train.lr_schedule=linear",
          "train.min_lr_ratio=0.1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/learning_check"))
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--ablation-steps", type=int, default=300,
                        help="steps of the run without offline trajectories (0: skip it)")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--videos", type=int, default=256)
    parser.add_argument("--lr", type=float, default=None, help="default: the recipe's 3e-4")
    parser.add_argument("--distractors", action="store_true",
                        help="static and flashing shapes beside the moving one (harder)")
    parser.add_argument("--supervised-steps", type=int, default=0,
                        help="also train a third copy on the expert answers alone (cross-entropy, "
                             "train.prompts_per_step per step): is the task learnable at all?")
    parser.add_argument("overrides", nargs="*", help="config overrides for both runs (a.b=c)")
    args = parser.parse_args()
    out = args.out
    common = [f"synthetic.out_dir={out / 'data'}", f"synthetic.num_videos={args.videos}",
              f"synthetic.distractors={str(args.distractors).lower()}",
              "synthetic.include_real_videos=false", "synthetic.include_corrupt=false",
              f"data.train_jsonl={out / 'data/train.jsonl'}",
              f"data.eval_jsonl={out / 'data/heldout.jsonl'}",
              f"preprocess.out_dir={out / 'shards'}", f"model.path={out / 'tiny_model'}",
              f"train.eval_every={args.eval_every}", "train.wandb_mode=disabled",
              "launch.cluster=local", *RECIPE, *([f"train.lr={args.lr}"] if args.lr else []),
              *args.overrides]
    base = load_config(ROOT / "configs/demo_cpu.yaml", [f"run_dir={out}", *common])
    if not (out / "data/train.jsonl").exists():
        make_synthetic(base.synthetic, progress=False)
    if stages.preprocess_sequential(base):
        raise SystemExit("preprocessing failed")
    runs: dict[str, Path] = {}  # plot label -> run folder
    for mode, steps in (("always", args.steps), ("never", args.ablation_steps)):
        if not steps:
            continue
        cfg = load_config(ROOT / "configs/demo_cpu.yaml", [
            f"run_dir={out / f'offline_{mode}'}", *common, f"train.steps={steps}",
            f"train.save_every={steps}", f"train.offline.mode={mode}"])
        trainer_from_config(cfg).run()  # resumes (or just reports) a run an earlier call made
        runs[f"offline {mode}"] = Path(cfg.run_dir)
    if args.supervised_steps:
        # cold-start SFT (evr1.train.sft) on the expert answers, in <out>/supervised/sft
        cfg = sft_config(load_config(ROOT / "configs/demo_cpu.yaml", [
            f"run_dir={out / 'supervised'}", *common, "train.sft.enabled=true",
            f"train.sft.steps={args.supervised_steps}"]))
        trainer_from_config(cfg, SFTTrainer).run()
        runs["supervised"] = Path(cfg.run_dir)
    png = plot_runs(runs, out / "learning_check.png", task="colour")
    results = {label.removeprefix("offline "): heldout_summary(run_dir)
               for label, run_dir in runs.items()}
    (out / "learning_check.json").write_text(json.dumps(results, indent=1) + "\n")
    for mode, r in results.items():
        print(f"{mode:<10} {r['steps']:>4} steps: held-out colour accuracy "
              f"{r['before']:.2f} -> {r['after']:.2f}")
    print(f"plot: {png}")


def heldout_summary(run_dir: Path) -> dict:
    """Steps and held-out colour accuracy before and after, from the run's metrics.jsonl."""
    rows = read_metrics(run_dir, "heldout")
    return {"steps": rows[-1]["step"], "before": rows[0].get("accuracy/colour"),
            "after": rows[-1].get("accuracy/colour")}


if __name__ == "__main__":
    main()
