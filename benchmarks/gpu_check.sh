#!/usr/bin/env bash
# The whole GPU check in one command of at most ~9 minutes, on a machine with an NVIDIA GPU,
# torch and triton, and no network. It compiles nothing but Triton's JIT: the CUDA kernels come
# prebuilt (libpyclipfast_cuda.so, a C library that loads with any torch and Python) and the
# peers as wheels, both in .wheels/ beside the checkout (made here by benchmarks/peer_wheels.sh).
#
# Stages, in this order, each with a time limit, results written as each one ends:
#   1. tests     the GPU tests of the Triton and CUDA backends against the float64 reference in
#                fp32/fp16/bf16, small-blocks cases included (tests/test_cuda.py and every
#                "triton"/"cuda" test of the loss test files)
#   2. goals     speed and memory goals: InfoNCE N = 32,768 and SigLIP N = 65,536, D = 768, bf16,
#                against open_clip, Inf-CL and siglip-kernel (benchmarks suite gpu-goals)
#   3. sanitize  compute-sanitizer memcheck and racecheck on small odd shapes (sanitize_driver.py)
#
# Usage, from anywhere in the checkout:
#   bash benchmarks/gpu_check.sh --dry-run     # here, without a GPU: the plan, the files, the budget
#   bash benchmarks/gpu_check.sh               # there: all three stages
#   bash benchmarks/gpu_check.sh tests goals   # some stages
# Environment: GPU_CHECK_BUDGET (seconds for the whole run, default 540), PYTHON (default python3),
# OUT (the folder for the files to take back, default /tmp/gpu_check_out).
#
# Writes everything to benchmarks/results/<device>/gpu_check/, and to $OUT at most 7 files, no
# folders: summary.txt, junit-tests.xml, gpu-goals.json (or gpu-goals.partial.json, the cases
# finished when the stage's time ran out), gpu-goals.md, sanitize.txt and
# gpu_check.tar.gz (benchmarks/results/<device>/, logs cut to their last 2 MiB), each refreshed
# after every stage, so a run stopped early still leaves what it finished. Exit status: non-zero
# when a stage failed or ran out of time.
set -uo pipefail
cd "$(dirname "$0")/.."

BUDGET=${GPU_CHECK_BUDGET:-540}
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check_out}
WHEELS=.wheels
LIBRARY=$WHEELS/libpyclipfast_cuda.so
# Per-stage limits (seconds); a stage gets less when the budget runs short.
LIMIT_SETUP=30
LIMIT_TESTS=210
LIMIT_GOALS=170
LIMIT_SANITIZE=60   # each of memcheck and racecheck
# H200 ceilings for the roofline floors printed by --dry-run (measured again in every benchmark run).
H200_BF16_TFLOPS=790
H200_COPY_TBS=4.3
TEST_FILES="tests/test_cuda.py tests/test_clip.py tests/test_clip_pairs.py tests/test_siglip.py tests/test_distill.py tests/test_cosine.py tests/test_retrieval.py tests/test_kernel_edges.py tests/test_nonfinite.py tests/test_compile.py"
TEST_SELECT="cuda or triton or gpu"

DRY=0
STAGES=()
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        tests|goals|sanitize) STAGES+=("$arg") ;;
        *) echo "unknown argument $arg (stages: tests goals sanitize; --dry-run)" >&2; exit 2 ;;
    esac
done
[ ${#STAGES[@]} -eq 0 ] && STAGES=(tests goals sanitize)
wants() { local s; for s in "${STAGES[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

if [ "$DRY" = 1 ]; then
    echo "== plan (budget ${BUDGET} s for one command; stages in this order)"
    total=$LIMIT_SETUP
    printf '  %-9s %4d s  install .wheels/*.whl to /tmp/site, use %s\n' setup $LIMIT_SETUP "$LIBRARY"
    if wants tests; then
        total=$((total + LIMIT_TESTS))
        printf '  %-9s %4d s  pytest %s -k "%s"\n' tests $LIMIT_TESTS "$TEST_FILES" "$TEST_SELECT"
    fi
    if wants goals; then
        total=$((total + LIMIT_GOALS))
        printf '  %-9s %4d s  python -m benchmarks run --device cuda --suite gpu-goals --goals speed,memory\n' goals $LIMIT_GOALS
    fi
    if wants sanitize; then
        total=$((total + 2 * LIMIT_SANITIZE))
        printf '  %-9s %4d s  compute-sanitizer memcheck + racecheck, python benchmarks/sanitize_driver.py\n' sanitize $((2 * LIMIT_SANITIZE))
    fi
    verdict="fits"; [ "$total" -gt "$BUDGET" ] && verdict="DOES NOT FIT"
    echo "  total     ${total} s of ${BUDGET} s: ${verdict} (a command may run 600 s; the machine start is not included)"
    echo "== carried files ($WHEELS/)"
    if ls "$WHEELS"/* >/dev/null 2>&1; then
        ls -l "$WHEELS" | awk 'NR > 1 {printf "  %10.1f KiB  %s\n", $5 / 1024, $NF; t += $5} END {printf "  %10.1f MiB  in all\n", t / 1048576}'
    else
        echo "  none yet: run bash benchmarks/peer_wheels.sh"
    fi
    if [ -f "$LIBRARY" ]; then
        needed=$(readelf -d "$LIBRARY" 2>/dev/null | awk -F'[][]' '/NEEDED/ {printf "%s ", $2}')
        echo "  $LIBRARY needs only: ${needed:-?}"
    else
        echo "  MISSING $LIBRARY: build it with python csrc/build.py, then bash benchmarks/peer_wheels.sh"
    fi
    echo "== roofline floors of the goal cases on an H200 (${H200_BF16_TFLOPS} TFLOP/s dense bf16, ${H200_COPY_TBS} TB/s copy)"
    $PY - "$H200_BF16_TFLOPS" "$H200_COPY_TBS" <<'EOF'
import sys
tflops, tbs = float(sys.argv[1]), float(sys.argv[2])
for name, n, d, flops_per in (("InfoNCE fwd+bwd", 32768, 768, 8), ("SigLIP fwd+bwd", 65536, 768, 6)):
    flops = flops_per * n * n * d
    nbytes = 2 * (2 * n * d) * 2  # read A and B, write dA and dB, bf16
    print(f"  {name:16s} N = {n:6d}, D = {d}: {flops / 1e12:6.2f} TFLOP -> {flops / tflops / 1e12 * 1e3:6.2f} ms"
          f" (memory {nbytes / tbs / 1e12 * 1e3:.3f} ms)")
EOF
    echo "== written to \$OUT (at most 7 files, no folders): summary.txt junit-tests.xml gpu-goals.json gpu-goals.partial.json gpu-goals.md sanitize.txt gpu_check.tar.gz"
    exit 0
fi

START=$(date +%s)
export PYTHONUNBUFFERED=1
left() { echo $((BUDGET - ($(date +%s) - START))); }
mkdir -p "$OUT"

if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    # shellcheck disable=SC2046  # one wheel per word
    timeout "$LIMIT_SETUP" $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site $(ls "$WHEELS"/*.whl) && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
[ -f "$LIBRARY" ] && export PYCLIPFAST_CUDA_LIBRARY=$PWD/$LIBRARY

DEVICE=$($PY - <<'EOF' 2>/dev/null || echo unknown-gpu
import re, torch
try:
    from benchmarks.hardware import device_slug, machine_info
    print(device_slug(machine_info("cuda")))
except Exception:
    print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-"))
EOF
)
RES=benchmarks/results/$DEVICE/gpu_check
mkdir -p "$RES"
SUMMARY=$RES/summary.txt
: > "$SUMMARY"
FAILED=0
note() { echo "$*" | tee -a "$SUMMARY"; }

# Copy what there is so far to $OUT (called after every stage).
publish() {
    cp "$SUMMARY" "$OUT/summary.txt"
    [ -f "$RES/junit-tests.xml" ] && cp "$RES/junit-tests.xml" "$OUT/"
    for f in gpu-goals.json gpu-goals.partial.json gpu-goals.md; do [ -f "benchmarks/results/$DEVICE/$f" ] && cp "benchmarks/results/$DEVICE/$f" "$OUT/"; done
    [ -f "$RES/sanitize.txt" ] && cp "$RES/sanitize.txt" "$OUT/"
    local log
    for log in "$RES"/*.log; do  # keep every log under 2 MiB
        [ -f "$log" ] && [ "$(stat -c %s "$log")" -gt 2097152 ] && tail -c 2097152 "$log" > "$log.tmp" && mv "$log.tmp" "$log"
    done
    tar czf "$OUT/gpu_check.tar.gz" "benchmarks/results/$DEVICE" 2>/dev/null
}

# stage NAME SECONDS LOG COMMAND...: run with a time limit, log to $RES/LOG, record the outcome.
stage() {
    local name=$1 limit=$2 log=$RES/$3; shift 3
    local budget; budget=$(left)
    [ "$limit" -gt "$((budget - 10))" ] && limit=$((budget - 10))
    if [ "$limit" -le 5 ]; then
        note "$(printf '%-20s SKIPPED (no time left)' "$name")"; FAILED=1; return 1
    fi
    local t0 rc verdict=ok
    t0=$(date +%s)
    echo "== $name (limit ${limit} s): $*" | tee "$log"
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    [ $rc -ne 0 ] && verdict="FAILED (exit $rc)" && FAILED=1
    [ $rc -eq 124 ] && verdict="TIMED OUT after ${limit} s"
    note "$(printf '%-20s %-26s %4d s   %s' "$name" "$verdict" $(($(date +%s) - t0)) "$log")"
    return $rc
}

note "gpu_check on $DEVICE, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__)"
    $PY -c "import pyclipfast.cuda._library as L; print('CUDA kernels:', L.library_path(), '(loads)' if L.load() else '')" 2>&1 | tail -1
} | tee -a "$SUMMARY"
publish

if wants tests; then
    # shellcheck disable=SC2086  # one file per word
    stage "tests" "$LIMIT_TESTS" tests.log $PY -m pytest $TEST_FILES -k "$TEST_SELECT" -q -p no:cacheprovider \
        --maxfail=50 --junitxml="$RES/junit-tests.xml"
    grep -E "^(FAILED|ERROR) |[0-9]+ (passed|failed)" "$RES/tests.log" | tail -25 | tee -a "$SUMMARY"
    publish
fi

if wants goals; then
    stage "goals" "$LIMIT_GOALS" goals.log $PY -m benchmarks run --device cuda --suite gpu-goals \
        --goals speed,memory --name gpu-goals --note "benchmarks/gpu_check.sh goals"
    grep -E "PASS|FAIL|N/A" "$RES/goals.log" | tail -12 | tee -a "$SUMMARY"
    publish
fi

if wants sanitize; then
    SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    # Without the caching allocator every tensor is its own allocation: out-of-bounds accesses show.
    stage "sanitize: memcheck" "$LIMIT_SANITIZE" memcheck.log env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        "$SANITIZER" --tool memcheck --error-exitcode 99 --report-api-errors no --print-limit 50 \
        $PY benchmarks/sanitize_driver.py --dtypes float32,bfloat16
    stage "sanitize: racecheck" "$LIMIT_SANITIZE" racecheck.log \
        "$SANITIZER" --tool racecheck --error-exitcode 99 --report-api-errors no --print-limit 50 \
        $PY benchmarks/sanitize_driver.py --backends cuda --dtypes bfloat16
    grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|Invalid|out of bounds|[Hh]azard|RAISED|NON-FINITE|failure" \
        "$RES/memcheck.log" "$RES/racecheck.log" 2>/dev/null | tail -40 > "$RES/sanitize.txt"
    tail -6 "$RES/sanitize.txt" | tee -a "$SUMMARY"
    publish
fi

note "done in $(($(date +%s) - START)) s; files in $OUT and $RES"
publish
exit $FAILED
