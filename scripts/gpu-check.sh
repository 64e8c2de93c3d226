#!/usr/bin/env bash
# Issue #14's GPU check: parity and speed of the CUDA build on a GPU machine.
#
# Run once, from the repository root, on the GPU machine (H200, driver 580,
# /opt/torch/.venv with torch cu130 and transformers), with the compressed
# binary that scripts/build-cuda.sh made carried along (target/cuda is
# ignored by git: carry it):
#
#     scripts/gpu-check.sh                  # → bench/results/YYYY-MM-DD-small-h200.json
#
# Environment:
#   BINARY   the gzipped CUDA build (default target/cuda/dialogd-cuda.gz) or
#            an unpacked binary
#   PYTHON   Python with torch and transformers (default /opt/torch/.venv/bin/python)
#   DEVICE   cuda (default) or cpu: `DEVICE=cpu` runs every non-GPU part
#            here, with the CPU build (BINARY=target/release/dialogd), to
#            check the script itself
#   SHAPES, BENCH_SHAPES, CONCURRENCY, NEW_TOKENS, PROMPT_TOKENS: passed on
#            (defaults: small,medium; small; 1,8,32,128; 64; 64)
#   OUT      the results file (default bench/results/$(date -u +%F)-small-h200.json;
#            with DEVICE=cpu, /tmp/dialogd-gpu-check/results.json)
#
# The CUDA libraries dialogd links (cuBLAS, cuBLASLt, cuRAND, NVRTC, the
# runtime) come from the torch venv's nvidia cu13 wheels, libcuda.so.1 from
# the driver. What it does: scripts/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."

device=${DEVICE:-cuda}
python=${PYTHON:-/opt/torch/.venv/bin/python}
binary=${BINARY:-target/cuda/dialogd-cuda.gz}
work=/tmp/dialogd-gpu-check
mkdir -p "$work"
if [[ $device == cuda* ]]; then
    out=${OUT:-bench/results/$(date -u +%F)-small-h200.json}
else
    out=${OUT:-$work/results.json}
fi

[[ -x $python ]] || python=$(command -v python3)
if [[ $binary == *.gz ]]; then
    gunzip -c "$binary" >"$work/dialogd"
    chmod +x "$work/dialogd"
    binary=$work/dialogd
fi

if [[ $device == cuda* ]]; then
    # The venv's CUDA 13 libraries: every nvidia/*/lib (and cu13/lib) folder.
    libs=$("$python" - <<'EOF'
import glob, os, nvidia
dirs = set()
for root in nvidia.__path__:
    for so in glob.glob(os.path.join(root, "**", "lib*.so*"), recursive=True):
        dirs.add(os.path.dirname(so))
print(":".join(sorted(dirs)))
EOF
)
    export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
    # Missing libraries show here, before anything is measured.
    if ldd "$binary" | grep 'not found'; then
        echo "gpu-check: libraries missing (LD_LIBRARY_PATH=$LD_LIBRARY_PATH)" >&2
        exit 1
    fi
fi
"$binary" --version

"$python" scripts/gpu_check.py --dialogd "$binary" --device "$device" --out "$out" \
    --shapes "${SHAPES:-small,medium}" --bench-shapes "${BENCH_SHAPES:-small}" \
    --concurrency "${CONCURRENCY:-1,8,32,128}" --new-tokens "${NEW_TOKENS:-64}" \
    --prompt-tokens "${PROMPT_TOKENS:-64}" --work "$work"
[[ $device == cuda* ]] && nvidia-smi --query-gpu=memory.used --format=csv
echo "gpu-check: results in $out"
