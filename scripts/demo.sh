#!/usr/bin/env bash
# The main job on the embedded default: `iris generate` with the tiny LLaVA fixture and
# a sample image (greedy, JSON out). Pass other `iris generate` flags to override.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cc >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq build-essential
fi
cargo build --release -p iris
exec ./target/release/iris generate \
    --model tests/fixtures/llava-tiny-hub-f32 \
    --image tests/fixtures/images/scene.png \
    --prompt $'USER: <image>\nWhat is in the picture? ASSISTANT:' \
    --max-new-tokens 16 --json "$@"
