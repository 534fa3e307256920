#!/usr/bin/env bash
# Prepares the folder that benchmarks/gpu_check.sh carries to a GPU machine without network (docs/benchmarks.md,
# "GPU check"): the wheels its image lacks, and Fashion-MNIST for the GPU test tier.
#
#   bash benchmarks/wheelhouse.sh                          # writes .whl/ (git-ignored) for the image's Python 3.12
#   bash benchmarks/wheelhouse.sh --dir DIR --python-version 3.11
#   bash benchmarks/wheelhouse.sh --dir DIR --check          # only the size check of an existing folder
#
# Needs pip's access to PyPI. Not carried: torch and torchvision (the GPU image's own builds are used), wandb (the
# GPU tier and the benchmarks pass --no-wandb or never start it; train/tracking.py imports it lazily), transformers.
# Versions are those installed in the project's environment (.venv, from requirements.txt), so that the GPU
# machine runs the same DeepSpeed and pydantic as the tests here. Stops if the folder exceeds --max-mib.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=.whl
PYVER=3.12
MAX_MIB=60
CHECK_ONLY=0
PY=${PYTHON:-.venv/bin/python}
FMNIST=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
while [ $# -gt 0 ]; do
    case $1 in
        --dir) DIR=$2; shift 2 ;;
        --python-version) PYVER=$2; shift 2 ;;
        --max-mib) MAX_MIB=$2; shift 2 ;;
        --check) CHECK_ONLY=1; shift ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "wheelhouse.sh: unknown argument '$1'; expected --dir DIR, --python-version X.Y, --max-mib N," \
                "--check" >&2
           exit 2 ;;
    esac
done
[ -x "$PY" ] || PY=python3

size_check() {  # the device tool carries 64 MiB in all (the repository's files included): the folder gets MAX_MIB
    local bytes mib
    bytes=$(find "$DIR" -type f -printf '%s\n' | awk '{s += $1} END {printf "%d", s}')
    mib=$(awk "BEGIN {printf \"%.1f\", $bytes / 2^20}")
    echo "wheelhouse $DIR: $(ls "$DIR"/*.whl 2>/dev/null | wc -l) wheels, $mib MiB ($bytes bytes in files;" \
         "limit $MAX_MIB MiB)"
    if [ "$bytes" -gt $((MAX_MIB * 1048576)) ]; then
        echo "wheelhouse.sh: $DIR holds $bytes bytes, over the $MAX_MIB MiB limit (the device tool carries 64 MiB" \
             "in all)" >&2
        return 1
    fi
}
if [ "$CHECK_ONLY" = 1 ]; then
    [ -d "$DIR" ] || { echo "wheelhouse.sh: no folder $DIR to check" >&2; exit 2; }
    size_check
    exit
fi

# deepspeed's own requirements (einops, hjson, msgpack, ninja, packaging, psutil, py-cpuinfo, pydantic, tqdm),
# pydantic's, and pytest's, in case the image lacks one: pip installs from here only what is missing there.
BINARY="pydantic-core msgpack psutil"
PURE="hjson pydantic annotated-types typing-inspection typing-extensions einops py-cpuinfo tqdm packaging
      ninja pytest pluggy iniconfig pygments"
pin() {  # NAME==VERSION as installed in the project's environment
    "$PY" -c "import importlib.metadata as m, sys; print(f'{sys.argv[1]}=={m.version(sys.argv[1])}')" "$1"
}

mkdir -p "$DIR"
rm -f "$DIR"/*.whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64)
for name in $BINARY $PURE; do
    # ninja is a binary wheel too (py3-none-manylinux); --only-binary with the platform tags fetches either kind
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        "${plat[@]}" -d "$DIR" "$(pin "$name")"
done
# deepspeed is published as an sdist only: build it once into a py3-none-any wheel (no ops prebuilt: the runs here
# use no DeepSpeed CUDA extension)
"$PY" -m pip wheel -q --no-deps -w "$DIR" "$(pin deepspeed)"

# Fashion-MNIST, whole (30 MB): the GPU tier trains on it (tests/test_train_e2e.py takes a 16,384-image subset, and
# train/imagenet.py would silently use fewer if fewer were there)
if [ -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
    mkdir -p "$DIR/fashion-mnist"
    cp "$FMNIST"/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz "$DIR/fashion-mnist/"
else
    echo "wheelhouse.sh: no Fashion-MNIST in $FMNIST (set FASHION_MNIST_DIR): the GPU tier's training tests will" \
         "fail on the GPU machine" >&2
fi

ls -1 "$DIR"
echo "built for Python $PYVER"
size_check
