#!/usr/bin/env bash
# One prepared run on the GPU test machine (the device tool's `run`), or the same steps on CPU.
#
#     tools/fetch_gpu_wheels.sh                      # here, once: the wheels into .whl/
#     tools/gpu_check.sh pipeline                    # there: run(command=..., carry=[".whl"])
#     tools/gpu_check.sh pipeline --cpu              # here: the same steps, tiny, on CPU
#     tools/gpu_check.sh pipeline --only bench       # a rerun of some parts (test,pipeline,bench)
#     tools/gpu_check.sh megatron [--cpu] [--only test,bench]
#
# Checks (one per issue that needs the GPU; add a `check_NAME` function and its name to both
# `case` statements below):
#   pipeline  tests/test_gpu.py (steps, checkpoint, exact resume, eval on CUDA), the whole
#             pipeline with configs/demo_gpu.yaml (preprocess -> train -> eval -> collect), and
#             benchmarks/cache_gpu.py (frames from shards vs decoded on the fly).
#   megatron  tests/test_gpu_megatron.py (megatron vs hf in bf16, GRPO steps, save + resume,
#             a distributed-optimizer step; issue 22) and benchmarks/megatron_step.py --gpu
#             (tokens/s and MFU of the ~1B shape, megatron and hf). Worst case ~6 min
#             (150 + 200 s, and the wheels' install: megatron-core is one of them).
#
# Every part runs under `timeout` and writes its log under $OUT (the folder the device tool
# brings back; at most 8 files), plus $OUT/report.md: machine, versions, each part's exit
# status and time, and the results. Worst case ~7.7 min (the timeouts below: 100 + 150 + 220 s,
# and the wheels' install), which leaves a 15-minute device budget room for a partial rerun.
# Nothing is written into the repository: runs go to a temporary folder.
set -uo pipefail

usage() { sed -n '2,9p' "$0"; exit 2; }
[ $# -ge 1 ] || usage
CHECK=$1; shift
CPU=0
ONLY=""
while [ $# -gt 0 ]; do
    case $1 in
        --cpu) CPU=1 ;;
        --only) ONLY=$2; shift ;;
        *) usage ;;
    esac
    shift
done

case $CHECK in
    pipeline|megatron) ;;
    *) echo "unknown check $CHECK (known: pipeline, megatron)" >&2; exit 2 ;;
esac

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/runs/gpu_check}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/evr1-gpu-check.XXXXXX)
REPORT=$OUT/report.md
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 WANDB_MODE=disabled
PY=${PYTHON:-python3}

# The carried wheels, when there are any (on the device machine; on CPU the venv has them).
if [ "$CPU" = 0 ] && ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$REPO"/.whl/*.whl || { echo "wheel install failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site:$REPO
else
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
fi

# On CPU (--cpu: tiny sizes, but 2 shared cores) the same parts get 4x the time.
SCALE=1
[ "$CPU" = 1 ] && SCALE=4

FAILED=""

wanted() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }

# part NAME TIMEOUT_S LOG COMMAND...: run, record status and seconds in the report.
part() {
    local name=$1 limit=$2 log=$3; shift 3
    local start=$SECONDS rc
    limit=$((limit * SCALE))
    echo "== $name (limit ${limit} s): $*" | tee -a "$REPORT"
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    local note=""
    [ $rc = 124 ] || [ $rc = 137 ] && note=" (TIMED OUT)"
    echo "   exit $rc$note after $((SECONDS - start)) s; log: $(basename "$log")" | tee -a "$REPORT"
    [ $rc = 0 ] || FAILED="$FAILED $name"
    return $rc
}

environment() {
    {
        echo "# tools/gpu_check.sh $CHECK$([ "$CPU" = 1 ] && echo ' --cpu') ($(date -u '+%F %T UTC'))"
        echo
        echo '```'
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 \
            | head -2 || true
        "$PY" - <<'EOF' 2>&1
import os, platform, torch, transformers
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda},"
      f" available: {torch.cuda.is_available()}), transformers {transformers.__version__} from "
      f"{os.path.dirname(transformers.__file__)}, {os.cpu_count()} CPUs")
try:
    import av
    print(f"PyAV {av.__version__}")
except ImportError as exc:
    print(f"PyAV missing: {exc}")
try:
    from importlib.metadata import version
    import megatron.core
    print(f"megatron-core {version('megatron-core')} from {os.path.dirname(megatron.core.__file__)}")
except Exception as exc:  # noqa: BLE001 - a report line, whatever the reason
    print(f"megatron-core missing: {exc}")
try:
    import transformer_engine
    print(f"Transformer Engine {transformer_engine.__version__}")
except Exception as exc:  # noqa: BLE001
    print(f"Transformer Engine: not used ({type(exc).__name__})")
EOF
        echo '```'
        echo
    } >"$REPORT"
}

check_pipeline() {
    local device=cuda
    [ "$CPU" = 1 ] && device=cpu
    if wanted test; then
        EVR1_GPU_TEST_DEVICE=$device part test 100 "$OUT/test.log" \
            "$PY" -m pytest "$REPO/tests/test_gpu.py" -m gpu -q -rs -p no:cacheprovider
        { echo '```'; tail -3 "$OUT/test.log"; echo '```'; } >>"$REPORT"
    fi
    if wanted pipeline; then
        # The config's paths are relative: run it from the work folder.
        local extra=()
        [ "$CPU" = 1 ] && extra=(model.device=cpu eval.device=cpu curate.device=cpu
                                 launch.gpus_per_node=0 train.steps=4 train.save_every=2
                                 synthetic.num_videos=6 train.eval_samples=8)
        (cd "$WORK" && part pipeline 150 "$OUT/pipeline.log" "$PY" \
            "$REPO/launchers/pipeline.py" --config "$REPO/configs/demo_gpu.yaml" "${extra[@]}")
        {
            echo '```'
            grep -E "^\[heldout|held-out accuracy|pipeline done|Error|error|Traceback" \
                "$OUT/pipeline.log" | tail -12
            echo '```'
        } >>"$REPORT"
        local results="$WORK/runs/demo_gpu/eval/results.md"
        [ -f "$results" ] && { sed -n '1,20p' "$results"; echo; } >>"$REPORT"
        local metrics="$WORK/runs/demo_gpu/metrics.jsonl"
        [ -f "$metrics" ] && "$PY" - "$metrics" >>"$REPORT" 2>&1 <<'EOF'
import json, statistics, sys
rows = [json.loads(x) for x in open(sys.argv[1])]
train = [r for r in rows if r["kind"] == "train"]
held = [r for r in rows if r["kind"] == "heldout"]
steps = [r["time_step"] for r in train[1:]] or [0.0]
print(f"\ntraining: {len(train)} steps, median step {statistics.median(steps):.3f} s; held-out "
      "accuracy " + " -> ".join(f"{r['accuracy']:.2f} (step {r['step']})" for r in held) + "\n")
EOF
    fi
    if wanted bench; then
        # --time-budget: fewer timed steps rather than a kill at the limit. BENCH_ARGS adds
        # options for a rerun, e.g. BENCH_ARGS="--n 2 --clips 4".
        local bench=(--time-budget $((190 * SCALE)))
        [ "$CPU" = 1 ] && bench+=(--tiny)
        # shellcheck disable=SC2206
        bench+=(${BENCH_ARGS:-})
        part bench 220 "$OUT/bench.log" "$PY" "$REPO/benchmarks/cache_gpu.py" "${bench[@]}" \
            --workdir "$WORK/bench" --out "$OUT/cache_gpu.md"
        [ -f "$OUT/cache_gpu.md" ] && { echo; cat "$OUT/cache_gpu.md"; } >>"$REPORT"
    fi
}

check_megatron() {
    local device=cuda
    [ "$CPU" = 1 ] && device=cpu
    if wanted test; then
        EVR1_GPU_TEST_DEVICE=$device part test 150 "$OUT/test.log" \
            "$PY" -m pytest "$REPO/tests/test_gpu_megatron.py" -m gpu -q -rs -p no:cacheprovider
        { echo '```'; grep -E "PASS|FAIL|SKIP|Error|error" "$OUT/test.log" | tail -12
          tail -3 "$OUT/test.log"; echo '```'; } >>"$REPORT"
    fi
    if wanted bench; then
        local bench=(--gpu --steps 3)
        [ "$CPU" = 1 ] && bench+=(--tiny --steps 1)
        # shellcheck disable=SC2206
        bench+=(${BENCH_ARGS:-})
        part bench 200 "$OUT/bench.log" "$PY" "$REPO/benchmarks/megatron_step.py" "${bench[@]}"
        { echo; echo '```'; tail -8 "$OUT/bench.log"; echo '```'; } >>"$REPORT"
    fi
}

environment
case $CHECK in
    pipeline) check_pipeline ;;
    megatron) check_megatron ;;
esac
rm -rf "$WORK"
echo "report: $REPORT"
cat "$REPORT"
if [ -n "$FAILED" ]; then
    echo "FAILED:$FAILED" | tee -a "$REPORT"
    exit 1
fi
