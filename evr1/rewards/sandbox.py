"""Run model-written Python in a bubblewrap box and bring back plain data.

The box (see docs/architecture.md, "Code sandbox", for what it does and does not isolate):

* ``bwrap`` with new user, PID, mount, network, IPC, UTS and cgroup namespaces, no
  capabilities, no further user namespaces, its own session; uid/gid 65534 inside, and an
  unprivileged uid outside too: a trainer running as root drops to 65534 (``setpriv``) before
  starting bwrap, so the box is never host root;
* a file system made of read-only ``/usr``, ``/lib*`` and the interpreter's prefix, the box's
  own ``/proc`` and a minimal ``/dev``, and a private, size-limited tmpfs ``/tmp``: no
  ``/root``, ``/etc``, ``/home``, ``/work`` or host processes;
* PID 1 of the box is bwrap's init: when the code's process ends, or the trainer kills the
  box, or the trainer dies (``--die-with-parent``), every process in the box dies with it;
* limits on the whole box, not per process: a fresh cgroup (v1 ``memory`` with swap, and
  ``pids``) per run, removed afterwards; the wall clock (everything in the cgroup is killed);
  the bytes read from its stdout. Where cgroups cannot be written the box refuses to start
  unless ``limits="rlimit"`` was chosen (per-process limits, documented as weaker).

What runs inside is ``_RUNNER``: it executes the code, then evaluates each test's probe
expressions (see ``evr1.rewards.asserts``) and prints their values as JSON lines. Nothing the
box prints is trusted beyond "these are the values": the verdict is computed outside, and no
secret lives inside the box.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .asserts import TestPlan, passes, plan_tests

logger = logging.getLogger(__name__)

MAX_TESTS = 200
BOX_UID = 65534  # "nobody", inside the box and, when the trainer is root, outside too
CGROUP_ROOT = Path("/sys/fs/cgroup")
INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora/RHEL: "
                "dnf install bubblewrap), or set reward.code_execution=false")
LimitMode = Literal["cgroup", "rlimit"]


class SandboxUnavailable(RuntimeError):
    """Code execution was asked for, but this machine cannot run the sandbox as configured."""


@dataclass(frozen=True)
class SandboxLimits:
    wall_s: float = 5.0  # wall clock for the whole box; everything in it is killed then
    memory_mb: int = 1024  # the whole box (cgroup); in "rlimit" mode each process
    max_processes: int = 16  # processes and threads in the whole box
    output_kb: int = 1024  # bytes read from the box; the box is killed beyond
    file_mb: int = 16  # largest file, and the size of the box's /tmp
    limits: LimitMode = "cgroup"
    python: str = ""  # interpreter run in the box; empty: this one, else /usr/bin/python3


@dataclass(frozen=True)
class SandboxResult:
    passed: int
    total: int
    timed_out: bool = False  # the box was killed at the wall clock
    overflowed: bool = False  # the box printed more than output_kb and was killed

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0


@dataclass(frozen=True)
class BoxRun:
    """What came back from one box: per test, each probe's (ok, value), or None if missing."""

    values: list[list[tuple[bool, Any]] | None]
    timed_out: bool
    overflowed: bool
    returncode: int | None
    stderr: str = ""  # bwrap's complaints, kept only when checking the set-up


# The program run in the box (python -I -S: no site, no user site, no PYTHON* variables).
# It is not a security layer: the code may rewrite it; all it could gain is to claim values.
_RUNNER = r'''
import json, math, os, resource, signal, sys

def main():
    job = json.loads(sys.stdin.read())
    out = os.fdopen(os.dup(1), "w")
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    sys.stdout = sys.stderr = open(os.devnull, "w")  # the program's own output is dropped
    for name, value in job["rlimits"]:
        resource.setrlimit(getattr(resource, name), (value, value))

    class Overrun(BaseException):
        pass

    def overrun(signum, frame):
        raise Overrun()

    signal.signal(signal.SIGALRM, overrun)

    def plain(x, depth=0):
        t = type(x)
        if x is None or t is bool or t is int or t is float or t is str:
            return x
        if depth > 100:
            raise ValueError("nested too deeply")
        if t is list:
            return [plain(v, depth + 1) for v in x]
        if t in (tuple, set, frozenset):
            return {t.__name__: [plain(v, depth + 1) for v in x]}
        if t is dict:
            return {"dict": [[plain(k, depth + 1), plain(v, depth + 1)] for k, v in x.items()]}
        if t is bytes:
            return {"bytes": x.hex()}
        if t is complex:
            return {"complex": [x.real, x.imag]}
        raise TypeError(t.__name__ + " is not plain data")

    def step(fn):
        signal.setitimer(signal.ITIMER_REAL, job["step_s"])
        try:
            return [1, fn()]
        except BaseException as exc:
            return [0, type(exc).__name__]
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    namespace = {"__name__": "__main__"}
    ok, error = step(lambda: exec(compile(job["code"], "<solution>", "exec"), namespace))
    if not ok:
        out.write(json.dumps({"code": error}) + "\n")
        return
    for i, probes in enumerate(job["probes"]):
        values = []
        for source in probes:
            values.append(step(lambda: plain(eval(source, namespace))))
        try:
            line = json.dumps({"t": i, "v": values})
        except (ValueError, TypeError):  # an int past the digit limit...
            line = json.dumps({"t": i, "v": [v if v[0] == 0 else [0, "ValueError"]
                                             for v in values]})
        out.write(line + "\n")
        out.flush()

main()
'''


# --------------------------------------------------------------------------- set-up


@dataclass(frozen=True)
class _Setup:
    """How to start a box here, found once per process and limits mode."""

    bwrap: str
    python: str
    binds: tuple[str, ...]  # bwrap arguments for the read-only file system
    drop_to: str | None  # setpriv, when the trainer runs as root
    cgroups: tuple[tuple[str, Path], ...]  # (controller, parent folder) for per-run cgroups


_SETUPS: dict[tuple[str, LimitMode], _Setup] = {}


def require_sandbox(limits: SandboxLimits | None = None) -> None:
    """Check that boxes can run here with ``limits``; raise ``SandboxUnavailable`` if not.

    Call it before training so that a missing bwrap stops the run at start, not at step N.
    """
    _setup(limits or SandboxLimits())


def _setup(limits: SandboxLimits) -> _Setup:
    key = (limits.python, limits.limits)
    if key not in _SETUPS:
        _SETUPS[key] = _find_setup(limits)
    return _SETUPS[key]


def _find_setup(limits: SandboxLimits) -> _Setup:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable(f"the code reward runs model-written code in a bubblewrap "
                                 f"sandbox, but `bwrap` is not on PATH: {INSTALL_HINT}")
    drop_to = None
    if os.geteuid() == 0:
        drop_to = shutil.which("setpriv")
        if drop_to is None:
            raise SandboxUnavailable("running as root, the sandbox drops to uid 65534 with "
                                     "`setpriv` (util-linux), which is not on PATH")
    cgroups: tuple[tuple[str, Path], ...] = ()
    if limits.limits == "cgroup":
        cgroups = _cgroup_parents()
    elif limits.limits != "rlimit":
        raise SandboxUnavailable(f"reward.sandbox_limits must be cgroup or rlimit, "
                                 f"got {limits.limits!r}")
    tried = []
    for python in ([limits.python] if limits.python else [sys.executable, "/usr/bin/python3"]):
        python = os.path.realpath(python)  # a venv's or a symlink's interpreter, bound as is
        setup = _Setup(bwrap, python, _binds(python), drop_to, cgroups)
        error = _try(setup, limits)
        if error is None:
            return setup
        tried.append(f"{python}: {error}")
    raise SandboxUnavailable(
        "bubblewrap could not run Python in a box (" + "; ".join(tried) + "). It needs "
        "unprivileged user namespaces (sysctl user.max_user_namespaces > 0; on Ubuntu "
        "24.04 kernel.apparmor_restrict_unprivileged_userns=0 or an AppArmor profile for "
        "bwrap) and an interpreter readable by uid 65534 (reward.sandbox_python)")


def _try(setup: _Setup, limits: SandboxLimits) -> str | None:
    """Run a tiny job in a box; None if it gave the right answer, else what went wrong."""
    plans = plan_tests(["assert x + 1 == 42"])
    try:
        run = _run_box(setup, limits, "x = 41", plans, stderr=True)
    except OSError as exc:
        return str(exc)
    if run.values and run.values[0] and passes(plans[0], run.values[0]):
        return None
    return f"exit status {run.returncode}: {run.stderr.strip()[:400]}"


_INTERPRETER_INFO = """
import json, os, sys, sysconfig
lib = os.path.join(sysconfig.get_config_var("LIBDIR") or "",
                   sysconfig.get_config_var("INSTSONAME") or "")
print(json.dumps({"exe": os.path.realpath(sys.executable), "lib": os.path.realpath(lib),
                  "stdlib": sysconfig.get_path("stdlib"),
                  "platstdlib": sysconfig.get_path("platstdlib")}))
"""


def _binds(python: str) -> tuple[str, ...]:
    """Read-only /usr and /lib*; for an interpreter outside /usr, just its binary, libpython
    and standard library (never its whole prefix, which may be a home folder)."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    try:
        info = json.loads(subprocess.run([python, "-I", "-S", "-c", _INTERPRETER_INFO],
                                         capture_output=True, text=True, timeout=30).stdout)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return tuple(args)  # the box will fail to start, and say so
    for key in ("exe", "lib", "stdlib", "platstdlib"):
        path = info[key]
        if path and os.path.exists(path) and not path.startswith("/usr/") and path not in args:
            args += ["--ro-bind", path, path]
    site = os.path.join(info["stdlib"], "site-packages")
    if os.path.isdir(site) and not site.startswith("/usr/"):
        args += ["--tmpfs", site]  # the standard library only, as under /usr
    return tuple(args)


def _cgroup_parents() -> tuple[tuple[str, Path], ...]:
    """This process's memory and pids cgroups (v1), if per-run children can be made there."""
    own = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(","):
            own[c] = path
    parents = []
    for controller in ("memory", "pids"):
        parent = CGROUP_ROOT / controller / own.get(controller, "/").lstrip("/")
        if controller not in own or not (parent / "cgroup.procs").exists() or \
                not os.access(parent, os.W_OK):
            raise SandboxUnavailable(
                f"reward.sandbox_limits=cgroup limits the whole box with a cgroup v1 memory "
                f"and pids cgroup per run, but {parent} is missing or not writable by uid "
                f"{os.geteuid()}. Run the trainer where it is (as root, or with a delegated "
                "cgroup), or set reward.sandbox_limits=rlimit to accept per-process limits: "
                "memory is then bounded by sandbox_memory_mb per process, up to "
                "sandbox_max_processes processes (see docs/architecture.md; cgroup v2 alone "
                "is not supported yet)")
        parents.append((controller, parent))
        _remove_stale_cgroups(parent)
    return tuple(parents)


def _remove_stale_cgroups(parent: Path) -> None:
    """Empty cgroups left by a scorer that was killed mid-run (their name holds its pid).

    Only empty ones: the hierarchy may be shared with other containers, whose pids are not
    visible here, and whose boxes must not be touched.
    """
    for cgroup in parent.glob("evr1-box-*-*"):
        pid = cgroup.name.split("-")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            try:
                cgroup.rmdir()  # fails while processes are in it
            except OSError:
                pass


# --------------------------------------------------------------------------- one box


def run_tests(code: str, tests: Sequence[str],
              limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``code`` in a box and count the assert ``tests`` that hold.

    Each test is split by ``evr1.rewards.asserts.plan_test`` (a test it cannot check safely
    raises ``InvalidSolution``); only the parts that call into ``code`` run in the box, and
    the asserts are checked here on the plain values that come back. If ``code`` raises, no
    test passes; tests whose values did not come back before the wall clock fail.
    """
    limits = limits or SandboxLimits()
    plans = plan_tests([str(t) for t in list(tests)[:MAX_TESTS]])
    if not plans:
        return SandboxResult(0, 0)
    setup = _setup(limits)
    run = _run_box(setup, limits, code, plans)
    passed = sum(1 for plan, values in zip(plans, run.values, strict=True)
                 if values is not None and passes(plan, values))
    result = SandboxResult(passed, len(plans), run.timed_out, run.overflowed)
    _note_cut(result, limits)
    return result


_NOTED: set[str] = set()


def _note_cut(result: SandboxResult, limits: SandboxLimits) -> None:
    """Log (once per kind and process, then at debug level) boxes killed at a limit."""
    for kind, cut in (("wall clock", result.timed_out), ("output cap", result.overflowed)):
        if cut:
            level = logging.DEBUG if kind in _NOTED else logging.INFO
            _NOTED.add(kind)
            logger.log(level, "code sandbox: a box was killed at its %s (timeout_s=%s, "
                       "output_kb=%s); its unanswered tests count as failed", kind,
                       limits.wall_s, limits.output_kb)


def _run_box(setup: _Setup, limits: SandboxLimits, code: str, plans: Sequence[TestPlan],
             stderr: bool = False) -> BoxRun:
    job = json.dumps({
        "code": code, "probes": [list(p.probes) for p in plans],
        "step_s": max(0.05, limits.wall_s / (len(plans) + 1)),
        "rlimits": _rlimits(limits)}).encode()
    cgroups = _make_cgroups(setup, limits)
    try:
        argv = _argv(setup, limits, cgroups)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE if stderr else subprocess.DEVNULL,
                                env=env, cwd="/", start_new_session=True)
        try:
            data, timed_out, overflowed = _exchange(proc, job, limits)
        finally:
            _kill(proc, cgroups)
        err = proc.stderr.read(4000).decode("utf-8", "replace") if stderr and proc.stderr \
            else ""
        if proc.stderr:
            proc.stderr.close()
    finally:
        _remove_cgroups(cgroups)
    return BoxRun(_parse(data, len(plans), [len(p.probes) for p in plans]), timed_out,
                  overflowed, proc.returncode, err)


def _rlimits(limits: SandboxLimits) -> list[tuple[str, int]]:
    out = [("RLIMIT_CORE", 0), ("RLIMIT_FSIZE", limits.file_mb << 20),
           ("RLIMIT_NOFILE", 64), ("RLIMIT_CPU", max(1, int(limits.wall_s) + 1))]
    if limits.limits == "rlimit":  # the weaker mode: per process, see docs/architecture.md
        out += [("RLIMIT_AS", limits.memory_mb << 20),
                ("RLIMIT_NPROC", limits.max_processes)]
    return out


def _argv(setup: _Setup, limits: SandboxLimits, cgroups: Sequence[Path]) -> list[str]:
    box = [setup.bwrap, "--unshare-all", "--unshare-user", "--disable-userns",
           "--uid", str(BOX_UID), "--gid", str(BOX_UID), "--die-with-parent", "--new-session",
           "--cap-drop", "ALL", "--hostname", "evr1-box", "--clearenv",
           "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
           "--setenv", "LANG", "C.UTF-8",
           # /tmp first: an interpreter kept under /tmp is then bound on top of it
           "--size", str(limits.file_mb << 20), "--tmpfs", "/tmp",
           *setup.binds, "--proc", "/proc", "--dev", "/dev",
           "--size", str(limits.file_mb << 20), "--tmpfs", "/dev/shm",
           # bwrap's own / and /dev are tmpfs without a size: read-only, so that /tmp and
           # /dev/shm are the only (size-limited) places to write
           "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/tmp",
           setup.python, "-I", "-S", "-B", "-c", _RUNNER]
    if setup.drop_to:  # root: the box must not be host root, even without capabilities
        box = [setup.drop_to, f"--reuid={BOX_UID}", f"--regid={BOX_UID}", "--clear-groups",
               "--", *box]
    if not cgroups:
        return box
    # Join the cgroups before bwrap starts, so that no process of the box is ever outside.
    join = " && ".join(f'echo $$ > "${i + 1}"' for i in range(len(cgroups)))
    return ["/bin/sh", "-c", f'{join} && shift {len(cgroups)} && exec "$@"', "evr1-box",
            *(str(c / "cgroup.procs") for c in cgroups), *box]


def _exchange(proc: subprocess.Popen, job: bytes, limits: SandboxLimits
              ) -> tuple[bytes, bool, bool]:
    """Send the job, read at most output_kb until the box ends or the wall clock runs out."""
    assert proc.stdin is not None and proc.stdout is not None
    deadline = time.monotonic() + limits.wall_s
    cap = limits.output_kb << 10
    chunks: list[bytes] = []
    size = 0
    fd = proc.stdout.fileno()
    try:
        proc.stdin.write(job)  # the runner reads all of it before anything else runs
        proc.stdin.close()
    except BrokenPipeError:  # the box did not start; what it said is in stderr
        pass
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"".join(chunks), True, False
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks), False, False
        chunks.append(chunk)
        size += len(chunk)
        if size > cap:
            return b"".join(chunks)[:cap], False, True


def _kill(proc: subprocess.Popen, cgroups: Sequence[Path]) -> None:
    """Kill the box and everything in it, and reap bwrap."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # bwrap outside; --die-with-parent does the rest
    except (ProcessLookupError, PermissionError):
        pass
    for cgroup in cgroups:
        _kill_cgroup(cgroup)
    proc.wait()
    if proc.stdout:
        proc.stdout.close()


def _kill_cgroup(cgroup: Path) -> None:
    for _ in range(200):
        try:
            pids = (cgroup / "cgroup.procs").read_text().split()
        except OSError:
            return
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.005)


def _make_cgroups(setup: _Setup, limits: SandboxLimits) -> list[Path]:
    made: list[Path] = []
    try:
        for controller, parent in setup.cgroups:
            cgroup = parent / f"evr1-box-{os.getpid()}-{secrets.token_hex(4)}"
            cgroup.mkdir()
            made.append(cgroup)
            if controller == "memory":
                memory = str(limits.memory_mb << 20)
                (cgroup / "memory.limit_in_bytes").write_text(memory)
                if (cgroup / "memory.memsw.limit_in_bytes").exists():  # no escape to swap
                    (cgroup / "memory.memsw.limit_in_bytes").write_text(memory)
            else:
                (cgroup / "pids.max").write_text(str(limits.max_processes))
    except OSError as exc:
        _remove_cgroups(made)
        raise SandboxUnavailable(f"could not set up the box's cgroup: {exc}") from exc
    return made


def _remove_cgroups(cgroups: Sequence[Path]) -> None:
    for cgroup in cgroups:
        for _ in range(100):
            try:
                cgroup.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:  # processes still exiting
                _kill_cgroup(cgroup)
                time.sleep(0.01)
        else:
            logger.warning("could not remove the sandbox cgroup %s", cgroup)


# --------------------------------------------------------------------------- reading back


def _parse(data: bytes, n_tests: int, n_probes: Sequence[int]
           ) -> list[list[tuple[bool, Any]] | None]:
    """Each test's probe values from the box's JSON lines; None where none came back.

    Anything malformed counts as missing (the code may print what it likes); the first line
    for a test wins.
    """
    values: list[list[tuple[bool, Any]] | None] = [None] * n_tests
    for raw in data.split(b"\n")[:-1]:  # the last piece is incomplete or empty
        try:
            line = json.loads(raw)
            i, items = line["t"], line["v"]
        except (ValueError, TypeError, KeyError, RecursionError):
            continue
        if not (type(i) is int and 0 <= i < n_tests and values[i] is None and
                isinstance(items, list) and len(items) == n_probes[i]):
            continue
        decoded = []
        for item in items:
            try:
                ok, value = item
                decoded.append((True, _decode(value)) if ok == 1 else (False, None))
            except (ValueError, TypeError, RecursionError):
                decoded.append((False, None))
        values[i] = decoded
    return values


def _decode(x: Any) -> Any:
    """The runner's plain-data encoding back to Python values (tuples, sets, bytes...)."""
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, list):
        return [_decode(v) for v in x]
    if isinstance(x, dict) and len(x) == 1:
        (tag, body), = x.items()
        if tag in ("tuple", "set", "frozenset") and isinstance(body, list):
            return {"tuple": tuple, "set": set, "frozenset": frozenset}[tag](
                _decode(v) for v in body)
        if tag == "dict" and isinstance(body, list):
            return {_decode(k): _decode(v) for k, v in body}
        if tag == "bytes" and isinstance(body, str):
            return bytes.fromhex(body)
        if tag == "complex" and isinstance(body, list):
            real, imag = body
            return complex(float(real), float(imag))
    raise ValueError("not the sandbox's encoding")
