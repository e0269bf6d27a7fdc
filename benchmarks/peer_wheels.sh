#!/usr/bin/env bash
# Download the peers' wheels for the GPU machine, which has Python 3.12 and no network, into
# .wheels/ (gitignored). Run here, on a machine with network access, from anywhere in the repo:
#
#     bash benchmarks/peer_wheels.sh            # or: bash benchmarks/peer_wheels.sh DEST
#
# The GPU machine already has torch, torchvision, triton, numpy, timm, huggingface-hub,
# safetensors, regex and tqdm; what the peers need beyond that is listed here. There, the
# benchmark script installs them without pip resolving anything:
#
#     python3 -m pip install --no-index --no-deps --target /tmp/peers .wheels/*.whl
#     export PYTHONPATH=/tmp/peers${PYTHONPATH:+:$PYTHONPATH}
#
# (benchmarks/gpu_check.sh does this; name .wheels in the device tool's `carry`.)
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

echo "== wheels in $DEST (carry this folder to the GPU machine; do not commit it)"
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
