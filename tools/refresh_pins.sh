#!/usr/bin/env bash
# Refresh constraints.txt: resolve setup.py's ranges (with the dev extra) to today's releases
# in a new virtual environment, and record every installed version.
#
#   tools/refresh_pins.sh            (then run the README's test command, and commit)
#
# Environment: PYTHON (the interpreter the project is tested with, default python3.12).
# The versions written are what pip resolves on this machine: a pip configuration that caps
# versions (pip config list) applies here as everywhere.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3.12}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

"$PYTHON" -m venv "$WORK/venv"
PIP=("$WORK/venv/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip
"${PIP[@]}" install -q -e "$REPO[dev]"
{
    echo "# The versions CI tested (.ci/run installs with them; the README's commands too)."
    echo "# Made by tools/refresh_pins.sh with $("$WORK/venv/bin/python" -V) on $(date -u +%F)."
    echo "# Installing against a site's own torch: README, \"Installs are pinned\"."
    "${PIP[@]}" freeze --exclude-editable
} > "$WORK/constraints.txt"
mv "$WORK/constraints.txt" "$REPO/constraints.txt"
echo "wrote $REPO/constraints.txt ($(grep -vc '^#' "$REPO/constraints.txt") packages)"
