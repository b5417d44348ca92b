#!/usr/bin/env bash
# The whole test suite: formatting, lints, every unit and end-to-end test (services as
# separate processes on loopback and a real etcd included), third-party clients (the
# `openai` Python client and grpcurl) against `iris serve`, and the local cluster
# launcher, a short bounded run of each fuzz target (scripts/fuzz.sh), the Helm chart
# (scripts/helm_check.sh: lint, rendered manifests validated and reviewed), and the CUDA
# backend's build and NVRTC compile of every kernel (no GPU needed). Needs the
# Rust toolchain; installs a C compiler, protoc, etcd, python3-venv, cargo-fuzz and the
# client packages when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        rustup component add "$component"
    fi
done

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The CUDA backend builds without CUDA (cudarc loads it at run time): lints and a build.
cargo clippy --workspace --all-targets --features iris/cuda,iris-e2e/cuda -- -D warnings
cargo build -p iris --features cuda
# A real GGUF checkpoint for the header test, cached outside the repo.
IRIS_SMOLLM2_GGUF="$(bash scripts/models.sh)"
export IRIS_SMOLLM2_GGUF IRIS_REQUIRE_MODELS=1
cargo test --workspace --no-fail-fast
# Every CUDA kernel compiled by NVRTC (from PyPI, cached) to PTX for sm_80 and sm_90
# and assembled by ptxas (no spills), and the backend suite again in a CUDA build (on
# the CPU: no GPU here).
LD_LIBRARY_PATH="$(bash scripts/cuda-tools.sh nvrtc)" IRIS_REQUIRE_NVRTC=1 IRIS_PTXAS="$(bash scripts/cuda-tools.sh ptxas)" \
    cargo test -p iris-tensor --features cuda
bash scripts/fuzz.sh
bash scripts/client_check.sh
bash scripts/helm_check.sh
# The local cluster launcher: up, one request through it, down.
trap 'IRIS_BIN_DIR=target/debug bash deploy/local/cluster.sh down >/dev/null' EXIT
IRIS_BIN_DIR=target/debug bash deploy/local/cluster.sh up
./target/debug/iris chat --addr 127.0.0.1:50051 --model llava-tiny-hub-f32 \
    --image tests/fixtures/images/scene.png --message "What is in the picture?" --max-tokens 8
