#!/usr/bin/env bash
# Builds what tools/gpu-check.sh runs on a GPU machine (which has no Rust toolchain):
# the `iris` binary with the CUDA backend, the backend test suite and the golden tests,
# release, stripped, into gpu-bin/ (ignored by git; the device tool carries it, 64 MiB
# at most). Run here, on the CPU machine:
#   bash tools/gpu-build.sh   # then carry ["gpu-bin"] and run tools/gpu-check.sh there
set -euo pipefail
cd "$(dirname "$0")/.."
out=gpu-bin
rm -rf "$out" && mkdir -p "$out"
# The test binaries' paths come from cargo's JSON messages.
test_bin() {
    cargo test --release "$@" --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])' | tail -n 1
}
cargo build --release -p iris --features cuda
cp target/release/iris "$out/iris"
cp "$(test_bin -p iris-tensor --features cuda --test backend)" "$out/backend"
cp "$(test_bin -p iris-e2e --features cuda --test gpu_goldens)" "$out/goldens"
strip "$out"/*
du -sh "$out" "$out"/*
