"""The ``slurm_cluster`` fixture: a real Slurm cluster on this machine (tools/local_slurm.sh).

The cluster is started once for the test session, unless one is already running (CI starts
it in .ci/run, a developer may have started it by hand): a running cluster is used and left
running. A cluster this fixture started is stopped at the end by whichever test session
finishes last, so two sessions running side by side don't pull it from under each other.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools/local_slurm.sh"
START_TIMEOUT_S = 600  # a first start installs the Debian packages


@dataclass
class SlurmCluster:
    state_dir: Path
    nodes: list[str]


def state_dir() -> Path:
    return Path(os.environ.get("EVR1_SLURM_DIR", "/tmp/evr1-slurm"))


def cluster_is_up() -> bool:
    return subprocess.run([str(SCRIPT), "status"], capture_output=True).returncode == 0


def node_names() -> list[str]:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True,
                         check=True).stdout
    return sorted(set(out.split()))


def why_it_cannot_run() -> str:
    """A reason to skip, or '' when starting the cluster is worth trying."""
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (its daemons run as SlurmUser=root)"
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install slurm-wlm + munge"
    return ""


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    reason = why_it_cannot_run()
    if reason:
        pytest.skip(reason)
    folder = state_dir()
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "started-by-tests"
    # A shared lock for as long as this session uses the cluster; the last user can take it
    # exclusively, and only then may the cluster go.
    users = open(folder / "users.lock", "a")  # held for the whole session
    fcntl.flock(users, fcntl.LOCK_SH)
    try:
        if not cluster_is_up():
            start = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True,
                                   timeout=START_TIMEOUT_S)
            if start.returncode != 0:
                pytest.skip("the local Slurm cluster did not start (tools/local_slurm.sh "
                            f"start):\n{(start.stdout + start.stderr)[-2000:]}")
            marker.touch()
        yield SlurmCluster(state_dir=folder, nodes=node_names())
    finally:
        fcntl.flock(users, fcntl.LOCK_UN)
        _stop_if_last_user(users, marker)
        users.close()


def _stop_if_last_user(users, marker: Path) -> None:
    try:
        fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # another test session still uses the cluster; it stops it when done
    try:
        if marker.exists():
            subprocess.run([str(SCRIPT), "stop"], capture_output=True, timeout=120)
            marker.unlink(missing_ok=True)
    finally:
        fcntl.flock(users, fcntl.LOCK_UN)
