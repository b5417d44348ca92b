#!/usr/bin/env bash
# The CUDA compilers CI checks the kernels with, without a GPU or a CUDA install,
# fetched once from PyPI (the CUDA version cudarc is built against) into a cache outside
# the repo (IRIS_CACHE, default ~/.cache/iris):
#   scripts/cuda-tools.sh nvrtc   prints the folder holding libnvrtc.so.12 (for
#                                 LD_LIBRARY_PATH; `nvidia-cuda-nvrtc-cu12`)
#   scripts/cuda-tools.sh ptxas   prints the path of ptxas (`nvidia-cuda-nvcc-cu12`)
set -euo pipefail
cache="${IRIS_CACHE:-$HOME/.cache/iris}"
version=12.8.93
case "${1:-}" in
    nvrtc) package=nvidia-cuda-nvrtc-cu12; wanted=nvidia/cuda_nvrtc/lib/libnvrtc.so.12 ;;
    ptxas) package=nvidia-cuda-nvcc-cu12; wanted=nvidia/cuda_nvcc/bin/ptxas ;;
    *) echo "usage: $0 nvrtc|ptxas" >&2; exit 2 ;;
esac
dir="$cache/$package-$version"
if [ ! -s "$dir/$wanted" ]; then
    mkdir -p "$dir"
    tmp="$(mktemp -d)"
    if ! python3 -m pip --version >/dev/null 2>&1; then
        apt-get update -qq >&2 && apt-get install -y -qq python3-pip >&2
    fi
    python3 -m pip download -q "$package==$version" --no-deps -d "$tmp" >&2
    python3 - "$tmp"/*.whl "$dir" "$1" <<'PY'
import sys, zipfile
wheel, dest, tool = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    # NVRTC: the library and its builtins; ptxas: the one binary.
    names = [n for n in z.namelist() if ("/lib/" in n) == (tool == "nvrtc") and (tool == "nvrtc" or n.endswith("/bin/ptxas"))]
    z.extractall(dest, names)
PY
    chmod +x "$dir/$wanted"
    rm -rf "$tmp"
fi
if [ "$1" = nvrtc ]; then dirname "$dir/$wanted"; else echo "$dir/$wanted"; fi
