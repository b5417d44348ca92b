#!/usr/bin/env bash
# Resident memory of `iris serve` for one model under a stream of distinct requests:
# after start-up, then the peak and the end over N requests (8 at a time, each a new
# prompt with an image, so the prefix cache keeps taking blocks), sampled every 0.2 s.
#   python tools/gen_llava_size_model.py /tmp/llava-many --many-layers
#   bash tools/kv_memory.sh /tmp/llava-many [N] [IRIS_BINARY] [-- serve flags...]
# A process past STOP_MIB (default 12288) resident is killed and reported as such, so
# an unbounded build cannot take the machine down.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$1
N=${2:-200}
IRIS=${3:-target/release/iris}
shift $(( $# < 3 ? $# : 3 ))
[ "${1:-}" = "--" ] && shift
STOP_MIB=${STOP_MIB:-12288}
tmp=$(mktemp -d)
RUST_LOG=info "$IRIS" serve --model "$MODEL" --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 "$@" \
    >"$tmp/out" 2>"$tmp/err" &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$tmp"' EXIT
for _ in $(seq 600); do
    grep -q listening "$tmp/out" && break
    kill -0 $pid 2>/dev/null || { echo "start-up failed:"; tail -3 "$tmp/err"; exit 1; }
    sleep 0.2
done
addr=$(sed -n 's/.*grpc=\([^ ]*\).*/\1/p' "$tmp/out")
rss() { awk '/^VmRSS:/ {print int($2/1024)}' /proc/$pid/status; }
grep -h "KV cache" "$tmp/err" | sed 's/^.*INFO //' || true
echo "after start-up: $(rss) MiB"
peak=0
( for i in $(seq "$N"); do echo "$i"; done | xargs -P 8 -I{} "$IRIS" chat --addr "$addr" \
    --model "$(basename "$MODEL")" --image tests/fixtures/images/scene.png --max-tokens 8 \
    --message "Request {}: what does the picture show, and what would number {} add to it?" \
    >/dev/null 2>>"$tmp/client" ) &
load=$!
while kill -0 $load 2>/dev/null; do
    r=$(rss || echo 0)
    [ "$r" -gt "$peak" ] && peak=$r
    if [ "$r" -gt "$STOP_MIB" ]; then
        echo "resident memory passed ${STOP_MIB} MiB: killed"
        kill $pid; wait $load 2>/dev/null || true; break
    fi
    sleep 0.2
done
done_n=$(grep -o "finish:" "$tmp/client" 2>/dev/null | wc -l)
echo "after $N requests: $(rss 2>/dev/null || echo gone) MiB, peak $peak MiB; $done_n completed"
grep -o "error:.*" "$tmp/client" | sort | uniq -c | head -3 || true
