"""Per-step metrics to stdout, a JSONL file and wandb (offline by default)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("evr1.train")

# What the one-line stdout summary shows; everything goes to the JSONL file and wandb.
_STDOUT_KEYS = ("reward", "accuracy", "format", "response_len", "grad_norm", "clip_frac_high",
                "entropy_mean", "offline_groups", "tokens_per_s", "time_step")


class MetricsLogger:
    def __init__(self, run_dir: Path, wandb_mode: str = "offline", project: str = "evr1",
                 config: dict[str, Any] | None = None, enabled: bool = True) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled  # False on every rank but the first of a distributed run
        self._wandb = None
        if wandb_mode != "disabled" and enabled:
            self._wandb = _start_wandb(run_dir, wandb_mode, project, config)

    def log(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self._wandb is not None:
            self._wandb.log({f"{kind}/{k}": v for k, v in metrics.items()
                             if isinstance(v, (int, float))}, step=step)
        shown = [f"{k} {metrics[k]:.3g}" for k in _STDOUT_KEYS if k in metrics]
        if kind != "train":
            shown = [f"{k} {v:.3g}" for k, v in metrics.items() if isinstance(v, (int, float))]
        print(f"[{kind} step {step}] " + ", ".join(shown), flush=True)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(run_dir: Path, mode: str, project: str, config: dict[str, Any] | None):
    try:
        import wandb
    except ImportError:
        log.warning("wandb is not installed: metrics go to %s only", run_dir / "metrics.jsonl")
        return None
    return wandb.init(project=project, dir=str(run_dir), mode=mode, config=config or {},
                      name=run_dir.name, resume="allow")


def read_metrics(run_dir: Path, kind: str | None = None) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if kind is None or r["kind"] == kind]
