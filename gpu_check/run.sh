#!/usr/bin/env bash
# GPU check of spngd_ds on a machine with one NVIDIA GPU, python 3.12, a CUDA torch and no internet.
#
#   gpu_check/fetch_wheels.sh     # first, on a machine with internet: wheels into .whl/
#   gpu_check/run.sh              # on the GPU machine, from the repository's copy there
#   gpu_check/run.sh --dry-run    # anywhere (CPU_ONLY=1 does the same): installs nothing, the cuda
#                                 # tests skip, step_time.py's flags are checked, the job runs on CPU
#
# Steps: (1) install the carried wheels with --no-deps into $SITE (the machine's torch stays),
# (2) check every spngd_ds requirement is installed inside its range and a GPU is visible,
# (3) the pytest tests marked cuda (tests/test_cuda.py: NCCL on one rank, the SP-NGD step on the GPU
# against the CPU, bf16 at ZeRO 0-3, fp16 at ZeRO 1-3), (4) bench/step_time.py on ResNet-50 at
# 224x224, (5) the default job (ds_configs/digits_cpu.json, W&B off) for $JOB_STEPS steps.
# Logs and results go to $OUT (the device tool's folder) or gpu_check/out/. Ends with "GPU CHECK OK".
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=${CPU_ONLY:-0}
[[ "${1:-}" == "--dry-run" ]] && DRY=1
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/spngd_site}
OUTDIR=${OUT:-$ROOT/gpu_check/out}
JOB_STEPS=${JOB_STEPS:-5}
STEP_TIME_ARGS=(--model resnet50 --image_size 224 --micro_batch 32 --warmup 5 --steps 50 --steps_off 10 --profile_steps 0)
mkdir -p "$OUTDIR"
export WANDB_MODE=disabled PYTHONUNBUFFERED=1 SPNGD_CHECK_AGREEMENT=${SPNGD_CHECK_AGREEMENT:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
step() { echo; echo "== $*"; }
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

if [[ "$DRY" == 1 ]]; then
    step "dry run: nothing installed; GPU steps run on the CPU where they can"
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
    step "install the carried wheels (.whl/) into $SITE, without dependencies"
    shopt -s nullglob
    wheels=(.whl/*.whl)
    if (( ${#wheels[@]} == 0 )); then
        echo "no wheels in .whl/: run gpu_check/fetch_wheels.sh where there is internet, and carry .whl" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
    export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/spngd_torch_extensions}
fi

step "environment"
env_args=()
[[ "$DRY" == 1 ]] && env_args=(--cpu-ok)
"$PY" gpu_check/check_env.py "${env_args[@]}" 2>&1 | tee "$OUTDIR/env.txt"

step "pytest -m cuda"
"$PY" -m pytest -q -p no:cacheprovider -m cuda -rs tests 2>&1 | tee "$OUTDIR/pytest_cuda.txt"
if [[ "$DRY" == 0 ]] && grep -q "^SKIPPED .*tests/test_cuda.py" "$OUTDIR/pytest_cuda.txt"; then
    echo "cuda tests were skipped on the GPU machine" >&2
    exit 1
fi
grep -Eq "[0-9]+ (passed|skipped)" "$OUTDIR/pytest_cuda.txt"

step "bench/step_time.py ${STEP_TIME_ARGS[*]}"
if [[ "$DRY" == 1 ]]; then  # ResNet-50 at 224x224 is for the GPU; here, check that the flags exist
    help=$("$PY" bench/step_time.py --help)
    for arg in "${STEP_TIME_ARGS[@]}"; do
        if [[ "$arg" == --* ]] && ! grep -q -- "$arg" <<<"$help"; then
            echo "bench/step_time.py has no flag $arg" >&2
            exit 1
        fi
    done
    echo "step_time.py takes: ${STEP_TIME_ARGS[*]}"
else
    "$PY" -m torch.distributed.run --nproc_per_node 1 --master_port "$(free_port)" bench/step_time.py \
        "${STEP_TIME_ARGS[@]}" 2>&1 | tee "$OUTDIR/step_time.txt"
    cp bench/results/step_time_cuda*.json "$OUTDIR/" 2>/dev/null || true
fi

step "default job, $JOB_STEPS steps"
config="$OUTDIR/default_job.json"
"$PY" - ds_configs/digits_cpu.json "$config" <<'PYEOF'
import json, sys
cfg = json.load(open(sys.argv[1]))
cfg["wandb"] = {"enabled": False}  # no W&B on the GPU machine (not carried)
json.dump(cfg, open(sys.argv[2], "w"), indent=2)
PYEOF
"$PY" launch/train.py --deepspeed_config "$config" --max_steps "$JOB_STEPS" --no_checkpoint --no_progress \
    2>&1 | tee "$OUTDIR/job.txt"
grep -q "^summary: steps=$JOB_STEPS " "$OUTDIR/job.txt"

echo
echo "GPU CHECK OK"
