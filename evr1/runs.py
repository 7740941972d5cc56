"""The run folder: where every stage puts its files, derived in this one place.

```
<run_dir>/
  config.yaml           the config the trainer ran with (CONFIG)
  metrics.jsonl         one row per logged step, held-out eval, checkpoint eval (METRICS)
  completions.jsonl     sampled texts of the logged steps (COMPLETIONS)
  learning_curve.png    (LEARNING_CURVE)
  checkpoints/          step-N/ folders (evr1.train.checkpoint)
  shards/               preprocess output, unless preprocess.out_dir names another folder
  tiny_model/           the tiny model, unless model.path names a model
  submitit/             job logs, unless launch.log_dir names another folder
  eval/                 eval output, unless eval.out_dir names another folder
    steps/              eval-while-training: one folder per evaluated checkpoint
  curate/               curation output, unless curate.out_dir names another folder
```

The functions take the configured strings (``Config`` calls them for its path properties), so
this module imports nothing of evr1.
"""

from __future__ import annotations

from pathlib import Path

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
COMPLETIONS = "completions.jsonl"
LEARNING_CURVE = "learning_curve.png"
CHECKPOINT_EVALS = "steps"  # under the eval folder


def path(p: str) -> Path:
    """A configured path: relative to the working directory the launcher runs in."""
    return Path(p).expanduser()


def _in_run(run_dir: str, configured: str, default: str) -> Path:
    return path(configured or f"{run_dir}/{default}")


def shard_dir(run_dir: str, out_dir: str = "") -> Path:
    return _in_run(run_dir, out_dir, "shards")


def model_dir(run_dir: str, model_path: str = "") -> Path:
    return _in_run(run_dir, model_path, "tiny_model")


def checkpoint_dir(run_dir: str) -> Path:
    return _in_run(run_dir, "", "checkpoints")


def submitit_dir(run_dir: str, log_dir: str = "") -> Path:
    return _in_run(run_dir, log_dir, "submitit")


def eval_dir(run_dir: str, out_dir: str = "") -> Path:
    return _in_run(run_dir, out_dir, "eval")


def curate_dir(run_dir: str, out_dir: str = "") -> Path:
    return _in_run(run_dir, out_dir, "curate")


def checkpoint_evals_dir(eval_folder: Path) -> Path:
    """Eval-while-training's folder (one sub-folder per evaluated checkpoint)."""
    return eval_folder / CHECKPOINT_EVALS
