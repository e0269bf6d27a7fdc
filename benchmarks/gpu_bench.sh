#!/usr/bin/env bash
# One command on the GPU machine: install the peers from .wheels/, build the CUDA extension if it is
# not built, check that pyclipfast sees the GPU, run one part of the benchmarks, and leave the results
# under $OUT (a tarball of benchmarks/results/<device>/ plus the logs: at most 4 files).
#
#   bash benchmarks/gpu_bench.sh PART
#
#   speed       gpu-goals "speed": InfoNCE N=32k vs open_clip (eager, compiled) and Inf-CL; SigLIP N=64k
#   memory      gpu-goals "memory": every loss at N=64k, D=768, bf16 on the fused backends
#   goals       speed and memory in one command (if the build is already done)
#   max-batch   gpu-goals, largest batch at D=768 (each trial at N ≥ 4M runs for minutes)
#   quick       the quick suite (every op and implementation at N = 4k, 16k, 64k)
#   full        the full suite (longer than one 10-minute command: use the two halves below)
#
# Budgets: BUILD_BUDGET_S (default 300) for building pyclipfast._C, BUDGET_S (default 570) for the whole
# script; the benchmark is stopped at BUDGET_S and leaves <name>.partial.json (redraw it with
# `python -m benchmarks plot`).
#
# With the device tool, from the repository root here (after `bash benchmarks/peer_wheels.sh`):
#   run(command="bash benchmarks/gpu_bench.sh speed", carry=[".wheels"], timeout_s=600)
# then, while the machine is still warm (30 s; it keeps the built extension), the other parts.
# then unpack the tarball here: tar xzf <files_at>/results.tgz -C benchmarks/results
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:-goals}
OUT=${OUT:-/tmp/pyclipfast-bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LOG="$OUT/run-$PART.log"

install_peers() {
    if ls .wheels/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peers \
            .wheels/*.whl && export PYTHONPATH=/tmp/peers${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "no .wheels/ here: the peers will be skipped (run benchmarks/peer_wheels.sh and carry .wheels)"
    fi
}

build_extension() {
    if ls pyclipfast/_C*.so >/dev/null 2>&1; then
        echo "pyclipfast._C already built"
        return
    fi
    if [ -z "${CUDA_HOME:-}" ]; then
        for d in /usr/local/cuda /usr/local/cuda-13.0; do [ -x "$d/bin/nvcc" ] && export CUDA_HOME=$d && break; done
    fi
    echo "building pyclipfast._C (log: $OUT/build.log)"
    local t0=$SECONDS
    if TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc) PYCLIPFAST_BUILD_CUDA=1 \
        timeout "${BUILD_BUDGET_S:-300}" "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
        echo "built in $((SECONDS - t0)) s"
    else
        echo "CUDA extension build FAILED after $((SECONDS - t0)) s; backend='cuda' will be skipped:"
        tail -5 "$OUT/build.log"
    fi
}

run_part() {
    # Stop the benchmark in time to pack the results inside the device tool's 600 s per command; a run
    # cut short leaves benchmarks/results/<device>/<name>.partial.json with every finished case.
    local left=$(( ${BUDGET_S:-570} - SECONDS ))
    [ "$left" -gt 60 ] || left=60
    local bench=(timeout "$left" "$PY" -m benchmarks run --device cuda
                 --note "lent GPU machine (device tool); gpu_bench.sh part $PART")
    case "$PART" in
        speed) "${bench[@]}" --suite gpu-goals --goals speed --name gpu-goals-speed ;;
        memory) "${bench[@]}" --suite gpu-goals --goals memory --name gpu-goals-memory ;;
        goals) "${bench[@]}" --suite gpu-goals --goals speed,memory --name gpu-goals ;;
        max-batch) "${bench[@]}" --suite gpu-goals --goals max-batch --name gpu-goals-max-batch ;;
        quick) "${bench[@]}" --suite quick ;;
        full) "${bench[@]}" --suite full ;;
        full-clip-siglip) "${bench[@]}" --suite full --only clip,siglip --name full-clip-siglip ;;
        full-rest) "${bench[@]}" --suite full --only distill,cosine,recall --name full-rest ;;
        *) echo "unknown part $PART"; return 2 ;;
    esac
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
    install_peers
    build_extension
    "$PY" -c "import torch, triton, pyclipfast; print('torch', torch.__version__, 'triton', triton.__version__, \
'GPU', torch.cuda.get_device_name(0))"
    "$PY" -m benchmarks list --device cuda --dtype bfloat16
    run_part
    echo "exit status of the benchmark: $?"
} 2>&1 | tee "$LOG"

tar czf "$OUT/results.tgz" -C benchmarks/results --exclude='./cpu-*' . && echo "results: $OUT/results.tgz ($(du -h "$OUT/results.tgz" | cut -f1))"
