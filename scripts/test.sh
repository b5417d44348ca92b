#!/usr/bin/env bash
# The whole test suite: formatting, lints, every unit and end-to-end test (services as
# separate processes on loopback included), then third-party clients (the `openai`
# Python client and grpcurl) against `iris serve`. Needs the Rust toolchain; installs a
# C compiler, protoc, python3-venv and the client packages when missing.
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
cargo test --workspace
bash scripts/client_check.sh
