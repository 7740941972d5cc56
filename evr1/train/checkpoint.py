"""Checkpoints that survive preemption: written to a temporary folder, renamed when complete.

One checkpoint is a folder ``step-00000050`` holding::

    model/            HF safetensors + config (+ tokenizer/processor): loadable by transformers
                      and vLLM as it is, so eval and export need no conversion step
    (resume state)    the backend's: hf: ``dcp/`` (a torch.distributed.checkpoint of weights and
                      AdamW moments, every rank writing its shards, readable at any world size)
                      + ``optimizer.json``; hf before FSDP: ``optimizer.pt`` (tensors and numbers
                      only); megatron: ``megatron/`` + ``optimizer/``
    trainer_state.pt  step, data position, RNG states (tensors and numbers only)
    meta.json         step and what produced it; written last, inside the temporary folder
    leases/           one file per eval job that still reads model/ (see ``evr1.leases``)

The folder appears under its final name only by an atomic rename after everything in it is
fsynced, so ``latest`` never picks a half-written checkpoint; every ``.pt`` file loads with
``torch.load(weights_only=True)``.

Saving a step that already has a checkpoint (a run restarted from an earlier step) replaces
it in four moves: the new one is complete under ``.step-N.tmp``; the old one is renamed to
``.step-N.old``; the new one is renamed to ``step-N``; the old one is deleted. A kill between
any two of them leaves enough on disk for ``recover_interrupted_saves`` (run by the trainer
before it resumes) to put a complete checkpoint, the new one or the old one, under
``step-N``; a folder that lacks ``meta.json`` is never taken as one.

Resuming from an earlier checkpoint than the newest (``train.resume=<folder>``, or ``never``)
starts a new branch of the run: ``abandon_after`` moves the later checkpoints into
``abandoned-<UTC time>/`` (kept, not deleted), so that ``resume: auto`` never returns to them.

Pruning keeps the last ``keep_last`` checkpoints, the ``keep_best`` best by a score, and every
checkpoint with a live lease: an evaluation job submitted for it (``evr1.eval.while_training``)
takes a lease before it is queued and gives it back when it ends; a lease whose holder is gone
(a local process that died, a Slurm job no longer in the queue) no longer protects.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from evr1.files import fsync_dir
from evr1.leases import live_leases

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{8})$")
_REPLACED = re.compile(r"^\.step-(\d{8})\.old$")  # a checkpoint being replaced (see above)


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
                    barrier: Callable[[], None] = lambda: None, keep_best: int = 0,
                    scores: Mapping[int, float] | None = None) -> Path:
    """Write a complete checkpoint for ``state.step`` atomically; prune old ones.

    Under torch.distributed every rank calls this (``write_model_and_optimizer`` may be
    collective, e.g. gathering tensor-parallel shards, and every rank may write its own files
    into the folder, e.g. DCP shards, which DCP fsyncs itself); only the ``writer`` rank
    creates, completes and renames the folder, with ``barrier`` between the phases.
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
            _install(tmp, final)
    except BaseException:
        if writer:  # leave the step as it was, or as it now is: a complete checkpoint
            _recover_step(root, state.step)
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()
    if writer and keep_last > 0:
        prune_checkpoints(root, keep_last, keep_best, scores)
    return final


def _install(tmp: Path, final: Path) -> None:
    """Rename the complete folder ``tmp`` to ``final``, replacing a checkpoint already there
    so that a kill at any instant leaves a complete one recoverable (module docstring)."""
    if not final.exists():
        os.replace(tmp, final)
        fsync_dir(final.parent)
        return
    aside = _aside(final)
    shutil.rmtree(aside, ignore_errors=True)  # a leftover that recovery would delete anyway
    os.replace(final, aside)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(aside)


def _aside(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def _recover_step(root: Path, step: int) -> None:
    """Finish or undo an interrupted replacement of ``step``'s checkpoint."""
    final, tmp = step_dir(root, step), root / f".step-{step:08d}.tmp"
    aside = _aside(final)
    if not aside.exists():
        return
    if not (final / "meta.json").exists():
        # Killed between the two renames: the new folder was complete (fsynced, meta.json
        # written last) before the old one was moved aside; else put the old one back.
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp if (tmp / "meta.json").exists() else aside, final)
        fsync_dir(root)
    shutil.rmtree(aside, ignore_errors=True)


def recover_interrupted_saves(root: Path) -> None:
    """After a kill inside ``save_checkpoint``: every step has its complete checkpoint (old
    or new) under its name again, and temporary folders are gone. Run by the writer only,
    before choosing a checkpoint to resume from (a reader must not race a live save)."""
    if not root.exists():
        return
    for aside in root.glob(".step-*.old"):
        m = _REPLACED.match(aside.name)
        if m:
            _recover_step(root, int(m.group(1)))
    for tmp in root.glob(".step-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def abandon_after(root: Path, step: int, keep: Path | None, archive: Path) -> list[Path]:
    """Move the complete checkpoints of steps after ``step`` (and another folder of ``step``
    itself than ``keep``) into ``archive`` (``new_abandoned_dir``, created when needed);
    return the folders moved.

    Called when a run resumes from an earlier checkpoint than its newest: the later ones
    belong to a branch the run has left, and ``resume: auto`` would otherwise jump back to
    them. They are moved, not deleted (move one back to return to it). Each move is one
    rename; a kill midway leaves the rest in place for the next resume to move.
    """
    keep = keep.resolve() if keep is not None else None
    later = [p for p in list_checkpoints(root) if checkpoint_step(p) > step or
             (checkpoint_step(p) == step and p.resolve() != keep)]
    if later:
        archive.mkdir(parents=True, exist_ok=True)
        for folder in later:
            os.replace(folder, archive / folder.name)
        fsync_dir(root)
    return later


def new_abandoned_dir(root: Path) -> Path:
    """A fresh ``root/abandoned-<UTC time>`` path (not created); never matches ``step-*``."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path, n = root / f"abandoned-{stamp}", 1
    while path.exists():
        n += 1
        path = root / f"abandoned-{stamp}-{n}"
    return path


def checkpoint_step(folder: Path) -> int:
    return int(STEP_DIR.match(folder.name).group(1))


def prune_checkpoints(root: Path, keep_last: int, keep_best: int = 0,
                      scores: Mapping[int, float] | None = None) -> list[Path]:
    """Delete complete checkpoints outside the policy; returns the deleted folders.

    Kept: the newest ``keep_last``, the ``keep_best`` with the highest ``scores[step]`` (steps
    without a score do not compete), and any with a live lease. ``keep_last`` 0 keeps all.
    """
    if keep_last <= 0:
        return []
    found = list_checkpoints(root)
    keep = {p.name for p in found[-keep_last:]}
    scored = [p for p in found if scores and checkpoint_step(p) in scores]
    scored.sort(key=lambda p: (-scores[checkpoint_step(p)], -checkpoint_step(p)))
    keep |= {p.name for p in scored[:keep_best]}
    removed = []
    for folder in found:
        if folder.name in keep or live_leases(folder):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def load_trainer_state(folder: Path) -> TrainerState:
    saved = torch.load(folder / "trainer_state.pt", weights_only=True)
    set_rng_state(saved["rng"])
    return TrainerState(**saved["trainer"])


def rng_state(cuda_devices: Sequence[int] | None = None) -> dict:
    """Every random generator a training step draws from, as tensors and numbers only
    (``torch.load(weights_only=True)``): torch's CPU generator, each CUDA device's (the
    sampler's draws on a GPU come from there), Python's ``random`` and numpy's global one.

    ``cuda_devices``: the devices to save; default every visible one when CUDA is available.
    """
    if cuda_devices is None:
        cuda_devices = range(torch.cuda.device_count()) if torch.cuda.is_available() else []
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": list(internal),
            "python_version": version, "python_gauss": gauss,
            "cuda": [torch.cuda.get_rng_state(d) for d in cuda_devices],
            "numpy": torch.from_numpy(keys.astype(np.int64)),
            "numpy_pos": int(pos), "numpy_gauss": [int(has_gauss), float(cached)]}


def set_rng_state(state: dict, cuda_devices: Sequence[int] | None = None) -> None:
    """Restore what :func:`rng_state` saved; CUDA states go to ``cuda_devices`` (default
    0 .. k-1 for k saved states). A checkpoint from before CUDA/numpy states were saved
    restores what it has."""
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "numpy" in state:
        has_gauss, cached = state["numpy_gauss"]
        np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32),
                             state["numpy_pos"], int(has_gauss), float(cached)))
    saved = state.get("cuda", [])
    if not saved:
        return
    if cuda_devices is None:
        if not torch.cuda.is_available():
            log.warning("the checkpoint holds %d CUDA RNG states but CUDA is not available: "
                        "sampling will not repeat the uninterrupted run", len(saved))
            return
        cuda_devices = range(min(len(saved), torch.cuda.device_count()))
    if len(cuda_devices) != len(saved):
        log.warning("the checkpoint holds %d CUDA RNG states, restoring %d devices",
                    len(saved), len(cuda_devices))
    for device, device_state in zip(cuda_devices, saved, strict=False):
        torch.cuda.set_rng_state(device_state, device)


def _fsync_tree(folder: Path) -> None:
    for dirpath, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
