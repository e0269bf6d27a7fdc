#!/usr/bin/env bash
# Everything a lent GPU machine should check, in one command that fits its 10-minute limit:
#
#   1. build   the CUDA extension pyclipfast._C in place (TORCH_CUDA_ARCH_LIST=9.0)
#   2. test    pytest: tests/test_cuda.py, then the rest of tests/ (every backend, including
#              "cuda" and "triton", against the float64 reference in fp32/fp16/bf16)
#   3. sanitize  compute-sanitizer memcheck and racecheck on benchmarks/sanitize_driver.py
#              (every CUDA and Triton kernel once, on small odd shapes)
#   4. benchmarks, one or more parts (each a stage name):
#        goals      gpu-goals speed + memory (InfoNCE N=32k vs open_clip/Inf-CL, SigLIP N=64k,
#                   every loss's memory at N=64k, D=768, bf16)
#        speed | memory | max-batch   one part of gpu-goals (max-batch: trials at N >= 4M take minutes)
#        quick | full | full-clip-siglip | full-rest   the sweep suites (full needs two commands)
#      A part cut short by the time budget keeps its finished cases in <name>.partial.json.
#
# Usage (from anywhere in the checkout), with the device tool from the repository root here after
# `bash benchmarks/peer_wheels.sh`:
#   run(command="bash benchmarks/gpu_check.sh build test sanitize", carry=[".wheels"], timeout_s=600)
#   run(command="bash benchmarks/gpu_check.sh goals", carry=[".wheels"])     # while still warm
#   bash benchmarks/gpu_check.sh                  # default: build test sanitize goals
# Environment: GPU_CHECK_BUDGET (seconds for the whole run, default 570), PYTHON (default python3),
# OUT (where the files that come back go; default /tmp/gpu_check_out). Wheels in .wheels/ or .whl/
# (open_clip_torch for the drop-in tests, the benchmark peers) are installed to /tmp/site first.
#
# Logs, JUnit XML and JSON go to benchmarks/results/<device>/gpu_check/; $OUT receives
# summary.txt, the JUnit files, the benchmark JSON and gpu_check.tar.gz with everything
# (at most 8 files come back from the machine). The summary is printed last. Exit status:
# non-zero when a stage failed or ran out of time.
set -uo pipefail
cd "$(dirname "$0")/.."

START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-570}
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check_out}
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build test sanitize goals)
export PYTHONUNBUFFERED=1

left() { echo $((BUDGET - ($(date +%s) - START))); }
wants() { local s; for s in "${STAGES[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

WHEELS=$(ls .wheels/*.whl .whl/*.whl 2>/dev/null)
if [ -n "$WHEELS" ]; then
    # shellcheck disable=SC2086  # one wheel per word
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $WHEELS \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -z "${CUDA_HOME:-}" ]; then
    for d in /usr/local/cuda /usr/local/cuda-13.0; do [ -x "$d/bin/nvcc" ] && export CUDA_HOME=$d && break; done
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

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
mkdir -p "$RES" "$OUT"
SUMMARY=$RES/summary.txt
: > "$SUMMARY"
FAILED=0

note() { echo "$*" | tee -a "$SUMMARY"; }

# stage NAME SECONDS LOG COMMAND...: run with a time limit, log to $RES/LOG, record the outcome.
stage() {
    local name=$1 limit=$2 log=$RES/$3; shift 3
    local budget; budget=$(left)
    [ "$limit" -gt "$((budget - 15))" ] && limit=$((budget - 15))
    if [ "$limit" -le 5 ]; then
        note "$(printf '%-22s SKIPPED (no time left)' "$name")"; FAILED=1; return 1
    fi
    local t0=$(date +%s) rc
    echo "== $name (limit ${limit} s): $*" | tee "$log"
    timeout --signal=TERM --kill-after=15 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    local verdict=ok
    [ $rc -ne 0 ] && verdict="FAILED (exit $rc)" && FAILED=1
    [ $rc -eq 124 ] && verdict="TIMED OUT after ${limit} s"
    note "$(printf '%-22s %-28s %4d s   %s' "$name" "$verdict" $(($(date +%s) - t0)) "$log")"
    return $rc
}

note "gpu_check on $DEVICE, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    $PY -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda)"
    $PY -c "import triton; print('triton', triton.__version__)"
    "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version | tail -1
} > "$RES/env.txt" 2>&1
cat "$RES/env.txt" | tee -a "$SUMMARY"

built() { $PY -c "import pyclipfast._C" >/dev/null 2>&1; }

if wants build || ! built; then
    stage build 300 build.log env PYCLIPFAST_BUILD_CUDA=1 $PY setup.py build_ext --inplace
fi

if wants test; then
    stage "test: test_cuda" 200 test_cuda.log $PY -m pytest tests/test_cuda.py -q -p no:cacheprovider \
        --junitxml="$RES/junit-cuda.xml"
    stage "test: tests/" 240 tests.log $PY -m pytest tests -q -p no:cacheprovider --ignore=tests/test_cuda.py \
        --ignore=tests/train --continue-on-collection-errors --junitxml="$RES/junit-tests.xml"
fi

if wants sanitize; then
    SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
    # Without the caching allocator every tensor is its own allocation: out-of-bounds accesses show.
    stage "sanitize: memcheck" 150 memcheck.log env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        "$SANITIZER" --tool memcheck --error-exitcode 99 --report-api-errors no --print-limit 100 \
        $PY benchmarks/sanitize_driver.py
    stage "sanitize: racecheck" 150 racecheck.log \
        "$SANITIZER" --tool racecheck --error-exitcode 99 --report-api-errors no --print-limit 100 \
        $PY benchmarks/sanitize_driver.py --dtypes float32,bfloat16
fi

# bench_part PART: one benchmark part, stopped in time to pack the results.
bench_part() {
    local bench=($PY -m benchmarks run --device cuda --note "lent GPU machine; benchmarks/gpu_check.sh $1")
    case "$1" in
        speed|memory|max-batch) bench+=(--suite gpu-goals --goals "$1" --name "gpu-goals-$1") ;;
        goals) bench+=(--suite gpu-goals --goals speed,memory --name gpu-goals) ;;
        quick|full) bench+=(--suite "$1") ;;
        full-clip-siglip) bench+=(--suite full --only clip,siglip --name full-clip-siglip) ;;
        full-rest) bench+=(--suite full --only distill,cosine,recall --name full-rest) ;;
    esac
    stage "bench: $1" 600 "bench-$1.log" "${bench[@]}"
}
for part in speed memory goals max-batch quick full full-clip-siglip full-rest; do
    wants "$part" && bench_part "$part"
done

# What went wrong, where the reply shows it: failed tests, sanitizer findings, driver failures.
excerpt() {  # excerpt LOG PATTERN
    [ -f "$RES/$1" ] && grep -qE "$2" "$RES/$1" && { echo "---- $1"; grep -E "$2" "$RES/$1" | tail -20; }
}
{
    excerpt test_cuda.log "^(FAILED|ERROR) |[0-9]+ (passed|failed)"
    excerpt tests.log "^(FAILED|ERROR) |[0-9]+ (passed|failed)"
    excerpt memcheck.log "ERROR SUMMARY|Invalid|out of bounds|RAISED|NON-FINITE|failure"
    excerpt racecheck.log "RACECHECK SUMMARY|ERROR SUMMARY|[Hh]azard|RAISED|NON-FINITE|failure"
} | tee -a "$SUMMARY"

cp "$SUMMARY" "$RES"/junit-*.xml "$OUT/" 2>/dev/null
# Everything under benchmarks/results/<device>/ (check logs, benchmark JSON/markdown/plots) comes back
# in one tarball: unpack it here with  tar xzf <files_at>/gpu_check.tar.gz
tar czf "$OUT/gpu_check.tar.gz" "benchmarks/results/$DEVICE" 2>/dev/null
echo
echo "==== gpu_check summary ($(($(date +%s) - START)) s; files in $OUT and $RES)"
cat "$SUMMARY"
exit $FAILED
