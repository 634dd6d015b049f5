#!/usr/bin/env bash
# Issue 12's GPU measurements in one command, about 8 minutes on one H100 / H200 (bench/RESULTS.md, "Issue 12").
#
# Once, here (needs pip's network; builds ffcv for the device's Python 3.12, see ../shared/device/README.md):
#     grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
#     bash ../shared/device/prepare-device-wheels.sh .whl
# Then through the device tool: run(command="bash bench/gpu_issue12.sh", carry=[".whl"], timeout_s=560).
# CPU smoke test of every part (no wheels, the local venv, tiny sizes):  bash bench/gpu_issue12.sh --tiny
#
# Parts, in order, each under its own time limit so that one overrunning part cannot take the others with it;
# every part writes its results as it goes (a row, a K), so a part stopped by its limit keeps what it measured:
#   1. ladder    bench/train_step.py, resnet18, AT, batch 512 then 128, 5 warm-up + 10 timed steps per row:
#                reference, +cuda_graphs (attack weight grads) [the step before item 1], +cuda_graphs [item 1],
#                +fold_bn, +fused_attack, -clean_acc                                                  (230 s)
#   2. packing   bench/packing.py --engine fast: K = 1, 2, 4, 8 packed fast seeds vs one fast model, batch 128 (150 s)
#   3. forms     bench/packing_forms.py: ResNet-18's convolutions, K = 2, 4, 8, four forms               (35 s)
#   4. test_cuda python -m pytest -n 6 tests/test_cuda.py                                               (75 s)
# Files under $OUT (the device tool brings back at most 8): run.log (environment, each part's output, exit code
# and seconds), ladder.{json,md}, packing.{json,md}, forms.{json,md}, test_cuda.log.
set -u
cd "$(dirname "$0")/.."
TINY=0
[ "${1:-}" = --tiny ] && TINY=1
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
if [ $TINY = 1 ]; then
    OUT=${OUT:-$(mktemp -d /tmp/gpu_issue12.XXXXXX)}
    PY=${PY:-.venv/bin/python}
    SCALE=4  # the CPU is slower at compiling than the device's 16 cores: looser limits
else
    OUT=${OUT:?set by the device tool; or pass --tiny}
    PY=${PY:-python3}
    SCALE=1
    [ -d .whl ] || { echo 'no .whl: build the wheels first (see the top of this file)' >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-} || exit 2
fi
mkdir -p "$OUT"
LOG=$OUT/run.log
{
    echo "== bench/gpu_issue12.sh $* ($(date -u '+%Y-%m-%d %H:%M:%S UTC'))"
    git rev-parse HEAD 2>/dev/null || echo 'commit: unknown (no .git)'
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,power.limit --format=csv 2>/dev/null
    "$PY" -c 'import sys, torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "python",
sys.version.split()[0], "cudnn", torch.backends.cudnn.version())'
    lscpu 2>/dev/null | grep -m1 'Model name'; nproc
} >"$LOG" 2>&1

part() {  # part NAME SECONDS COMMAND...: run it under `timeout`, its output into run.log
    local name=$1 limit=$(( $2 * SCALE )) start=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit} s): $*" >>"$LOG"
    timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    echo "== $name: exit $rc$( [ $rc = 124 ] && echo ' (time limit)') after $(( SECONDS - start )) s" >>"$LOG"
}

if [ $TINY = 1 ]; then
    SIZE=(--tiny)
    LADDER=(--tiny)
    PACKING=(--tiny --engine fast)
    XDIST=''  # no pytest-xdist in the local venv
else
    SIZE=()
    LADDER=(--device cuda --archs resnet18 --batches 512,128 --methods at --warmup 5 --steps 10)
    PACKING=(--device cuda --engine fast --arch resnet18 --batch 128 --ks 1,2,4,8 --warmup 5 --steps 10)
    XDIST='-n 6'  # pytest-xdist is on the device; the compiled tests compile in parallel
fi
part ladder 230 "$PY" bench/train_step.py "${LADDER[@]}" --out "$OUT/ladder.json" --md "$OUT/ladder.md" \
    --configs 'reference,+cuda_graphs (attack weight grads),+cuda_graphs,+fold_bn,+fused_attack,-clean_acc'
part packing 150 "$PY" bench/packing.py "${PACKING[@]}" --out "$OUT/packing.json" --md "$OUT/packing.md"
part forms 35 "$PY" bench/packing_forms.py "${SIZE[@]}" --out "$OUT/forms.json" --md "$OUT/forms.md"
part test_cuda 75 bash -c "$PY -m pytest -q $XDIST -p no:cacheprovider tests/test_cuda.py >'$OUT/test_cuda.log' 2>&1"
echo "== done after $SECONDS s" >>"$LOG"
cat "$LOG"
echo "results in $OUT"
