"""Per-step metrics to stdout, a JSONL file and wandb (offline by default).

Every JSONL record has ``step``, ``kind`` and ``time`` (Unix seconds when it was logged).
Checkpoint evaluations (``kind: checkpoint_eval``) arrive while training has moved on: their
``step`` is the checkpoint's, ``logged_at_step`` the training step when they came in. In wandb
they are plotted against their own axis ``checkpoint_eval/step`` (``define_metric``) and ride
in the row of the current training step, one evaluation per row (wandb rows only go forward).

A resumed run redoes the steps after its checkpoint: ``rewind_logs`` first moves the rows it
will log again (and those of a branch left behind) out of ``metrics.jsonl`` and
``completions.jsonl``, so each step has its rows once.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from pathlib import Path
from typing import Any

from evr1 import runs
from evr1.files import atomic_write_bytes

log = logging.getLogger("evr1.train")

# What the one-line stdout summary shows; everything goes to the JSONL file and wandb.
_STDOUT_KEYS = ("reward", "accuracy", "format", "response_len", "grad_norm", "clip_frac_high",
                "entropy_mean", "offline_groups", "tokens_per_s", "time_step")


class MetricsLogger:
    def __init__(self, run_dir: Path, wandb_mode: str = "offline", project: str = "evr1",
                 config: dict[str, Any] | None = None, enabled: bool = True) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / runs.METRICS
        self.completions_path = run_dir / runs.COMPLETIONS  # sampled texts, see below
        self.enabled = enabled  # False on every rank but the first of a distributed run
        self.last_step = 0  # the newest training step logged
        self._wandb = None
        self._eval_rows: deque[dict[str, Any]] = deque()  # checkpoint evals waiting for a row
        self._eval_row_step = -1  # the wandb row that already carries one
        if wandb_mode != "disabled" and enabled:
            self._wandb = _start_wandb(run_dir, wandb_mode, project, config)
            if self._wandb is not None:
                self._wandb.define_metric("checkpoint_eval/step")
                self._wandb.define_metric("checkpoint_eval/*", step_metric="checkpoint_eval/step")

    def _write(self, record: dict[str, Any], path: Path | None = None) -> None:
        with open(path or self.path, "a") as f:
            f.write(json.dumps({**record, "time": round(time.time(), 3)}, sort_keys=True) + "\n")

    def log_completions(self, step: int, groups: list[dict[str, Any]]) -> None:
        """A few groups' sampled responses with their rewards and advantages, one JSONL record
        per group in ``completions.jsonl``: what the numbers in metrics.jsonl were made of."""
        if not self.enabled:
            return
        for group in groups:
            self._write({"step": step, **group}, self.completions_path)

    def log(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
        if not self.enabled:
            return
        self.last_step = max(self.last_step, step)
        self._write({"step": step, "kind": kind, **metrics})
        if self._wandb is not None:
            self._wandb.log({f"{kind}/{k}": v for k, v in metrics.items()
                             if isinstance(v, (int, float))}, step=step)
            self._flush_eval_row(step)
        shown = [f"{k} {metrics[k]:.3g}" for k in _STDOUT_KEYS if k in metrics]
        if kind != "train":
            shown = [f"{k} {v:.3g}" for k, v in metrics.items() if isinstance(v, (int, float))]
        print(f"[{kind} step {step}] " + ", ".join(shown), flush=True)

    def log_checkpoint_eval(self, checkpoint_step: int, metrics: dict[str, Any]) -> None:
        """A checkpoint's evaluation, keyed by the checkpoint's step, logged whenever it ends."""
        if not self.enabled:
            return
        self._write({"step": checkpoint_step, "kind": "checkpoint_eval",
                     "logged_at_step": self.last_step, **metrics})
        shown = [f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                 for k, v in metrics.items() if k not in ("error",)]
        print(f"[checkpoint_eval step {checkpoint_step}, at training step {self.last_step}] "
              + ", ".join(shown), flush=True)
        if self._wandb is not None:
            self._eval_rows.append({"checkpoint_eval/step": checkpoint_step, **{
                f"checkpoint_eval/{k}": v for k, v in metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}})
            self._flush_eval_row(self.last_step)

    def _flush_eval_row(self, step: int) -> None:
        if self._eval_rows and step > self._eval_row_step:
            self._wandb.log(self._eval_rows.popleft(), step=step)
            self._eval_row_step = step

    def close(self) -> None:
        if self._wandb is not None:
            step = max(self.last_step, self._eval_row_step)
            while self._eval_rows:  # after the last training step: one new row each
                step += 1
                self._flush_eval_row(step)
            self._wandb.finish()


def _start_wandb(run_dir: Path, mode: str, project: str, config: dict[str, Any] | None):
    try:
        # optional dependency: only with train.wandb_mode != disabled
        import wandb
    except ImportError:
        log.warning("wandb is not installed: metrics go to %s only", run_dir / runs.METRICS)
        return None
    return wandb.init(project=project, dir=str(run_dir), mode=mode, config=config or {},
                      name=run_dir.name, resume="allow")


def read_metrics(run_dir: Path, kind: str | None = None) -> list[dict[str, Any]]:
    path = run_dir / runs.METRICS
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if kind is None or r["kind"] == kind]


def rewind_logs(run_dir: Path, step: int, archive: Path) -> int:
    """Keep only the rows of ``metrics.jsonl`` and ``completions.jsonl`` up to ``step`` (the
    step a run resumes from; 0: a fresh start keeps none, the step-0 evaluation is redone);
    the others are moved to the same file names under ``archive`` (created when needed).
    Returns how many rows were moved.

    Each file is rewritten atomically after its moved rows are safe in the archive, so a kill
    leaves either the old file or the new one (at worst a row both there and archived). A
    row that is not a JSON object with a numeric ``step`` (a torn last line) is dropped.
    """
    moved = 0
    for name in (runs.METRICS, runs.COMPLETIONS):
        path = run_dir / name
        if not path.exists():
            continue
        kept, gone = [], []
        for line in path.read_text().splitlines(keepends=True):
            row = _row(line)
            if row is None:
                continue
            (kept if step > 0 and row["step"] <= step else gone).append(
                line if line.endswith("\n") else line + "\n")
        if gone:
            atomic_write_bytes(archive / name, "".join(gone).encode())
            atomic_write_bytes(path, "".join(kept).encode())
            moved += len(gone)
    return moved


def _row(line: str) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    ok = isinstance(row, dict) and isinstance(row.get("step"), (int, float))
    return row if ok else None
