"""Pre-flight check of the eval benchmarks: every prepared question, with its cached frames,
fits ``data.max_prompt_length`` and each evaluated model's context (``evr1.models.preflight``
says how prompts are counted).

    python -m evr1.eval.preflight --config C [key=value ...]

Run by ``launchers/eval.py --array`` (and the pipeline's eval stage) after --prepare and
--preprocess, before any eval task starts. Questions whose media failed in preprocessing are
not counted (the eval scores them as failed media).
"""

from __future__ import annotations

import argparse
import sys

from evr1.config import Config, load_config
from evr1.data.schema import load_samples
from evr1.eval.plan import resolve_benchmarks, resolve_models
from evr1.models.preflight import (
    Limits,
    PreflightInput,
    PreflightReport,
    TokenCounter,
    run_checks,
)
from evr1.video.shards import ShardError, ShardReader


def eval_inputs(cfg: Config) -> list[PreflightInput]:
    """Each benchmark's prepared questions and its frame cache."""
    inputs = []
    for run in resolve_benchmarks(cfg):
        if not run.prepared.is_file():
            raise FileNotFoundError(f"{run.prepared} does not exist: run python "
                                    "launchers/eval.py --config C --prepare first")
        samples = load_samples(run.prepared, check_media=False)
        needs_frames = any(s.data_type != "text" for s in samples)
        reader = ShardReader(run.shard_dir) if needs_frames else None
        inputs.append(PreflightInput(f"{run.alias} ({run.prepared})", samples, reader,
                                     cfg.data.video.fps))
    return inputs


def preflight_eval(cfg: Config) -> list[PreflightReport]:
    """One report per evaluated model; PreflightError when any question cannot run. Frames
    decoded on the fly (``eval.frames=decode``) have no cache to count from: nothing is
    checked then."""
    if cfg.eval.frames != "shards":
        return []
    inputs = eval_inputs(cfg)
    reports = []
    for model in resolve_models(cfg, pinned=True):
        counter = TokenCounter(model.path)
        limits = Limits(cfg.data.max_prompt_length, cfg.eval.max_new_tokens,
                        "eval.max_new_tokens", counter.context)
        reports.append(run_checks(counter, inputs, limits))
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Pre-flight check of the eval benchmarks: every prompt fits "
                    "data.max_prompt_length and each model's context.")
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="key.sub=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        reports = preflight_eval(cfg)
    except (ValueError, ShardError, FileNotFoundError) as exc:  # config, data, refusals
        print(exc, file=sys.stderr)
        return 1
    if not reports:
        print("pre-flight: eval.frames=decode, no frame cache to check")
    for report in reports:
        print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
