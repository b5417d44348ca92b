#!/usr/bin/env bash
# The fuzz targets in fuzz/ (cargo fuzz, libFuzzer; `cargo fuzz list`), each a short
# bounded run from its committed corpus and seeds: FUZZ_RUNS inputs (default 20000) or
# FUZZ_SECONDS (default 30), whichever comes first. New inputs go to a scratch folder,
# so the committed corpus stays as committed; a crash fails the run and leaves its input
# under fuzz/artifacts/. Installs cargo-fuzz when missing. Longer runs:
#   cd fuzz && cargo fuzz run -s none TARGET corpus/TARGET seeds/TARGET -- -max_total_time=600
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
# No sanitizer: the Rust is safe code (the C JPEG decoder aside) and the stable
# toolchain takes the coverage flags without -Z options.
cargo fuzz build -s none
runs="${FUZZ_RUNS:-20000}"
secs="${FUZZ_SECONDS:-30}"
for t in $(cargo fuzz list); do
    scratch="$(mktemp -d)"
    mkdir -p "corpus/$t"
    echo "fuzz $t: up to $runs inputs or $secs s"
    status=0
    cargo fuzz run -s none "$t" "$scratch" "corpus/$t" "seeds/$t" -- \
        -runs="$runs" -max_total_time="$secs" -print_final_stats=1 >"$scratch.log" 2>&1 ||
        status=$?
    grep -E "^(Done|stat::number_of_executed_units|stat::peak_rss_mb)" "$scratch.log" || true
    if [ "$status" != 0 ]; then
        tail -40 "$scratch.log" >&2
        echo "fuzz $t FAILED (its input is under fuzz/artifacts/$t/)" >&2
        exit 1
    fi
    rm -rf "$scratch" "$scratch.log"
done
