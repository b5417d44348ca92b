#!/usr/bin/env bash
# NVIDIA's aiperf (PyPI), a third-party load generator for OpenAI endpoints, against
# `iris serve` with the visual-token cache on and then off, in one sitting: streamed
# chat requests with images from a pool at 80% reuse (REQUESTS requests over
# REQUESTS/5 distinct images, from aiperf's single_turn dataset file), 4 concurrent,
# 8 output tokens. Prints aiperf's TTFT p50/p99 and throughputs for each.
#   python tools/gen_llava_size_model.py /tmp/llava-size
#   bash tools/bench_aiperf.sh /tmp/llava-size [IRIS_BINARY] [REQUESTS]
# aiperf goes into a venv outside the repo (IRIS_AIPERF_VENV, default /tmp/aiperf-venv).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$1
IRIS=${2:-target/release/iris}
N=${3:-30}
ID=$(basename "$MODEL")
venv="${IRIS_AIPERF_VENV:-/tmp/aiperf-venv}"
[ -x "$venv/bin/aiperf" ] || { python3 -m venv "$venv" && "$venv/bin/pip" install -q aiperf; }
tmp=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT
# The dataset: N requests, each image drawn so that 80% of requests repeat an image
# seen before (distinct images are 336x336 PNGs of different noise).
python3 - "$tmp" "$N" <<'PY'
import json, random, struct, sys, zlib
out, n = sys.argv[1], int(sys.argv[2])
def png(path, seed, size=336):
    r = random.Random(seed)
    rows = b"".join(b"\0" + bytes(r.randrange(256) for _ in range(size * 3)) for _ in range(size))
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(rows, 1)) + chunk(b"IEND", b""))
distinct = max(1, n // 5)
images = [f"{out}/img{i}.png" for i in range(distinct)]
for i, p in enumerate(images):
    png(p, i)
# Each new image first appears once, in order; the other 80% repeat earlier ones.
order, r = [], random.Random(7)
new = set(r.sample(range(n), distinct - 1)) | {0}
seen = 0
for i in range(n):
    if i in new and seen < distinct:
        order.append(seen); seen += 1
    else:
        order.append(r.randrange(seen))
with open(f"{out}/data.jsonl", "w") as f:
    for i, k in enumerate(order):
        f.write(json.dumps({"text": f"Describe picture {i} in a few words.", "image": images[k]}) + "\n")
PY
run() {
    local label=$1; shift
    RUST_LOG=warn "$IRIS" serve --model "$MODEL" "$@" --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 >"$tmp/serve" 2>"$tmp/serve.err" &
    pid=$!
    for _ in $(seq 1200); do
        grep -q listening "$tmp/serve" && break
        kill -0 "$pid" 2>/dev/null || { cat "$tmp/serve.err"; exit 1; }
        sleep 0.2
    done
    local http
    http=$(sed -n 's/.*http=\([^ ]*\).*/\1/p' "$tmp/serve")
    echo "== aiperf, iris serve, $label"
    "$venv/bin/aiperf" profile -m "$ID" --url "http://$http" --endpoint-type chat --streaming \
        --input-file "$tmp/data.jsonl" --custom-dataset-type single_turn --request-count "$N" \
        --concurrency 4 --tokenizer "$MODEL" --extra-inputs max_tokens:8 \
        --output-artifact-dir "$tmp/art-$label" --ui-type none >"$tmp/aiperf.log" 2>&1 ||
        { tail -n 30 "$tmp/aiperf.log"; exit 1; }
    python3 - "$tmp/art-$label" <<'PY'
import glob, json, sys
f = glob.glob(f"{sys.argv[1]}/**/profile_export_aiperf.json", recursive=True)[0]
m = json.load(open(f))
g = lambda k, s: m.get(k, {}).get(s, float("nan"))
print(f"  TTFT p50 {g('time_to_first_token', 'p50'):.0f} ms, p99 {g('time_to_first_token', 'p99'):.0f} ms; "
      f"request latency p50 {g('request_latency', 'p50'):.0f} ms; "
      f"{g('request_throughput', 'avg'):.3f} req/s, {g('output_token_throughput', 'avg'):.2f} out tok/s; "
      f"{g('request_count', 'avg'):.0f} requests")
PY
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
}
run cache-on
run cache-off --visual-cache-bytes 0
