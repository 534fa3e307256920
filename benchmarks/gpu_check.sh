#!/usr/bin/env bash
# One prepared GPU check (issues 11, 19): on one H100/H200 with 16 cores and no network, in one command, it installs
# the carried wheels, probes the machine (/dev/shm, NCCL, nvJPEG, Python against the wheels), measures ResNet-50
# fp16 images/s on synthetic batches at micro batches 32 and 256 (channels_last, the engine train/imagenet.py
# builds), runs the `gpu` test tier, then the JPEG pipeline alone and end to end with cores - 2 loader processes,
# and writes OUT/gpu_report.md, including whether the GPU waited on data. docs/benchmarks.md ("GPU check") says how
# to prepare it (benchmarks/wheelhouse.sh) and run it.
#
#   bash benchmarks/gpu_check.sh --out "$OUT"            # on the GPU machine, with .whl/ beside the repo's files
#   bash benchmarks/gpu_check.sh --out /tmp/x --dry-run  # CPU: every stage with a tiny model, a complete report
#
# Options: --out DIR (default: gpu_check_out), --wheels DIR (default: .whl), --budget SECONDS: the caller's time
# limit (default 480); the stages end 60 s before it, for the report. --workers N loader processes (default: cores
# - 2), --dry-run. PYTHON picks the interpreter (python3). Each stage runs under `timeout`; a stage that fails or
# times out is recorded and the next one still runs; processes a stage left behind (launcher ranks in their own
# sessions) are killed with their process groups. The report is rewritten after every stage and from EXIT and
# TERM/INT traps, so a kill at any time leaves the report of the stages done (a SIGKILL: that of the last stage).
# Files in OUT: gpu_report.md, gpu_check.log (all output), info.json, probes.json, stages.jsonl,
# results_synthetic.json, results_jpeg.json, pytest.xml.
set -u
cd "$(dirname "$0")/.."

OUT=gpu_check_out
WHEELS=.whl
BUDGET=480
WORKERS=$(( $(nproc 2>/dev/null || echo 3) - 2 ))
[ "$WORKERS" -lt 1 ] && WORKERS=1
DRY=0
PY=${PYTHON:-python3}
VENV=${GPU_CHECK_VENV:-/tmp/gpu_check_venv}

# ---- the install stage, run as its own process under timeout (bash gpu_check.sh --_install WHEELS VENV) --------
if [ "${1:-}" = "--_install" ]; then
    WHEELS=$2 VENV=$3
    ds=$(ls "$WHEELS"/deepspeed-*.whl 2>/dev/null | head -1)
    if [ -z "$ds" ]; then
        echo "no deepspeed wheel in $WHEELS: run benchmarks/wheelhouse.sh where PyPI is reachable"
        exit 3
    fi
    version=$(basename "$ds" | cut -d- -f2)
    want=("deepspeed==$version")
    "$PY" -c "import pytest" 2>/dev/null || want+=(pytest)
    # A venv that sees the image's own packages (its torch): `venv --system-site-packages` would not, when python3
    # is itself a venv (it would see the base interpreter's), so a .pth adds python3's site folders after our own.
    rm -rf "$VENV"
    if "$PY" -m venv --without-pip "$VENV"; then
        sites=$("$PY" -c "import sys; print('; '.join(f'site.addsitedir({p!r})' for p in sys.path
                          if p.endswith(('site-packages', 'dist-packages'))))")
        purelib=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
        echo "import site; $sites" > "$purelib/_gpu_check_image_site.pth"
        if ! "$VENV/bin/python" -m pip install --no-index --no-cache-dir --disable-pip-version-check \
                --find-links "$WHEELS" "${want[@]}"; then
            # pip also checks the requirements of the image's torch; if one of those is missing it cannot resolve
            # offline. Then: deepspeed and every carried wheel whose distribution is absent, without resolving.
            echo "resolving install failed; installing deepspeed and the absent distributions with --no-deps"
            mapfile -t absent < <("$VENV/bin/python" - "$WHEELS" <<'PYEOF'
import importlib.metadata as md
import sys
from pathlib import Path

for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    name = wheel.name.split("-")[0]
    try:
        md.distribution(name)
        if name == "deepspeed":
            print(wheel)
    except md.PackageNotFoundError:
        print(wheel)
PYEOF
            )
            "$VENV/bin/python" -m pip install --no-index --no-cache-dir --disable-pip-version-check --no-deps \
                "${absent[@]}" || exit 4
        fi
        "$VENV/bin/python" -c "import deepspeed, pydantic, pytest, torch, torchvision
print('installed: deepspeed', deepspeed.__version__, '| pydantic', pydantic.VERSION, '| pytest', pytest.__version__,
      '| torch', torch.__version__, '(image) | torchvision', torchvision.__version__, '(image)')" || exit 5
    else  # no venv module: into a folder on PYTHONPATH (the launcher tests then fail: no bin/deepspeed)
        echo "python3 -m venv failed; installing into $VENV/site with --target instead"
        "$PY" -m pip install --no-index --no-cache-dir --disable-pip-version-check --target "$VENV/site" \
            --find-links "$WHEELS" "${want[@]}" || exit 6
    fi
    exit 0
fi

while [ $# -gt 0 ]; do
    case $1 in
        --out) OUT=$2; shift 2 ;;
        --wheels) WHEELS=$2; shift 2 ;;
        --budget) BUDGET=$2; shift 2 ;;
        --workers) WORKERS=$2; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1'; expected --out DIR, --wheels DIR, --budget SECONDS," \
                "--workers N, --dry-run" >&2; exit 2 ;;
    esac
done
case $BUDGET$WORKERS in *[!0-9]*) echo "gpu_check.sh: --budget and --workers take whole numbers" \
    "(got '$BUDGET', '$WORKERS')" >&2; exit 2 ;; esac
[ "$WORKERS" -ge 1 ] || { echo "gpu_check.sh: --workers must be at least 1 (got $WORKERS)" >&2; exit 2; }
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
[ -d "$WHEELS" ] && WHEELS=$(cd "$WHEELS" && pwd)
LOG=$OUT/gpu_check.log
STAGES=$OUT/stages.jsonl
: > "$LOG"
: > "$STAGES"
rm -f "$OUT"/results_*.json "$OUT/pytest.xml" "$OUT/info.json" "$OUT/probes.json" "$OUT/gpu_report.md"
DEADLINE=$(( $(date +%s) + BUDGET - 60 ))  # the last 60 s of the caller's limit are the report's
TAG="$$-$(date +%s%N)"  # in the environment of every stage's processes: how leftovers are found
CURRENT=""  # the stage running now
STAGE_PID=""
export PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true

record() {  # record NAME RC SECONDS LIMIT [NOTE]
    printf '{"stage": "%s", "rc": %s, "seconds": %s, "limit": %s, "note": "%s"}\n' "$1" "$2" "$3" "$4" "${5:-}" \
        >> "$STAGES"
}

report() {  # the report from what is in OUT now (a plain list of the stages if the writer fails)
    if ! timeout 30 "$PY" -m benchmarks.gpu_report "$OUT" >> "$LOG" 2>&1 &&
       ! timeout 30 python3 -m benchmarks.gpu_report "$OUT" >> "$LOG" 2>&1; then
        { echo "# GPU check report"; echo; echo "The report writer failed (see gpu_check.log); the stages:"; echo
          sed 's/^/    /' "$STAGES"; } > "$OUT/gpu_report.md"
    fi
    echo "=== report written after: ${1:-start}" >> "$LOG"
}

kill_leftovers() {  # every process still carrying this run's TAG (ranks in their own sessions), with its group
    local env pid pgid own pids=() groups=()
    own=$(ps -o pgid= -p $$ | tr -d ' ')
    for env in /proc/[0-9]*/environ; do
        pid=${env#/proc/}; pid=${pid%/environ}
        [ "$pid" = $$ ] && continue
        if grep -qxzF "GPU_CHECK_RUN=$TAG" "$env" 2>/dev/null; then
            pids+=("$pid")
            pgid=$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ')
            [ -n "$pgid" ] && [ "$pgid" != "$own" ] && groups+=("$pgid")
        fi
    done
    [ ${#pids[@]} -eq 0 ] && return
    echo "=== killing ${#pids[@]} leftover process(es) of the stage and their groups: ${pids[*]}" >> "$LOG"
    for pgid in "${groups[@]}"; do kill -TERM -- "-$pgid" 2>/dev/null; done
    kill -TERM "${pids[@]}" 2>/dev/null
    sleep 2
    for pgid in "${groups[@]}"; do kill -KILL -- "-$pgid" 2>/dev/null; done
    kill -KILL "${pids[@]}" 2>/dev/null
}

on_signal() {  # TERM/INT (a caller's time limit): record the stage under way, stop it, write the report, go
    trap - TERM INT
    if [ -n "$CURRENT" ]; then
        record "$CURRENT" "$1" 0 0 "stopped by signal $(( $1 - 128 ))"
        [ -n "$STAGE_PID" ] && kill -TERM "$STAGE_PID" 2>/dev/null
    fi
    kill_leftovers
    report "signal $(( $1 - 128 ))"
    FINAL=1
    echo "report: $OUT/gpu_report.md (interrupted)"
    exit "$1"
}
FINAL=0  # set once the last report is written; an exit before that (an error in this script) writes one
trap '[ "$FINAL" = 1 ] || report exit' EXIT
trap 'on_signal 143' TERM
trap 'on_signal 130' INT

stage() {  # stage NAME LIMIT COMMAND...: COMMAND under timeout, output to the log, outcome to stages.jsonl
    local name=$1 limit=$2 left rc t0 t1
    shift 2
    left=$(( DEADLINE - $(date +%s) ))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 10 ]; then
        echo "=== $name: skipped, the budget of $BUDGET s is spent" | tee -a "$LOG"
        record "$name" null 0 "$limit" "the budget of $BUDGET s was spent"
        report "$name"
        return
    fi
    echo "=== $name (limit ${limit} s): $*" | tee -a "$LOG"
    t0=$(date +%s.%N)
    CURRENT=$name
    # in the background and waited for, so that a TERM reaches the trap at once (bash defers traps while a
    # foreground command runs)
    GPU_CHECK_RUN=$TAG timeout -k 10 "$limit" "$@" >> "$LOG" 2>&1 < /dev/null &
    STAGE_PID=$!
    wait "$STAGE_PID"
    rc=$?
    CURRENT="" STAGE_PID=""
    t1=$(date +%s.%N)
    kill_leftovers
    record "$name" "$rc" "$(awk "BEGIN {printf \"%.1f\", $t1 - $t0}")" "$limit"
    echo "=== $name: rc $rc" | tee -a "$LOG"
    report "$name"
}

report start
# 1. wheels (the GPU image has torch but no deepspeed)
if [ "$DRY" = 1 ]; then
    record install null 0 0 "dry run: the current interpreter is used as it is"
elif [ ! -d "$WHEELS" ]; then
    record install null 0 0 "no wheel folder $WHEELS: the current interpreter is used as it is"
else
    stage install 120 bash "$0" --_install "$WHEELS" "$VENV"
    if [ -x "$VENV/bin/python" ] && timeout 120 "$VENV/bin/python" -c "import deepspeed" 2>/dev/null; then
        PY=$VENV/bin/python
    elif [ -d "$VENV/site/deepspeed" ]; then
        export PYTHONPATH=$VENV/site${PYTHONPATH:+:$PYTHONPATH}
    fi
fi
echo "python: $PY" >> "$LOG"
smoke=$([ "$DRY" = 1 ] && echo --smoke)

# 2. the machine; 3. the probes: /dev/shm, NCCL all_reduce on one rank, nvJPEG, this Python against the wheels
stage info 60 "$PY" -m benchmarks.gpu --info "$OUT/info.json" $smoke
stage probes 60 "$PY" -m benchmarks.gpu --probe "$OUT/probes.json" --wheels "$WHEELS"

# 4. ResNet-50 fp16, synthetic, channels_last: micro batch 32 (the recipes' Goyal n) and 256 (--micro-batch 256)
if [ "$DRY" = 1 ]; then
    bench=(--smoke --workers 2)
else
    # 5 intervals of 28 steps x 256 images (2 rounds of 14 loader processes each) after a warm-up interval
    bench=(--micro-batches 32,256 --no-largest --steps $(( 2 * WORKERS )) --intervals 5 --workers "$WORKERS"
           --jpeg-images 1024)
fi
stage "resnet50 synthetic" 120 "$PY" -m benchmarks.gpu "${bench[@]}" --sources synthetic \
    --json "$OUT/results_synthetic.json"

# 5. the gpu test tier (correctness) before the JPEG stage: every test file with a gpu marker (skipped on a CPU)
mapfile -t files < <(grep -l "mark.gpu" tests/test_*.py)
if [ -z "${FASHION_MNIST_DIR:-}" ] && [ -f "$WHEELS/fashion-mnist/train-images-idx3-ubyte.gz" ]; then
    export FASHION_MNIST_DIR=$WHEELS/fashion-mnist
fi
stage "pytest -m gpu" 200 "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml "$OUT/pytest.xml" "${files[@]}"

# 6. the JPEG pipeline alone, then end to end (micro batch 256 only)
jpeg=("${bench[@]}")
[ "$DRY" = 1 ] || jpeg=("${bench[@]/32,256/256}")
stage "jpeg pipeline" 150 "$PY" -m benchmarks.gpu "${jpeg[@]}" --sources loader,jpeg --json "$OUT/results_jpeg.json"

trap - TERM INT
report end
FINAL=1
echo "report: $OUT/gpu_report.md"
grep -E "^\*\*GPU waited|^\| (synthetic|end to end|JPEG)|passed" "$OUT/gpu_report.md"
exit 0
