"""Run a function on N local processes joined by torch.distributed (gloo on CPU).

For tests and benchmarks on one machine: ``run(fn, world_size, *args)`` starts N fresh
processes (spawn, so no state leaks from the caller), sets the launcher variables torchrun
would set, calls ``fn(*args)`` on each and returns every rank's result (anything
``torch.save`` can write). An exception on any rank fails the call with that rank's traceback.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[..., Any], world: int, port: int, out: str,
           threads: int, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    try:
        result = fn(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    torch.save(result, Path(out) / f"rank{rank}.pt")


def run(fn: Callable[..., Any], world_size: int, *args: Any, threads: int = 1) -> list[Any]:
    """``fn(*args)`` on ``world_size`` processes; returns the results in rank order.

    ``fn`` must be importable by name (a module-level function)."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_entry, args=(fn, world_size, _free_port(), out, threads, args),
                           nprocs=world_size, join=True, start_method="spawn")
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False)
                for r in range(world_size)]
