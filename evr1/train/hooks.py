"""What the trainer is given from above: a checkpoint hook and a stop signal.

The training loop knows nothing of benchmarks, Slurm or job arrays. Whoever builds the trainer
(``evr1.pipeline.training.build_trainer``) hands it

- a :class:`CheckpointHook` (eval-while-training, ``evr1.eval.while_training``): told about
  every checkpoint written, polled once per step, finished after the last step;
- a :class:`StopSignals` context (Slurm preemption, ``evr1.pipeline.preemption``): asked once
  per step whether to stop; after the stopping checkpoint its ``stop(step)`` decides what
  happens to the job (requeue or just end).

Both default to doing nothing, which is what a plain ``trainer_from_config(cfg)``
(``evr1.train.build``) in a test gets.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Protocol

from evr1.train.metrics import MetricsLogger


class CheckpointHook(Protocol):
    """Called by rank 0 only."""

    @property
    def scores(self) -> Mapping[int, float]:
        """A score per checkpoint step, higher is better (``train.async_eval.keep_best``
        keeps the best of them when pruning)."""
        ...

    def on_save(self, step: int, checkpoint: Path) -> None:
        """``checkpoint`` (the folder of ``step``) is complete on disk."""
        ...

    def poll(self) -> None:
        """Once per step; must not wait."""
        ...

    def finish(self, step: int, checkpoint: Path | None, wait: bool) -> None:
        """After the last step of this run; ``checkpoint`` is the final one when training
        reached ``train.steps`` (else None), ``wait`` whether to wait for outstanding work."""
        ...


# Built once the trainer's metrics logger exists: the hook logs its results there.
CheckpointHookFactory = Callable[[MetricsLogger], CheckpointHook]


class StopSignals(Protocol):
    """A context manager entered around the training loop."""

    def __enter__(self) -> StopSignals: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...

    @property
    def requested(self) -> bool:
        """Whether to stop after this step (every rank must get the same answer)."""
        ...

    def stop(self, step: int) -> None:
        """Called after the checkpoint of ``step`` when ``requested`` ended the run early."""
        ...


class NoStopSignals:
    """Never asks to stop (no signal handlers are installed)."""

    requested = False

    def __enter__(self) -> NoStopSignals:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        return None

    def stop(self, step: int) -> None:
        return None
