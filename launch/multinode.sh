#!/usr/bin/env bash
# Multi-node launch of launch/train.py with the DeepSpeed launcher (ImageNet ResNet-50 by default).
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/multinode.sh -d DATA_PATH [options] [-- extra launch/train.py flags]

Runs, from the first node of the hostfile:
  deepspeed --hostfile H --num_nodes N --num_gpus G --master_addr A --master_port P \
      launch/train.py --deepspeed_config C --data_path DATA_PATH [extra flags]

Options (environment variable in brackets):
  -d PATH   ImageNet root holding train/ and val/                        [DATA_PATH]
  -c FILE   DeepSpeed config (default ds_configs/imagenet_resnet50_32k.json) [CONFIG]
  -H FILE   hostfile, "<host> slots=<gpus>" per line (default launch/hostfile) [HOSTFILE]
  -n N      number of nodes (default 16)                                 [NUM_NODES]
  -g G      GPUs per node (default 8)                                    [GPUS_PER_NODE]
  -a ADDR   master address (default: first host of the hostfile)         [MASTER_ADDR]
  -p PORT   master port (default 29500)                                  [MASTER_PORT]
  -k DIR    checkpoint directory (default checkpoints/<config name>)     [CHECKPOINT_DIR]
  -r        resume from the latest checkpoint in the checkpoint directory
  -x        dry run: print the command instead of running it
  -h        this help

The ImageNet configs are written for 128 GPUs (global batch = 32 per GPU x accumulation x GPUs);
DeepSpeed stops with a batch-size error if N x G differs. For another GPU count, copy the config
and change gradient_accumulation_steps and train_batch_size (see README.md, "Configs").
Examples:
  launch/multinode.sh -d /data/imagenet                       # 32k, 16 nodes x 8 GPUs
  launch/multinode.sh -d /data/imagenet -c ds_configs/imagenet_resnet50_131k.json -r
  launch/multinode.sh -d /data/imagenet -x -- --max_steps 10  # show the command only
USAGE
}

DATA_PATH=${DATA_PATH:-}
CONFIG=${CONFIG:-ds_configs/imagenet_resnet50_32k.json}
HOSTFILE=${HOSTFILE:-launch/hostfile}
NUM_NODES=${NUM_NODES:-16}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-}
MASTER_PORT=${MASTER_PORT:-29500}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-}
RESUME=()
DRY_RUN=0

while getopts ":d:c:H:n:g:a:p:k:rxh" opt; do
  case "$opt" in
    d) DATA_PATH=$OPTARG ;;
    c) CONFIG=$OPTARG ;;
    H) HOSTFILE=$OPTARG ;;
    n) NUM_NODES=$OPTARG ;;
    g) GPUS_PER_NODE=$OPTARG ;;
    a) MASTER_ADDR=$OPTARG ;;
    p) MASTER_PORT=$OPTARG ;;
    k) CHECKPOINT_DIR=$OPTARG ;;
    r) RESUME=(--resume) ;;
    x) DRY_RUN=1 ;;
    h) usage; exit 0 ;;
    :) echo "multinode.sh: -$OPTARG needs a value" >&2; usage >&2; exit 2 ;;
    *) echo "multinode.sh: unknown option -$OPTARG" >&2; usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[[ "${1:-}" == "--" ]] && shift

cd "$(dirname "$0")/.."
if [[ -z "$DATA_PATH" ]]; then
  echo "multinode.sh: -d DATA_PATH (the ImageNet root with train/ and val/) is required" >&2
  usage >&2
  exit 2
fi
if [[ ! -f "$CONFIG" ]]; then
  echo "multinode.sh: config $CONFIG does not exist" >&2
  exit 2
fi
if [[ ! -f "$HOSTFILE" ]]; then
  echo "multinode.sh: hostfile $HOSTFILE does not exist (start from launch/hostfile.example)" >&2
  exit 2
fi
if [[ -z "$MASTER_ADDR" ]]; then
  MASTER_ADDR=$(grep -v '^[[:space:]]*#' "$HOSTFILE" | awk 'NF {print $1; exit}')
fi
if [[ -z "$CHECKPOINT_DIR" ]]; then
  CHECKPOINT_DIR="checkpoints/$(basename "$CONFIG" .json)"
fi

cmd=(deepspeed --hostfile "$HOSTFILE" --num_nodes "$NUM_NODES" --num_gpus "$GPUS_PER_NODE"
     --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
     launch/train.py --deepspeed_config "$CONFIG" --data_path "$DATA_PATH"
     --checkpoint_dir "$CHECKPOINT_DIR" "${RESUME[@]}" "$@")

if [[ "$DRY_RUN" == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
