#!/usr/bin/env bash
# Download the wheels gpu_check/run.sh installs on a GPU machine that has python 3.12 and a CUDA
# torch but no internet (e.g. the nvidia-h200 machine: torch, numpy, tqdm, scikit-learn, torchvision,
# psutil, py-cpuinfo, msgpack, ninja, einops, packaging, pytest are already there).
# Versions come from constraints.txt, so what is carried is what CI tests. Run from anywhere:
#   gpu_check/fetch_wheels.sh            # into .whl/ (git-ignored)
#   WHEEL_DIR=/tmp/w PY_VERSION=3.11 gpu_check/fetch_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=${WHEEL_DIR:-.whl}
PY=${PYTHON:-python3}
PY_VERSION=${PY_VERSION:-3.12}
# What the GPU machine lacks: spngd_ds's own requirements (deepspeed, pydantic) with theirs, and
# the LAMB baseline's package.
WHEELS=(hjson pydantic pydantic_core annotated_types typing_inspection typing_extensions pytorch_optimizer)
# PyPI has only a source archive of these: built here (pure python, no compiled DeepSpeed ops).
BUILT=(deepspeed)

pin() {  # the exact version constraints.txt gives NAME (- and _ are the same in a name)
    local pattern
    pattern=$(printf '%s' "$1" | sed 's/[-_]/[-_]/g')
    grep -i -E "^${pattern}==" constraints.txt | head -n 1 | cut -d= -f3
}

pinned() {  # NAME==VERSION for each name given
    local name version
    for name in "$@"; do
        version=$(pin "$name")
        if [[ -z "$version" ]]; then
            echo "fetch_wheels.sh: constraints.txt has no pin for $name" >&2
            exit 1
        fi
        echo "$name==$version"
    done
}
mapfile -t specs < <(pinned "${WHEELS[@]}")
mapfile -t built < <(pinned "${BUILT[@]}")

mkdir -p "$DEST"
echo "downloading into $DEST for python $PY_VERSION: ${specs[*]}"
"$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${specs[@]}"
echo "building pure-python wheels of: ${built[*]}"
DS_BUILD_OPS=0 "$PY" -m pip wheel --no-deps -w "$DEST" "${built[@]}"
for whl in "$DEST"/*.whl; do
    case "$(basename "$whl")" in
        *-py3-none-any.whl | *cp"${PY_VERSION/./}"*manylinux*x86_64*.whl) ;;
        *) echo "fetch_wheels.sh: $whl will not install on cp${PY_VERSION/./} x86_64" >&2; exit 1 ;;
    esac
done
ls -l "$DEST"
