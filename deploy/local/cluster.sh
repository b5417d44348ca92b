#!/usr/bin/env bash
# A local Iris cluster on loopback: etcd, two vision encoders, a connector, a decoder
# and a gateway, each its own process registered in etcd; `down` stops them all.
#
#   deploy/local/cluster.sh up [MODEL_DIR]   # default: the tiny LLaVA fixture
#   deploy/local/cluster.sh status
#   deploy/local/cluster.sh down
#
# Ports: etcd 23790, gateway gRPC 50051 / HTTP 8000; tiers on 2006x (gRPC) / 906x
# (metrics), below the kernel's ephemeral range (32768-60999 here: a tier on 50062 once
# found the port taken by an outgoing connection). State and logs in $IRIS_LOCAL_DIR
# (default /tmp/iris-local); binaries from $IRIS_BIN_DIR (default ./target/release).
# Needs etcd (Debian: etcd-server) and a release build of iris.
set -euo pipefail
cd "$(dirname "$0")/../.."
dir="${IRIS_LOCAL_DIR:-/tmp/iris-local}"
etcd_url="http://127.0.0.1:23790"
bin="${IRIS_BIN_DIR:-./target/release}"

start() { # name, command...
    local name=$1; shift
    "$@" >"$dir/$name.out" 2>"$dir/$name.log" &
    echo $! >"$dir/$name.pid"
    for _ in $(seq 200); do grep -q listening "$dir/$name.out" 2>/dev/null && break; sleep 0.1; done
    grep -q listening "$dir/$name.out" || { echo "$name did not start: see $dir/$name.log" >&2; exit 1; }
    echo "$name: $(cat "$dir/$name.out")"
}

case "${1:-}" in
up)
    model="${2:-tests/fixtures/llava-tiny-hub-f32}"
    mkdir -p "$dir"
    command -v etcd >/dev/null || { echo "etcd not found (apt-get install etcd-server)" >&2; exit 1; }
    [ -x "$bin/iris" ] || cargo build --release -p iris
    etcd --name iris-local --data-dir "$dir/etcd" \
        --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
        --listen-peer-urls http://127.0.0.1:23800 --initial-advertise-peer-urls http://127.0.0.1:23800 \
        --initial-cluster iris-local=http://127.0.0.1:23800 >"$dir/etcd.log" 2>&1 &
    echo $! >"$dir/etcd.pid"
    for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/23790) 2>/dev/null && break; sleep 0.1; done
    common=(--model "$model" --etcd "$etcd_url" --cluster local)
    start encoder-1 "$bin/iris-encoder" "${common[@]}" --grpc-addr 127.0.0.1:20061 --http-addr 127.0.0.1:9061
    start encoder-2 "$bin/iris-encoder" "${common[@]}" --grpc-addr 127.0.0.1:20062 --http-addr 127.0.0.1:9062
    start connector "$bin/iris-connector" "${common[@]}" --grpc-addr 127.0.0.1:20063 --http-addr 127.0.0.1:9063
    start decoder "$bin/iris-decoder" "${common[@]}" --grpc-addr 127.0.0.1:20064 --http-addr 127.0.0.1:9064
    start gateway "$bin/iris-gateway" "${common[@]}" --grpc-addr 127.0.0.1:50051 --http-addr 127.0.0.1:8000
    echo "up: gRPC 127.0.0.1:50051, OpenAI HTTP http://127.0.0.1:8000/v1 (model $(basename "$model"))"
    ;;
status)
    "$bin/iris" cluster status --etcd "$etcd_url" --cluster local
    ;;
down)
    for name in gateway decoder connector encoder-2 encoder-1 etcd; do
        if [ -f "$dir/$name.pid" ]; then
            kill "$(cat "$dir/$name.pid")" 2>/dev/null || true
            rm -f "$dir/$name.pid"
        fi
    done
    sleep 0.5
    rm -rf "$dir/etcd"
    echo down
    ;;
*)
    echo "usage: $0 up [MODEL_DIR] | status | down" >&2
    exit 2
    ;;
esac
