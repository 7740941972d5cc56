"""Checkpoints that survive preemption: written to a temporary folder, renamed when complete.

One checkpoint is a folder ``step-00000050`` holding::

    model/            HF safetensors + config (+ tokenizer/processor): loadable by transformers
                      and vLLM as it is, so eval and export need no conversion step
    optimizer.pt      optimizer + LR scheduler state (tensors and numbers only)
    trainer_state.pt  step, data position, RNG states (tensors and numbers only)
    meta.json         step and what produced it; written last, inside the temporary folder

The folder appears under its final name only by an atomic rename after everything in it is
fsynced, so ``latest`` never picks a half-written checkpoint; every ``.pt`` file loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

STEP_DIR = re.compile(r"^step-(\d{8})$")


@dataclass
class TrainerState:
    step: int = 0  # optimiser steps completed
    data_position: int = 0  # prompts drawn from the sampler so far


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders never match the name pattern)."""
    if not root.exists():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and STEP_DIR.match(p.name) and (p / "meta.json").exists()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(root: Path, state: TrainerState,
                    write_model_and_optimizer: Callable[[Path], None],
                    extra_files: Sequence[Path] = (), keep_last: int = 0, *, writer: bool = True,
                    barrier: Callable[[], None] = lambda: None) -> Path:
    """Write a complete checkpoint for ``state.step`` atomically; prune old ones.

    Under torch.distributed every rank calls this (``write_model_and_optimizer`` may be
    collective, e.g. gathering tensor-parallel shards); only the ``writer`` rank creates,
    completes and renames the folder, with ``barrier`` between the phases.
    """
    tmp = root / f".step-{state.step:08d}.tmp"
    final = step_dir(root, state.step)
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    try:
        write_model_and_optimizer(tmp)
        barrier()
        if writer:
            for path in extra_files:  # tokenizer / processor files: model/ is self-contained
                shutil.copy2(path, tmp / "model" / path.name)
            torch.save({"trainer": asdict(state), "rng": rng_state()}, tmp / "trainer_state.pt")
            (tmp / "meta.json").write_text(json.dumps({"step": state.step}) + "\n")
            _fsync_tree(tmp)
            if final.exists():  # the same step saved again (a re-run): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
    except BaseException:
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()
    if writer and keep_last > 0:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(folder: Path) -> TrainerState:
    saved = torch.load(folder / "trainer_state.pt", weights_only=True)
    set_rng_state(saved["rng"])
    return TrainerState(**saved["trainer"])


def remove_stale_temporaries(root: Path) -> None:
    if root.exists():
        for tmp in root.glob(".step-*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)


def rng_state() -> dict:
    # Python's random state is a tuple of ints: fine for weights_only loading.
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))


def _fsync_tree(folder: Path) -> None:
    for dirpath, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
