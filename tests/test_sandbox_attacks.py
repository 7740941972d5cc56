"""Attacks on the code reward by model-written code (issue #24): each one must fail, and honest
code must still score what it deserves, in the same test.

They run the real sandbox (bubblewrap, namespaces, cgroups). They skip only where ``bwrap``
is not installed; CI installs it (.ci/run).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from evr1.config import RewardConfig
from evr1.rewards import InvalidSolution, SandboxUnavailable, check_items, score, score_batch
from evr1.rewards import sandbox as sandbox_mod
from evr1.rewards.asserts import passes, plan_test
from evr1.rewards.sandbox import SandboxLimits, require_sandbox, run_tests

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None,
                                reason="bubblewrap (bwrap) is not installed: "
                                       "apt-get install bubblewrap")

HONEST = "def add(a, b):\n    return a + b\n"
TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add('a', 'b') == 'ab'"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def sandbox_works():
    require_sandbox()  # bwrap is here: the sandbox must work, not skip


def accuracy(code: str, tests=TESTS, **kwargs) -> float:
    answer = f"<answer>```python\n{code}\n```</answer>"
    return score("code", answer, HONEST, tests=tests, code_execution=True, **kwargs).accuracy


def honest_still_scores() -> None:
    assert accuracy(HONEST) == 1.0
    # right for (1, 2) only: wrong for (-1, 1), and 'a' < 0 raises
    half = "def add(a, b):\n    return a - b if a < 0 else a + b\n"
    assert accuracy(half) == pytest.approx(1 / 3)


def processes_with(mark: str) -> list[int]:
    """Host processes whose command line holds ``mark``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if mark.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.fixture
def bystander():
    """A process of the trainer's user that model code must not be able to kill."""
    proc = subprocess.Popen(["sleep", "120"])
    yield proc
    proc.kill()
    proc.wait()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and \
        "zombie" not in Path(f"/proc/{pid}/status").read_text()


# --------------------------------------------------------------------------- the trainer


def test_code_cannot_kill_the_trainer_or_its_processes(bystander):
    pids = [os.getpid(), os.getppid(), bystander.pid]
    code = ("import os, posix, signal\n"
            f"for pid in {pids} + [posix.getppid(), 1]:\n"
            "    for kill in (posix.kill, os.kill):\n"
            "        try:\n"
            "            kill(pid, signal.SIGKILL)\n"
            "        except Exception:\n"
            "            pass\n"
            f"for pgid in {pids}:\n"
            "    try:\n"
            "        os.killpg(pgid, signal.SIGKILL)\n"
            "    except Exception:\n"
            "        pass\n" + HONEST)
    assert accuracy(code) == 1.0  # pid 1 of the box ignores it; the host pids are not visible
    assert alive(bystander.pid) and alive(os.getppid())
    # Its own process group: the box dies, the trainer does not.
    assert accuracy(HONEST + "import os, signal\nos.killpg(0, signal.SIGKILL)\n") == 0.0
    assert alive(bystander.pid)
    honest_still_scores()


def test_code_cannot_break_the_scoring_pool():
    kill_parent = "import posix\nposix.kill(posix.getppid(), 9)\n" + HONEST
    items = [{"problem_type": "code", "response": f"<answer>{code}</answer>",
              "solution": HONEST, "tests": TESTS} for code in (kill_parent, HONEST) * 3]
    cfg = RewardConfig(code_execution=True, num_workers=2)
    try:
        batch = score_batch(items, cfg)  # BrokenProcessPool before the fix
        again = score_batch(items, cfg)
    finally:
        import evr1.rewards as rewards

        rewards.shutdown_pool()
    assert [r.accuracy for r in batch.results] == [1.0] * 6  # killing init is ignored
    assert again.results == batch.results


# --------------------------------------------------------------------------- processes


def test_fork_bomb_is_capped_and_cleaned_up():
    mark = f"evr1-bomb-{secrets.token_hex(4)}"
    code = ("import posix\n"
            "forked = 0\n"
            "for _ in range(200):\n"
            "    try:\n"
            "        pid = posix.fork()\n"
            "    except OSError:\n"
            "        break\n"
            "    if pid == 0:\n"
            f"        posix.execv('/bin/sleep', ['{mark}', '60'])\n"
            "    forked += 1\n" + HONEST)
    # forked counts what really ran; the cap is for the whole box (bwrap's two included).
    tests = TESTS + ["assert forked <= 16 - 3"]
    assert accuracy(code, tests) == 1.0
    assert processes_with(mark) == []
    honest_still_scores()


def test_fork_exec_of_a_shell_stays_in_the_box(bystander):
    token = secrets.token_hex(4)
    host_file = Path(f"/tmp/evr1-attack-{token}")
    script = (f"echo pwned > {host_file}; kill -9 {bystander.pid} {os.getpid()}; "
              f"cat /etc/shadow > /tmp/shadow-{token}")
    code = ("import _posixsubprocess, os, subprocess\n"
            f"done = subprocess.run(['/bin/sh', '-c', {script!r}]).returncode\n"
            f"os.system({script!r})\n" + HONEST)
    assert accuracy(code, TESTS + ["assert done is not None"]) == 1.0
    assert not host_file.exists() and not Path(f"/tmp/shadow-{token}").exists()
    assert alive(bystander.pid)
    honest_still_scores()


def test_setsid_children_do_not_outlive_the_box():
    mark = f"evr1-daemon-{secrets.token_hex(4)}"
    code = ("import os\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"  # a double-forked daemon, reparented to the box's init
            f"        os.execv('/bin/sleep', ['{mark}', '300'])\n"
            "    os._exit(0)\n"
            "import time\n"
            "time.sleep(0.3)\n" + HONEST)
    assert accuracy(code) == 1.0
    assert processes_with(mark) == []
    honest_still_scores()


@pytest.mark.skipif(os.geteuid() != 0, reason="as root, the box must drop to uid 65534")
def test_box_is_not_host_root():
    mark = f"evr1-uid-{secrets.token_hex(4)}"
    code = ("import subprocess\n"
            f"subprocess.run(['{mark}', '1'], executable='/bin/sleep')\n" + HONEST)
    result = []  # a 10 s wall clock: the code's own step gets 10 / 4 s
    thread = threading.Thread(target=lambda: result.append(accuracy(code, timeout_s=10)))
    thread.start()
    uids = set()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not uids:
        for pid in processes_with(mark):
            status = Path(f"/proc/{pid}/status").read_text()
            uids |= {line.split()[1] for line in status.splitlines()
                     if line.startswith("Uid:")}
        time.sleep(0.02)
    thread.join()
    assert uids == {"65534"}
    assert result == [1.0]


# --------------------------------------------------------------------------- files


def test_writes_stay_inside_the_box():
    token = secrets.token_hex(4)
    targets = [f"/tmp/evr1-attack-{token}", str(REPO / f"evr1-attack-{token}"),
               f"/work/evr1-attack-{token}", f"/usr/lib/evr1-attack-{token}",
               f"/root/evr1-attack-{token}", f"/etc/evr1-attack-{token}",
               f"/evr1-attack-{token}", f"/dev/evr1-attack-{token}"]  # bwrap's own tmpfs
    code = ("wrote = []\n"
            f"for path in {targets}:\n"
            "    try:\n"
            "        with open(path, 'w') as f:\n"
            "            f.write('x')\n"
            "        wrote.append(path)\n"
            "    except OSError:\n"
            "        pass\n" + HONEST)
    # Only its own /tmp is writable, and it is a private tmpfs gone with the box.
    assert accuracy(code, TESTS + [f"assert wrote == ['/tmp/evr1-attack-{token}']"]) == 1.0
    assert not any(Path(t).exists() for t in targets)
    # The writable tmpfs are size-limited too (16 MiB), also against many small files.
    fill = ("import os\n"
            "filled = []\n"
            "for folder in ('/tmp', '/dev/shm'):\n"
            "    try:\n"
            "        for i in range(64):\n"
            "            with open(f'{folder}/{i}', 'wb') as f:\n"
            "                f.write(b'0' * (1 << 20))\n"
            "        filled.append(folder)\n"
            "    except OSError:\n"
            "        pass\n" + HONEST)
    assert accuracy(fill, TESTS + ["assert filled == []"]) == 1.0
    honest_still_scores()


def test_host_secrets_are_not_readable(monkeypatch):
    monkeypatch.setenv("EVR1_TRAINER_SECRET", "hunter2")
    secrets_ = ["/etc/shadow", "/etc/passwd", "/root", "/home", str(REPO), "/work",
                f"/proc/{os.getpid()}/environ", f"/proc/{os.getppid()}/cmdline",
                str(REPO / "evr1/rewards/sandbox.py")]
    code = ("import os\n"
            "leaked = []\n"
            f"for path in {secrets_}:\n"
            "    try:\n"
            "        if os.path.isdir(path):\n"
            "            os.listdir(path)\n"
            "        else:\n"
            "            open(path, 'rb').read()\n"
            "        leaked.append(path)\n"
            "    except OSError:\n"
            "        pass\n"
            "env = dict(os.environ)\n"
            "pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n" + HONEST)
    tests = TESTS + ["assert leaked == []", "assert 'EVR1_TRAINER_SECRET' not in env",
                     "assert pids == [1, 2]"]  # bwrap's init and this Python: nothing else
    assert accuracy(code, tests) == 1.0
    honest_still_scores()


# --------------------------------------------------------------------------- network


def test_no_network_to_the_host():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    code = ("import socket\n"
            "reached = []\n"
            f"for host in ('127.0.0.1', 'localhost', '8.8.8.8'):\n"
            "    try:\n"
            f"        socket.create_connection((host, {port}), timeout=1).close()\n"
            "        reached.append(host)\n"
            "    except OSError:\n"
            "        pass\n" + HONEST)
    try:
        assert accuracy(code, TESTS + ["assert reached == []"]) == 1.0
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()
    honest_still_scores()


# --------------------------------------------------------------------------- the verdict


def test_frame_walking_and_fake_output_cannot_forge_passes():
    # What used to score 3/3: find the harness's secrets and print "passed" lines, by every
    # route: frames, the garbage collector, raw file descriptors.
    code = r'''
import gc, io, json, os, sys
fake = "".join(json.dumps({"t": i, "v": [[1, True]] * 4}) + "\n" for i in range(10))
frame = sys._getframe()
while frame is not None:
    for name, value in list(frame.f_locals.items()):
        if isinstance(value, dict) and "probes" in value:
            value["probes"] = [[] for _ in value["probes"]]
    frame = frame.f_back
for obj in gc.get_objects():
    if isinstance(obj, io.TextIOWrapper):
        try:
            obj.write(fake)
            obj.flush()
        except Exception:
            pass
for fd in range(64):
    try:
        os.write(fd, fake.encode())
    except OSError:
        pass
def add(a, b):
    return a * 100
'''
    assert accuracy(code, ["assert False", "assert False", "assert False"]) == 0.0
    assert accuracy(code) == 0.0
    honest_still_scores()


def test_always_equal_objects_score_nothing():
    always = ("class Eq:\n"
              "    def __eq__(self, other):\n        return True\n"
              "    def __ne__(self, other):\n        return False\n"
              "    __hash__ = object.__hash__\n")
    for cls, value in [("Eq", "Eq()"), ("int", "Int(0)"), ("str", "Str('')")]:
        sub = "" if cls == "Eq" else (
            f"class {cls.title()}({cls}):\n"
            "    def __eq__(self, other):\n        return True\n"
            "    def __ne__(self, other):\n        return False\n"
            f"    __hash__ = {cls}.__hash__\n")
        code = always + sub + f"def add(a, b):\n    return {value}\n"
        assert accuracy(code) == 0.0, cls
    # Patching the encoder in the box does not help: only plain JSON comes out.
    patched = always + ("import builtins, json\n"
                        "builtins.type = lambda x: int\n"
                        "json.dumps = lambda *a, **k: '{\"t\": 0, \"v\": [[1, 3]]}'\n"
                        "def add(a, b):\n    return Eq()\n")
    assert accuracy(patched) <= 1 / 3  # at most the one value it claimed (3 for test 0)
    honest_still_scores()


def test_expected_values_never_enter_the_box():
    plan = plan_test("assert add(1, 2) == [0, 1, 4] + [42]")
    assert plan.probes == ("add(1, 2)",)  # the expected side is evaluated outside
    # An expected side the check cannot evaluate is refused, not sent to the box (where the
    # answer's code could choose its value).
    with pytest.raises(InvalidSolution, match="ListComp"):
        plan_test("assert add(1, 2) == [x * x for x in range(3)] + [42]")
    # No string in the box (the job it was sent included) holds the expected value (the code
    # spells it 7900 + 19, so that its own source does not).
    code = ("import gc\n"
            "wanted = str(7900 + 19)\n"
            "seen = any(wanted in o for o in gc.get_objects()\n"
            "           if type(o) is str and o is not wanted)\n"
            "def add(a, b):\n    return [0, 1, 4, 7900 + 19] if seen else None\n")
    test = "assert add(1, 2) == [0, 1, 4] + [7919]"
    assert accuracy(code, [test]) == 0.0
    assert accuracy(code.replace(" if seen else None", ""), [test]) == 1.0
    honest_still_scores()


def test_the_check_is_python_semantics_on_plain_values():
    def check(test, *values):
        return passes(plan_test(test), [(True, v) for v in values])

    assert check("assert f(1) == 3", 3) and check("assert f(1) == 3", 3.0)
    assert not check("assert f(1) == (1, 2)", [1, 2])  # a tuple is not a list
    assert check("assert sorted(f(1), reverse=True) == [2, 1]", {2, 1})
    assert plan_test("assert sorted(f(1)) == [1, 2]").probes == ("sorted(f(1))",)  # whole
    assert check("assert abs(f(1) - 0.3) < 1e-9", 0.1 + 0.2)
    assert check("assert math.isclose(f(1), 0.3)", 0.30000000000000004)
    assert check("assert f(1)", [0]) and not check("assert f(1)", [])
    assert check("assert not f(1)", None)
    assert check("assert f(1) is None", None)
    assert check("assert len(f('ab')) == 2 and f('ab')[0] == 'a'", 2, "ab")  # len(...) whole
    assert check("assert f(1) == 1 or g(2)", 1, 0)
    # a probe that raised fails the test only when its value is needed, as in Python
    plan = plan_test("assert f(1) == 1 or g(2)")
    assert passes(plan, [(True, 1), (False, None)])
    assert not passes(plan, [(True, 0), (False, None)])
    # values from the box cannot make the check blow up the trainer
    assert not check("assert 'a' * f(1) == ''", 10 ** 12)
    assert not check("assert 2 ** f(1) > 0", 10 ** 9)
    assert not check("assert 1 << f(1) > 0", 10 ** 12)
    assert not check("assert f(1) % 1 == ''", "%0999999999d")
    assert not check("assert round(f(1), f(2)) == 0", 10 ** 30, -10 ** 9)
    assert check("assert f(1) == 64 << 20", 64 << 20)
    for bad in ("x = 1", "assert f(1) == 1\nassert f(2) == 2", "import os",
                "assert f(1) == [i for i in range(3)]", "assert (lambda: 1)() == f(1)"):
        with pytest.raises(InvalidSolution):
            plan_test(bad)
    # Parts that would carry test data into the box next to the answer's values are refused:
    # there the code would only have to claim True (or 0, or []).
    for mixed in ("assert all(f(x) == y for x, y in [(1, 2), (3, 4)])",
                  "assert sum(abs(f(x) - y) for x, y in [(1, 2)]) < 1e-9",
                  "assert [f(x) for x, y in [(1, 2)] if f(x) != y] == []",
                  "assert (y := f(1)) == 3"):
        with pytest.raises(InvalidSolution, match="mixes the answer's code"):
            plan_test(mixed)
    assert plan_test("assert [f(i) for i in range(3)] == [0, 1, 4]").probes == \
        ("[f(i) for i in range(3)]",)
    assert plan_test("assert Stack().push(1).items[0] == 1").probes == \
        ("Stack().push(1).items",)  # the subscript is taken outside, on plain data


# --------------------------------------------------------------------------- limits


def test_forked_children_share_one_memory_limit():
    # 4 children hold 100 MB each (pages written); the box has 256 MB in all, so at most 2
    # can hold theirs at once (with Python itself ~10 MB, a third would pass 256).
    code = ("import os, select, time\n"
            "r, w = os.pipe()\n"
            "for _ in range(4):\n"
            "    if os.fork() == 0:\n"
            "        try:\n"
            "            open('/proc/self/oom_score_adj', 'w').write('1000')\n"  # OOM: us first
            "            block = bytearray(b'x' * (100 << 20))\n"
            "            os.write(w, b'1')\n"
            "            time.sleep(30)\n"
            "        finally:\n"
            "            os._exit(0)\n"
            "held, deadline = 0, time.monotonic() + 2\n"
            "while held < 4 and time.monotonic() < deadline:\n"
            "    if select.select([r], [], [], 0.1)[0]:\n"
            "        held += len(os.read(r, 4))\n" + HONEST)
    # 20 s: the code's step (a quarter of it) must cover its 2 s wait on a loaded machine
    cfg = RewardConfig(code_execution=True, sandbox_memory_mb=256, timeout_s=20)
    answer = f"<answer>```python\n{code}\n```</answer>"
    r = score("code", answer, HONEST, tests=TESTS + ["assert held <= 2"], cfg=cfg)
    assert r.accuracy == 1.0
    honest_still_scores()


def test_output_flood_is_cut():
    # Every pipe it has, the runner's result pipe included (stdout itself is /dev/null).
    flood = ("import os, stat\n"
             "for fd in range(64):\n"
             "    try:\n"
             "        if stat.S_ISFIFO(os.fstat(fd).st_mode):\n"
             "            while True:\n"
             "                os.write(fd, b'x' * 65536)\n"
             "    except OSError:\n"
             "        pass\n" + HONEST)
    t0 = time.perf_counter()
    r = run_tests(flood, TESTS, SandboxLimits(wall_s=10))
    assert time.perf_counter() - t0 < 5  # cut at output_kb, not at the wall clock
    assert r.overflowed and r.passed == 0
    print_flood = "for _ in range(100000):\n    print('x' * 100)\n" + HONEST  # dropped
    assert run_tests(print_flood, TESTS).passed == 3
    honest_still_scores()


def test_infinite_loops_are_cut_at_the_wall_clock():
    t0 = time.perf_counter()
    r = run_tests("while True:\n    pass\n" + HONEST, TESTS, SandboxLimits(wall_s=1.5))
    assert r.passed == 0 and time.perf_counter() - t0 < 4
    # A test that ignores the per-test alarm runs until the whole box is killed; the tests
    # answered before it still count.
    code = ("import signal\n"
            "def spin():\n"
            "    signal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
            "    while True:\n"
            "        pass\n" + HONEST)
    t0 = time.perf_counter()
    r = run_tests(code, ["assert add(1, 2) == 3", "assert spin()", "assert add(1, 1) == 2"],
                  SandboxLimits(wall_s=1.5))
    assert time.perf_counter() - t0 < 4
    assert r.timed_out and r.passed == 1
    honest_still_scores()


def test_no_new_namespaces_in_the_box():
    code = ("import ctypes\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "rc = libc.unshare(0x10000000)\n" + HONEST)  # CLONE_NEWUSER
    assert accuracy(code, TESTS + ["assert rc == -1"]) == 1.0
    honest_still_scores()


# --------------------------------------------------------------------------- refusing to start


def test_missing_bwrap_refuses_with_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(sandbox_mod, "_SETUPS", {})
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        require_sandbox()
    item = {"problem_type": "code", "solution": HONEST, "tests": TESTS}
    with pytest.raises(SandboxUnavailable):  # before training: check_items
        check_items([item], RewardConfig(code_execution=True))
    with pytest.raises(SandboxUnavailable):  # never a silent 0 (or an unsandboxed run)
        score_batch([{**item, "response": HONEST}], RewardConfig(code_execution=True))
    check_items([item], RewardConfig(code_execution=False))  # similarity needs no sandbox
    assert score("code", HONEST, HONEST, tests=TESTS).accuracy == 1.0


def test_without_cgroups_it_refuses_unless_rlimit_is_chosen(monkeypatch, tmp_path):
    monkeypatch.setattr(sandbox_mod, "_SETUPS", {})
    monkeypatch.setattr(sandbox_mod, "CGROUP_ROOT", tmp_path)  # nothing writable there
    with pytest.raises(SandboxUnavailable, match="sandbox_limits=rlimit"):
        accuracy(HONEST)
    cfg = RewardConfig(code_execution=True, sandbox_limits="rlimit")
    bomb = ("import posix\nforked = 0\n"
            "for _ in range(200):\n"
            "    try:\n"
            "        if posix.fork() == 0:\n"
            "            import time\n"
            "            time.sleep(5)\n"
            "            posix._exit(0)\n"
            "    except OSError:\n"
            "        break\n"
            "    forked += 1\n" + HONEST)
    big = "x = bytearray(2 << 30)\n" + HONEST
    for code, tests, expected in [(HONEST, TESTS, 1.0),
                                  (bomb, TESTS + ["assert forked < 16"], 1.0),
                                  (big, TESTS, 0.0)]:
        answer = f"<answer>{code}</answer>"
        assert score("code", answer, HONEST, tests=tests, cfg=cfg).accuracy == expected


def test_bad_tests_are_found_before_training():
    items = [{"problem_type": "code", "solution": HONEST, "tests": TESTS},
             {"problem_type": "code", "solution": HONEST, "tests": ["import os"]}]
    with pytest.raises(InvalidSolution, match="sample b.*not a single `assert"):
        check_items(items, RewardConfig(code_execution=True), names=["a", "b"])
    check_items(items[:1], RewardConfig(code_execution=True))
    honest_still_scores()


def test_signals_from_the_trainer_side_still_clean_up():
    # The trainer is killed mid-run: --die-with-parent takes the box down with it.
    mark = f"evr1-orphan-{secrets.token_hex(4)}"
    box_code = f"import subprocess\nsubprocess.run(['{mark}', '60'], executable='/bin/sleep')"
    script = ("from evr1.rewards.sandbox import run_tests, SandboxLimits\n"
              f"run_tests({box_code!r}, ['assert True'], SandboxLimits(wall_s=60))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    trainer = subprocess.Popen([os.path.realpath(os.sys.executable), "-c", script], env=env)
    deadline = time.monotonic() + 20
    while not processes_with(mark) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with(mark), "the box did not start"
    trainer.send_signal(signal.SIGKILL)
    trainer.wait()
    deadline = time.monotonic() + 5
    while processes_with(mark) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with(mark) == []
    honest_still_scores()


def test_training_with_code_problems_stops_at_start_without_the_sandbox(monkeypatch, tmp_path):
    from conftest import small_config

    from evr1.pipeline import stages
    from evr1.train.build import trainer_from_config

    records = [{"id": f"add-{i}", "problem_type": "code", "data_type": "text",
                "problem": "Write add(a, b).", "solution": HONEST,
                "meta": {"reward_kwargs": {"tests": tests}}}
               for i, tests in enumerate([TESTS, "\n".join(TESTS)])]
    jsonl = tmp_path / "code.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = small_config(tmp_path, f"data.train_jsonl={jsonl}", "data.eval_jsonl=",
                       "reward.code_execution=true", "model.tiny=true", "data.include_tasks=[]")
    assert stages.preprocess_sequential(cfg) == 0  # text only: an empty set of shards
    monkeypatch.setattr(sandbox_mod, "_SETUPS", {})
    monkeypatch.setattr(sandbox_mod.shutil, "which",
                        lambda name, *a, **k: None if name == "bwrap" else shutil.which(name))
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        trainer_from_config(cfg)  # while its data is checked, before any model is built
    monkeypatch.undo()
    records[1]["meta"]["reward_kwargs"]["tests"] = ["import os"]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(InvalidSolution, match="sample add-1"):
        trainer_from_config(cfg)


@pytest.fixture
def python_outside_usr():
    """An interpreter installed under its own prefix (like pyenv or conda), readable by uid
    65534: Debian's binary and links to its standard library, plus a site-packages module and
    a file beside them that the box must not see. /var/tmp: the box's /tmp is its own."""
    import tempfile

    if not Path("/usr/bin/python3.11").exists():
        pytest.skip("needs Debian's /usr/bin/python3.11 to build a prefix from")
    root = Path(tempfile.mkdtemp(prefix="evr1-python-", dir="/var/tmp"))
    try:
        stdlib = root / "lib/python3.11"
        (stdlib / "site-packages").mkdir(parents=True)
        (root / "bin").mkdir()
        shutil.copy2("/usr/bin/python3.11", root / "bin/python3.11")
        for entry in Path("/usr/lib/python3.11").iterdir():
            if entry.name not in ("site-packages", "dist-packages"):
                (stdlib / entry.name).symlink_to(entry)
        (stdlib / "site-packages/evil.py").write_text("x = 1\n")
        (root / "secret.txt").write_text("secret\n")
        for path in [root, *root.rglob("*")]:
            if not path.is_symlink():
                path.chmod(0o755)
        yield root
    finally:
        shutil.rmtree(root)


def test_interpreter_outside_usr_shows_only_its_standard_library(python_outside_usr):
    root = python_outside_usr
    code = ("import os, sys\n"
            "prefix = sys.prefix\n"
            "sys.path.append(prefix + '/lib/python3.11/site-packages')\n"
            "try:\n"
            "    import evil\n"
            "    imported = True\n"
            "except ImportError:\n"
            "    imported = False\n"
            "beside = os.path.exists(prefix + '/secret.txt')\n" + HONEST)
    tests = TESTS + [f"assert prefix == {str(root)!r}", "assert not imported",
                     "assert not beside"]
    cfg = RewardConfig(code_execution=True, sandbox_python=str(root / "bin/python3.11"))
    answer = f"<answer>```python\n{code}\n```</answer>"
    assert score("code", answer, HONEST, tests=tests, cfg=cfg).accuracy == 1.0
    honest_still_scores()
