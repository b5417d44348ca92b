#!/usr/bin/env bash
# The whole test suite: formatting, lints, every unit and end-to-end test.
# Needs the Rust toolchain (with rustfmt and clippy) and a C compiler (the JPEG decoder
# is built from C); installs the compiler with apt when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cc >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq build-essential
fi
for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        rustup component add "$component"
    fi
done

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
