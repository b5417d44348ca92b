#!/usr/bin/env bash
# NVRTC, the CUDA runtime compiler the CUDA backend compiles its kernels with, fetched
# once from PyPI (`nvidia-cuda-nvrtc-cu12`, the CUDA version cudarc is built against)
# into a cache outside the repo (IRIS_CACHE, default ~/.cache/iris). Prints the folder
# holding libnvrtc.so.12, for LD_LIBRARY_PATH: CI compiles every kernel with it, no GPU
# or CUDA install needed.
set -euo pipefail
cache="${IRIS_CACHE:-$HOME/.cache/iris}"
version=12.8.93
dir="$cache/nvrtc-$version"
lib="$dir/nvidia/cuda_nvrtc/lib"
if [ ! -s "$lib/libnvrtc.so.12" ]; then
    mkdir -p "$dir"
    tmp="$(mktemp -d)"
    if ! python3 -m pip --version >/dev/null 2>&1; then
        apt-get update -qq >&2 && apt-get install -y -qq python3-pip >&2
    fi
    python3 -m pip download -q "nvidia-cuda-nvrtc-cu12==$version" --no-deps -d "$tmp" >&2
    python3 - "$tmp"/nvidia_cuda_nvrtc_cu12-*.whl "$dir" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
    rm -rf "$tmp"
fi
echo "$lib"
