#!/usr/bin/env bash
# Serving benchmarks of the cluster caches and routing, all with `iris bench serve` on
# one machine in one sitting (ratios are what to read; the machine is shared):
#   1. `iris serve` with 80% image reuse: the visual-token cache on vs off;
#   2. the same workload through tiers in their own processes (encoder, connector,
#      decoder, gateway) vs `iris serve`;
#   3. multi-turn conversations over two decoders: KV-aware vs load-only routing.
#   python tools/gen_llava_size_model.py /tmp/llava-size       # a real-size LLaVA
#   bash tools/bench_serving.sh /tmp/llava-size [IRIS_BINARY] [REQUESTS]
# Each case prints one summary line and its TTFT row; BENCH_JSON=dir keeps the JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$1
IRIS=${2:-target/release/iris}
N=${3:-24}
ID=$(basename "$MODEL")
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT
declare -A grpc http
start() {
    local name=$1; shift
    RUST_LOG=warn "$IRIS" "$@" --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 >"$tmp/$name" 2>"$tmp/$name.err" &
    pids+=($!)
    for _ in $(seq 1200); do
        if grep -q listening "$tmp/$name"; then break; fi
        kill -0 "$!" 2>/dev/null || { cat "$tmp/$name.err"; exit 1; }
        sleep 0.2
    done
    grpc[$name]=$(sed -n 's/.*grpc=\([^ ]*\).*/\1/p' "$tmp/$name")
    http[$name]=$(sed -n 's/.*http=\([^ ]*\).*/\1/p' "$tmp/$name")
}
stop_all() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }
bench() {
    local label=$1 addr=$2; shift 2
    echo "== $label"
    "$IRIS" bench serve --url "http://$addr" --model "$ID" --requests "$N" "$@" --json >"$tmp/out.json"
    [ -n "${BENCH_JSON:-}" ] && cp "$tmp/out.json" "$BENCH_JSON/$(echo "$label" | tr ' /' '__').json"
    python3 - "$tmp/out.json" <<'EOF'
import json, sys
v = json.load(open(sys.argv[1]))
t = v["ttft"] or {}
print(f"  {v['completed']}/{v['requests']} ok in {v['duration_s']:.1f} s: {v['request_throughput']:.3f} req/s, "
      f"{v['output_token_throughput']:.2f} out tok/s; TTFT p50 {t.get('p50_ms', 0):.0f} ms, p99 {t.get('p99_ms', 0):.0f} ms; "
      f"cached prompt tokens {v['cached_prompt_tokens']} of {v['prompt_tokens']}")
EOF
}
WORK=(--concurrency 4 --image-reuse 0.8 --max-tokens 8 --prompt-words 8)

start serve serve --model "$MODEL"
bench "iris serve, cache on" "${http[serve]}" "${WORK[@]}" --seed 1
stop_all
start serve serve --model "$MODEL" --visual-cache-bytes 0
bench "iris serve, cache off" "${http[serve]}" "${WORK[@]}" --seed 1
stop_all

start enc encoder --model "$MODEL"
start con connector --model "$MODEL"
start dec decoder --model "$MODEL"
start gw gateway --model "$MODEL" --encoder "${grpc[enc]}" --connector "${grpc[con]}" --decoder "${grpc[dec]}"
bench "tiers in processes, cache on" "${http[gw]}" "${WORK[@]}" --seed 1
stop_all

TURNS=(--concurrency 2 --turns 3 --image-reuse 0 --max-tokens 8 --prompt-words 8)
for routing in kv load; do
    start enc encoder --model "$MODEL"
    start con connector --model "$MODEL"
    start d1 decoder --model "$MODEL"
    start d2 decoder --model "$MODEL"
    start gw gateway --model "$MODEL" --encoder "${grpc[enc]}" --connector "${grpc[con]}" \
        --decoder "${grpc[d1]}" --decoder "${grpc[d2]}" --routing "$routing"
    bench "multi-turn, two decoders, --routing $routing" "${http[gw]}" "${TURNS[@]}" --seed 2
    stop_all
done
