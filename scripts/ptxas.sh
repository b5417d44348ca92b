#!/usr/bin/env bash
# ptxas, the PTX assembler, fetched once from PyPI (`nvidia-cuda-nvcc-cu12`, the CUDA
# version cudarc is built against) into a cache outside the repo (IRIS_CACHE, default
# ~/.cache/iris). Prints its path: CI assembles the PTX NVRTC makes of every kernel for
# sm_80 and sm_90, so an error a GPU's driver would hit at load shows here.
set -euo pipefail
cache="${IRIS_CACHE:-$HOME/.cache/iris}"
version=12.8.93
dir="$cache/nvcc-$version"
bin="$dir/nvidia/cuda_nvcc/bin/ptxas"
if [ ! -x "$bin" ]; then
    mkdir -p "$dir"
    tmp="$(mktemp -d)"
    if ! python3 -m pip --version >/dev/null 2>&1; then
        apt-get update -qq >&2 && apt-get install -y -qq python3-pip >&2
    fi
    python3 -m pip download -q "nvidia-cuda-nvcc-cu12==$version" --no-deps -d "$tmp" >&2
    python3 - "$tmp"/nvidia_cuda_nvcc_cu12-*.whl "$dir" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extract("nvidia/cuda_nvcc/bin/ptxas", sys.argv[2])
PY
    chmod +x "$bin"
    rm -rf "$tmp"
fi
echo "$bin"
