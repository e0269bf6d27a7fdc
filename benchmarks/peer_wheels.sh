#!/usr/bin/env bash
# Gather what the GPU check needs beside the checkout on a machine with a GPU, Python 3.12 and no
# network, into .wheels/ (gitignored). Run here, with network access, from anywhere in the repo:
#
#     bash benchmarks/peer_wheels.sh            # or: bash benchmarks/peer_wheels.sh DEST
#
# 1. The peers' wheels (open_clip and what it imports, Inf-CL, siglip-kernel). The GPU machine
#    already has torch, torchvision, triton, numpy, timm, huggingface-hub, safetensors, regex and
#    tqdm. benchmarks/gpu_check.sh installs them there without resolving anything:
#        python3 -m pip install --no-index --no-deps --target /tmp/site .wheels/*.whl
# 2. The CUDA kernel library built here (pyclipfast/cuda/libpyclipfast_cuda.so, by
#    `python csrc/build.py`): a C library with the CUDA runtime linked in, so it loads with the
#    GPU machine's torch and Python; gpu_check.sh points PYCLIPFAST_CUDA_LIBRARY at the copy.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.wheels}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

PEERS=(
    open_clip_torch==3.3.0   # ClipLoss, SigLipLoss, DistillClipLoss
    ftfy==6.3.1              # imported by open_clip's tokenizer (at import time)
    wcwidth==0.9.4           # needed by ftfy
    inf-cl==1.2.1            # Inf-CL: inf_cl.cal_inf_loss (needs numpy, triton: present there)
    siglip-kernel==0.1.2     # siglip_kernel.fused_siglip_loss (needs torch, triton: present there)
)

mkdir -p "$DEST"
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$DEST" "${PEERS[@]}"

LIB=pyclipfast/cuda/libpyclipfast_cuda.so
if [ -f "$LIB" ]; then
    cp "$LIB" "$DEST/"
else
    echo "warning: $LIB is not built (python csrc/build.py); the GPU check needs it" >&2
fi

echo "== files in $DEST (copy this folder beside the checkout on the GPU machine; do not commit it)"
[ -f "$DEST/libpyclipfast_cuda.so" ] && printf '%8.1f KiB  %s\n' "$(echo "$(stat -c %s "$DEST/libpyclipfast_cuda.so") / 1024" | bc -l)" libpyclipfast_cuda.so
total=0
for whl in "$DEST"/*.whl; do
    size=$(stat -c %s "$whl")
    total=$((total + size))
    printf '%8.1f KiB  %s\n' "$(echo "$size / 1024" | bc -l)" "$(basename "$whl")"
    "$PY" - "$whl" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    needs = [l.split(":", 1)[1].strip() for l in z.read(meta).decode().splitlines()
             if l.startswith("Requires-Dist:") and "extra ==" not in l]
print("            requires: " + (", ".join(needs) or "nothing"))
EOF
done
printf '== %d wheels, %.1f MiB in total\n' "$(ls "$DEST"/*.whl | wc -l)" "$(echo "$total / 1048576" | bc -l)"
