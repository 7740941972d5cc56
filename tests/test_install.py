"""The install is reproducible: constraints.txt pins what setup.py asks for, within its ranges,
and CI runs the README's test command as written."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _setup_requirements() -> list[Requirement]:
    """install_requires and the dev extra, read from setup.py's source (not executed)."""
    call = next(node for node in ast.walk(ast.parse((ROOT / "setup.py").read_text()))
                if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords
              if k.arg in ("install_requires", "extras_require")}
    return [Requirement(r) for r in kwargs["install_requires"] + kwargs["extras_require"]["dev"]]


def _pins() -> dict[str, Version]:
    pins = {}
    for number, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        assert match, f"constraints.txt:{number}: not a name==version pin: {line!r}"
        pins[canonicalize_name(match[1])] = Version(match[2])
    return pins


def test_constraints_pin_every_requirement_within_its_range():
    pins = _pins()
    assert "evr1" not in pins  # the project itself is installed from the checkout
    for req in _setup_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt has no pin for {req.name} (tools/refresh_pins.sh)"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"constraints.txt pins {req.name}=={pins[name]}, outside setup.py's {req}"


def _set_up_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Set up\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)[:2]


def test_readme_commands_install_the_pins_and_ci_runs_the_test_command():
    demo, tests = _set_up_commands()
    for command in (demo, tests):
        assert "\n" not in command and "python3.12 -m venv .venv" in command
        assert "pip install -c constraints.txt -e " in command
    assert tests.endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci, "the README's test command is not in .ci/run verbatim"
    assert "rm -rf .venv" in ci  # a new venv, not what the machine has
