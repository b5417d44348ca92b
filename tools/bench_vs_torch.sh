#!/usr/bin/env bash
# The engine benchmark against its reference, back to back on the same machine:
# `iris bench decode` (bf16, batch 1/8/32, a 576+32-token prefill) and `iris bench vit`,
# then tools/bench_torch_decode.py (HF transformers on PyTorch, same shapes and threads),
# RUNS times (default 2) — the machine is shared, so compare within a run.
#   PYTHON=/path/to/venv/bin/python RUNS=2 bash tools/bench_vs_torch.sh
# PYTHON needs torch and transformers (see tools/README.md). IRIS=/path/to/iris runs
# another build (e.g. the commit before a change, for a before / after in one sitting);
# IRIS_B=/path/to/iris also runs a second build right after the first in every run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -z "${IRIS:-}" ]; then
    cargo build --release -q -p iris
fi
IRIS=${IRIS:-./target/release/iris}
for r in $(seq "${RUNS:-2}"); do
    for bin in "$IRIS" ${IRIS_B:-}; do
        echo "=== run $r $(date +%H:%M) $bin"
        "$bin" bench decode --dtypes bf16 --batch 1,8,32 --prefill 608 | tail -n 5
        "$bin" bench vit | tail -n 1
    done
    "$PYTHON" tools/bench_torch_decode.py --dtype bf16 --batch 1,8,32 --prefill 608 --vit | grep impl
done
