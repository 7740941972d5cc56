"""Run untrusted Python against assert lines, in a separate, limited process.

Layers, outermost first:
  * a fresh process in its own session (the whole group is killed at the wall timeout);
  * no network: ``unshare -n`` (or ``unshare -rn`` as a normal user) when the kernel allows
    it, probed once; in any case the harness replaces the socket constructors with ones that
    refuse, and refuses fork/exec/subprocess;
  * ``resource`` limits set by the harness before the code runs: CPU seconds, address space,
    file size (so output is bounded too), open files, no core dumps;
  * a temporary working directory, deleted afterwards, as HOME and TMPDIR, a minimal
    environment and ``python -I`` (no user site, no PYTHON* variables).

This protects the trainer's machine from accidents and casual misuse. It is not a boundary
against a determined attacker (the refusals are Python-level); run training that executes code
from untrusted models in a container as well.

Results travel in a file, each line prefixed by a random token that the code under test never
sees (the harness reads and deletes it first), so printing "passed" lines earns nothing.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

MAX_TESTS = 200
MAX_RESULT_BYTES = 1 << 20


@dataclass(frozen=True)
class SandboxLimits:
    wall_s: float = 5.0
    cpu_s: int = 5
    memory_mb: int = 1024
    file_mb: int = 16
    open_files: int = 64


@dataclass(frozen=True)
class SandboxResult:
    passed: int
    total: int
    timed_out: bool = False
    network_isolated: bool = False  # whether a network namespace was used

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0


# The harness runs as its own script; it must not import evr1 (python -I, an empty folder).
_HARNESS = r'''
import builtins, json, os, resource, signal, socket, sys


def limit(kind, value):
    try:
        soft, hard = resource.getrlimit(kind)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(kind, (value, value if hard == resource.RLIM_INFINITY else hard))
    except (ValueError, OSError):
        pass


def refuse(*args, **kwargs):
    raise PermissionError("not allowed in the evr1 sandbox")


class NoSocket(socket.socket):
    def __init__(self, *args, **kwargs):
        refuse()


class Overrun(BaseException):
    pass


def overrun(signum, frame):
    raise Overrun()


def lock_down(job):
    limit(resource.RLIMIT_CPU, job["cpu_s"])
    limit(resource.RLIMIT_AS, job["memory_mb"] << 20)
    limit(resource.RLIMIT_FSIZE, job["file_mb"] << 20)
    limit(resource.RLIMIT_NOFILE, job["open_files"])
    limit(resource.RLIMIT_CORE, 0)
    import _socket
    import subprocess
    socket.socket = _socket.socket = NoSocket
    for name in ("create_connection", "create_server", "socketpair", "fromfd"):
        setattr(socket, name, refuse)
    for name in ("fork", "forkpty", "system", "popen", "execv", "execve", "execvp", "execvpe",
                 "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnl",
                 "posix_spawn", "posix_spawnp", "kill", "killpg"):
        if hasattr(os, name):
            setattr(os, name, refuse)
    subprocess.Popen = refuse


def main():
    # The token lives only in this frame: not in __main__'s globals, not on disk.
    with open("job.json") as f:
        job = json.load(f)
    os.remove("job.json")
    token, step_s = job.pop("token"), job["step_s"]
    out = open("results.txt", "w", buffering=1)
    lock_down(job)
    signal.signal(signal.SIGALRM, overrun)
    sys.stdout = sys.stderr = open(os.devnull, "w")  # program output is not wanted
    namespace = {"__name__": "__main__", "__builtins__": builtins}

    def run(source, label):
        signal.setitimer(signal.ITIMER_REAL, step_s)
        try:
            exec(compile(source, label, "exec"), namespace)
            return True
        except BaseException:
            return False
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    if run(job["code"], "<solution>"):
        out.write(token + " code\n")
    for i, test in enumerate(job["tests"]):
        if run(test, "<test %d>" % i):
            out.write("%s %d\n" % (token, i))
    out.close()


main()
'''


@functools.lru_cache(maxsize=1)
def network_prefix() -> tuple[str, ...]:
    """The ``unshare`` command that gives a child no network, or () when not possible here."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    for prefix in ((exe, "-n"), (exe, "-rn")):
        try:
            done = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return prefix
    return ()


def run_tests(code: str, tests: Sequence[str],
              limits: SandboxLimits | None = None) -> SandboxResult:
    """Execute ``code`` then each test (e.g. an ``assert`` line); count the tests that pass.

    A test passes when it runs without raising after the code ran. If the code itself fails,
    no test passes. Tests that did not finish before the wall timeout fail.
    """
    limits = limits or SandboxLimits()
    tests = [str(t) for t in list(tests)[:MAX_TESTS]]
    if not tests:
        return SandboxResult(0, 0)
    token = secrets.token_hex(16)
    prefix = network_prefix()
    with tempfile.TemporaryDirectory(prefix="evr1-sandbox-") as tmp:
        work = Path(tmp)
        (work / "harness.py").write_text(_HARNESS)
        job = {"token": token, "code": code, "tests": tests, "cpu_s": limits.cpu_s,
               "memory_mb": limits.memory_mb, "file_mb": limits.file_mb,
               "open_files": limits.open_files,
               "step_s": max(0.05, limits.wall_s / (len(tests) + 1))}
        (work / "job.json").write_text(json.dumps(job))
        timed_out = _run(
            [*prefix, sys.executable, "-I", "harness.py"], work, limits.wall_s)
        passed = _count_passed(work / "results.txt", token, len(tests))
    return SandboxResult(passed, len(tests), timed_out, network_isolated=bool(prefix))


def _run(cmd: list[str], cwd: Path, wall_s: float) -> bool:
    """Run to completion or kill the whole process group at ``wall_s``; True if killed."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), "TMPDIR": str(cwd), "LANG": "C.UTF-8",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        proc.wait(timeout=wall_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
    try:  # also reaps anything the code left behind in its group
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    return timed_out


def _count_passed(results: Path, token: str, total: int) -> int:
    try:
        with results.open("rb") as f:
            data = f.read(MAX_RESULT_BYTES).decode("utf-8", "replace")
    except OSError:
        return 0
    lines = data.splitlines()
    if f"{token} code" not in lines:
        return 0
    passed = set()
    for line in lines:
        head, _, index = line.partition(" ")
        if head == token and index.isdigit() and int(index) < total:
            passed.add(int(index))
    return len(passed)
