"""Leases: "a job still reads this folder", so that pruning leaves it alone.

A lease is one small JSON file in ``<folder>/leases/``, written by whoever reads the folder
(an eval job reading a checkpoint's model). Its holder is a process on this host (``pid``)
and/or Slurm jobs (``slurm_jobs``); a lease whose holder is gone is stale and removed.

It lives in the core layer because both sides use it: the trainer's checkpoint pruning
(``evr1.train.checkpoint``) asks, eval-while-training (``evr1.eval.while_training``) takes and
releases. Asking Slurm (``squeue``) whether a job still runs is the one Slurm call here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path


def take_lease(folder: Path, name: str, **holder: object) -> Path:
    """Mark ``folder`` as read by ``name`` until ``release_lease``; ``holder`` says who holds
    it: ``pid`` (a process on this host) and/or ``slurm_jobs`` (job ids)."""
    lease = folder / "leases" / f"{name}.json"
    lease.parent.mkdir(exist_ok=True)
    record = {"name": name, "host": socket.gethostname(), "created": time.time(), **holder}
    tmp = lease.with_name(f".{lease.name}.tmp")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, lease)
    return lease


def release_lease(lease: Path | str) -> None:
    Path(lease).unlink(missing_ok=True)


def live_leases(folder: Path) -> list[Path]:
    """The leases on ``folder`` whose holder still runs; stale ones are removed."""
    live = []
    for lease in sorted((folder / "leases").glob("*.json")):
        try:
            record = json.loads(lease.read_text())
        except (OSError, json.JSONDecodeError):
            live.append(lease)  # being written: count it
            continue
        if _holder_alive(record):
            live.append(lease)
        else:
            release_lease(lease)
    return live


def _holder_alive(record: dict) -> bool:
    jobs = record.get("slurm_jobs") or []
    if jobs:
        try:
            out = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(jobs)],
                                 capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return True  # cannot tell: keep the checkpoint
        # squeue lists pending and running jobs; finished ones drop out (or are unknown).
        if out.returncode != 0 and "Invalid job id" not in out.stderr:
            return True  # no answer from the controller: keep the checkpoint
        return bool(out.stdout.strip())
    pid = record.get("pid")
    if pid is None or record.get("host") != socket.gethostname():
        return True  # held by someone we cannot check from here: keep the checkpoint
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
