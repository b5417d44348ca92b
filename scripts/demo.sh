#!/usr/bin/env bash
# The main job on the embedded default: `iris serve` (every tier and the gateway in one
# process) on the tiny LLaVA fixture, then one request with a sample image whose
# streamed answer is printed, then the server stops. Installs what the build needs
# (a C compiler, protoc) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh

cargo build --release -p iris
log="$(mktemp)"
./target/release/iris serve --model tests/fixtures/llava-tiny-hub-f32 \
    --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 >"$log" &
pid=$!
trap 'kill $pid 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 300); do grep -q listening "$log" && break; sleep 0.1; done
cat "$log"
grpc="$(sed -n 's/.*grpc=\([^ ]*\).*/\1/p' "$log")"
./target/release/iris chat --addr "$grpc" --model llava-tiny-hub-f32 \
    --image tests/fixtures/images/scene.png --message "What is in the picture?" \
    --max-tokens 16 "$@"
