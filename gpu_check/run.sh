#!/usr/bin/env bash
# GPU check of spngd_ds on a machine with one NVIDIA GPU, python 3.12, a CUDA torch (and
# torchvision) and no internet. See gpu_check/README.md.
#
#   bash gpu_check/run.sh             # on the GPU machine, from the repository's copy there
#   bash gpu_check/run.sh --dry-run   # anywhere (CPU_ONLY=1 does the same): nothing installed, on the CPU
#
# Steps, each with its own time limit (450 s together); a failed step is recorded and the next
# one still runs:
#   wheels      install .whl/*.whl (gpu_check/fetch_wheels.sh) with --no-deps into $SITE
#   env         gpu_check/check_env.py: requirements inside their ranges, a GPU visible
#   cuda-tests  python -m pytest -m cuda tests/deepspeed/test_cuda.py
#   syncs       gpu_check/measure.py syncs: host synchronisations of SP-NGD and SGD steps
#   timing      gpu_check/measure.py timing: ResNet-50 bf16 step times, SP-NGD against SGD
# STEPS="syncs timing" runs only the steps named. Logs and results go to $OUT if set, else
# gpu_check/out/ (at most 7 files). The last line is "GPU CHECK OK" or "GPU CHECK FAILED: <steps>";
# the exit status is 0 only when every step that ran passed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=${CPU_ONLY:-0}
[[ "${1:-}" == "--dry-run" ]] && DRY=1
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/spngd_site}
OUTDIR=${OUT:-$ROOT/gpu_check/out}
mkdir -p "$OUTDIR"
for f in env cuda_tests syncs timing; do : >"$OUTDIR/$f.log"; done
export WANDB_MODE=disabled PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
START=$SECONDS
passed=()
failed=()

# run_step NAME LIMIT_S LOG COMMAND...: run COMMAND under a time limit (on the CPU of a dry run,
# 900 s: a shared CPU can be slow), output to the screen and LOG; skipped when STEPS omits NAME
run_step() {
    local name=$1 limit=$2 log=$3
    shift 3
    if [[ -n "${STEPS:-}" && " $STEPS " != *" $name "* ]]; then
        return 0
    fi
    [[ "$DRY" == 1 ]] && limit=900
    echo
    echo "== $name (limit ${limit} s): $*" | tee -a "$log"
    local t0=$SECONDS
    if declare -F "$1" >/dev/null; then  # a function of this script: it limits itself
        "$@" 2>&1 | tee -a "$log"
    else
        timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
    fi
    local rc=${PIPESTATUS[0]}
    local note="rc=$rc"
    [[ $rc == 124 || $rc == 137 ]] && note="timed out after ${limit} s"
    echo "== $name: $([[ $rc == 0 ]] && echo passed || echo "FAILED ($note)") in $((SECONDS - t0)) s" | tee -a "$log"
    if [[ $rc == 0 ]]; then passed+=("$name"); else failed+=("$name"); fi
    return 0
}

install_wheels() {
    shopt -s nullglob
    local wheels=(.whl/*.whl)
    if (( ${#wheels[@]} == 0 )); then
        echo "no wheels in .whl/: run gpu_check/fetch_wheels.sh where there is internet and copy .whl/ along" >&2
        return 2
    fi
    timeout 30 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
}

if [[ "$DRY" == 1 ]]; then
    MEASURE_ARGS=(--dry-run)
    echo "== dry run: nothing installed; every step on the CPU at tiny sizes" | tee -a "$OUTDIR/env.log"
    run_step env 120 "$OUTDIR/env.log" "$PY" gpu_check/check_env.py --cpu-ok
else
    MEASURE_ARGS=()
    run_step wheels 30 "$OUTDIR/env.log" install_wheels
    export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/spngd_torch_extensions}
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUTDIR/env.log"
    run_step env 40 "$OUTDIR/env.log" "$PY" gpu_check/check_env.py
fi
run_step cuda-tests 150 "$OUTDIR/cuda_tests.log" \
    "$PY" -m pytest -q -p no:cacheprovider -m cuda -rs tests/deepspeed/test_cuda.py
if [[ "$DRY" == 0 ]] && grep -qs "^SKIPPED" "$OUTDIR/cuda_tests.log"; then
    echo "cuda tests were skipped on the GPU machine" | tee -a "$OUTDIR/cuda_tests.log"
    failed+=("cuda-tests-skipped")
fi
run_step syncs 90 "$OUTDIR/syncs.log" "$PY" gpu_check/measure.py syncs --out "$OUTDIR" "${MEASURE_ARGS[@]}"
run_step timing 140 "$OUTDIR/timing.log" "$PY" gpu_check/measure.py timing --out "$OUTDIR" "${MEASURE_ARGS[@]}"

{
    echo "GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), $((SECONDS - START)) s$([[ "$DRY" == 1 ]] && echo ", dry run")"
    echo "passed: ${passed[*]:-none}"
    echo "failed: ${failed[*]:-none}"
    grep -hE "^(=+ )?[0-9]+ (passed|failed|skipped|deselected|errors?)\b" \
        "$OUTDIR/cuda_tests.log" 2>/dev/null | tail -n 1
    sed -n '/^step /,/^syncs: /p' "$OUTDIR/syncs.log" 2>/dev/null
    sed -n '/ a micro-batch x /,/^timing: /p' "$OUTDIR/timing.log" 2>/dev/null
} >"$OUTDIR/summary.txt"
echo
cat "$OUTDIR/summary.txt"
echo
if (( ${#failed[@]} == 0 )); then
    echo "GPU CHECK OK"
else
    echo "GPU CHECK FAILED: ${failed[*]}"
    exit 1
fi
