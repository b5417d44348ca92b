#!/usr/bin/env bash
# Resident memory of each rank of a tensor-parallel decoder (`iris decoder --tp N`, the
# ranks as processes on this machine) for one model, at each N given: VmRSS and its
# anonymous / file-backed parts from /proc, after loading, for rank 0 (this process:
# the language model's shard and the tokenizer) and every rank above it.
#   python tools/gen_llava_size_model.py /tmp/llava-size       # TinyLlama-1.1B LM, bf16
#   bash tools/tp_memory.sh /tmp/llava-size "1 2 4" [IRIS_BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$1
SIZES=${2:-1 2 4}
IRIS=${3:-target/release/iris}
tmp=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT
rss() {
    awk '/^(VmRSS|RssAnon|RssFile):/ {printf "%s %5.0f MiB  ", $1, $2/1024}' "/proc/$1/status"
}
for n in $SIZES; do
    # A small KV cache: the figures are the weights'.
    RUST_LOG=warn "$IRIS" decoder --model "$MODEL" --tp "$n" --kv-blocks 16 \
        --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 >"$tmp/out" 2>"$tmp/err" &
    pid=$!
    for _ in $(seq 1200); do
        if grep -q listening "$tmp/out"; then break; fi
        kill -0 "$pid" 2>/dev/null || { cat "$tmp/err"; exit 1; }
        sleep 0.2
    done
    echo "--tp $n:"
    printf '  rank 0  %s\n' "$(rss "$pid")"
    r=1
    for c in $(pgrep -P "$pid" | sort -n); do
        printf '  rank %d  %s\n' "$r" "$(rss "$c")"
        r=$((r + 1))
    done
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    pid=
done
