#!/usr/bin/env bash
# llama.cpp, the CPU peer Iris' decode is measured against, built from the sources
# PyPI's `llama-cpp-python` 0.3.36 sdist vendors (no other network source is open here),
# into a cache outside the repo (IRIS_CACHE, default ~/.cache/iris): llama-bench and
# llama-quantize, native CPU flags. ~15 minutes on 2 cores the first time. Prints the
# folder holding the binaries; the sdist's gguf-py is at $cache/llama.cpp-src/gguf-py.
#   bash tools/llamacpp.sh
set -euo pipefail
version=0.3.36
cache="${IRIS_CACHE:-$HOME/.cache/iris}"
src="$cache/llama.cpp-src"
bin="$cache/llama.cpp-$version/bin"
if [ -x "$bin/llama-bench" ] && [ -x "$bin/llama-quantize" ]; then
    echo "$bin"
    exit 0
fi
command -v cmake >/dev/null || { apt-get update -qq >&2 && apt-get install -y -qq cmake >&2; }
command -v c++ >/dev/null || { apt-get update -qq >&2 && apt-get install -y -qq g++ >&2; }
mkdir -p "$cache/src"
tarball="$cache/src/llama_cpp_python-$version.tar.gz"
if [ ! -s "$tarball" ]; then
    url=$(curl -fsSL https://pypi.org/simple/llama-cpp-python/ |
        grep -o "https://[^\"#]*llama_cpp_python-$version.tar.gz" | head -n 1)
    curl -fsSL -o "$tarball.part" "$url"
    mv "$tarball.part" "$tarball"
fi
rm -rf "$src" && mkdir -p "$src"
tar xzf "$tarball" -C "$src" --strip-components=3 "llama_cpp_python-$version/vendor/llama.cpp"
cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >&2
cmake --build "$src/build" -j"$(nproc)" --target llama-bench llama-quantize >&2
mkdir -p "$bin"
cp "$src"/build/bin/llama-bench "$src"/build/bin/llama-quantize "$bin"/
# The shared libraries the binaries link (libllama, libggml*), beside them.
find "$src/build" -name "*.so*" -exec cp -P {} "$bin"/ \;
echo "$bin"
