#!/usr/bin/env bash
# Resident memory of each tier process for one model: an encoder, a connector, a decoder
# and a gateway on loopback, each measured after loading and again after serving one
# request with an image (VmRSS, and its anonymous / file-backed parts, from /proc).
#   python tools/gen_llava_size_model.py /tmp/llava-size       # a real-size LLaVA
#   bash tools/tier_memory.sh /tmp/llava-size [IRIS_BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$1
IRIS=${2:-target/release/iris}
ID=$(basename "$MODEL")
tmp=$(mktemp -d)
declare -A pid addr
cleanup() { for p in "${pid[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT
start() {
    local name=$1; shift
    RUST_LOG=warn "$IRIS" "$@" --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 >"$tmp/$name" 2>"$tmp/$name.err" &
    pid[$name]=$!
    for _ in $(seq 600); do
        if grep -q listening "$tmp/$name"; then break; fi
        kill -0 "${pid[$name]}" 2>/dev/null || { cat "$tmp/$name.err"; exit 1; }
        sleep 0.2
    done
    addr[$name]=$(sed -n 's/.*grpc=\([^ ]*\).*/\1/p' "$tmp/$name")
}
rss() {
    awk '/^(VmRSS|RssAnon|RssFile):/ {printf "%s %.0f MiB  ", $1, $2/1024}' "/proc/${pid[$1]}/status"
}
start encoder encoder --model "$MODEL"
start connector connector --model "$MODEL"
start decoder decoder --model "$MODEL"
start gateway gateway --model "$MODEL" --encoder "${addr[encoder]}" \
    --connector "${addr[connector]}" --decoder "${addr[decoder]}"
echo "after loading:"
for t in encoder connector decoder gateway; do printf '  %-9s %s\n' "$t" "$(rss $t)"; done
"$IRIS" chat --addr "${addr[gateway]}" --model "$ID" --image tests/fixtures/images/scene.png \
    --message "What is in the picture?" --max-tokens 4 >/dev/null
echo "after one request with an image:"
for t in encoder connector decoder gateway; do printf '  %-9s %s\n' "$t" "$(rss $t)"; done
