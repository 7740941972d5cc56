"""torch.distributed rendezvous from Slurm's variables, for ranks that srun started.

``slurm/train_8node.sh`` sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in
shell before each rank starts; a submitit multi-node job (``launchers/train.py --slurm`` with
``launch.nodes`` > 1) and a bare ``srun python launchers/train.py`` get the same values here, by
the same rules:

* rank, local rank, world size: ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NTASKS``;
* master address: the first node of the allocation, at the address Slurm itself reaches it by
  (its ``NodeAddr`` in ``scontrol show node``; the node name when scontrol cannot say);
* master port: 20000 + job id mod 20000, so two jobs sharing a node don't collide.

``EVR1_MASTER_ADDR`` / ``EVR1_MASTER_PORT`` override the last two. Variables already set
(torchrun, the sbatch script) are never changed.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import MutableMapping


def first_node(nodelist: str) -> str:
    """The first host name of a Slurm node list (``n[1-2],gpu07`` -> ``n1``)."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                         text=True, timeout=30)
    names = out.stdout.split()
    if out.returncode != 0 or not names:
        raise RuntimeError(f"scontrol show hostnames {nodelist!r} failed: {out.stderr.strip()}")
    return names[0]


def node_address(node: str) -> str:
    """The address Slurm reaches ``node`` at (NodeAddr), or the name itself."""
    try:
        out = subprocess.run(["scontrol", "show", "node", node, "-o"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return node
    found = re.search(r"\bNodeAddr=(\S+)", out.stdout)
    return found.group(1) if found and out.returncode == 0 else node


def master_port(job_id: str) -> int:
    return 20000 + int(job_id) % 20000


def export_from_slurm(environ: MutableMapping[str, str] | None = None) -> bool:
    """Fill in the torch.distributed variables of a Slurm task that has none; True if it did.

    Outside a Slurm job step (no ``SLURM_PROCID``), or when ``RANK`` is already set, nothing
    changes. A job of one task gets this host on a free port.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env or "SLURM_PROCID" not in env:
        return False
    world = int(env.get("SLURM_NTASKS", "1"))
    env.update(RANK=env["SLURM_PROCID"], LOCAL_RANK=env.get("SLURM_LOCALID", "0"),
               WORLD_SIZE=str(world))
    if world == 1:
        env.setdefault("MASTER_ADDR", env.get("EVR1_MASTER_ADDR", "127.0.0.1"))
        env.setdefault("MASTER_PORT", env.get("EVR1_MASTER_PORT", str(_free_port())))
        return True
    if "MASTER_ADDR" not in env:
        env["MASTER_ADDR"] = env.get("EVR1_MASTER_ADDR") or node_address(
            first_node(env["SLURM_JOB_NODELIST"]))
    if "MASTER_PORT" not in env:
        env["MASTER_PORT"] = env.get("EVR1_MASTER_PORT") or str(master_port(env["SLURM_JOB_ID"]))
    return True


def describe_rank(environ: MutableMapping[str, str] | None = None) -> str:
    """One line naming where this rank runs (the sbatch script prints the same)."""
    env = os.environ if environ is None else environ
    return (f"evr1-rank {env.get('RANK', '?')}/{env.get('WORLD_SIZE', '?')}: node "
            f"{env.get('SLURMD_NODENAME', '?')} (node id {env.get('SLURM_NODEID', '?')}, host "
            f"{socket.gethostname()}), local rank {env.get('LOCAL_RANK', '?')}, master "
            f"{env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
